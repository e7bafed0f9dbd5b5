"""What a run leaves behind: results.json, results.md (the tables, each naming its mask) and
plots/<metric>.png, from an EvalResult."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation.clips import bin_label
from models.evaluation.figures import save_png, scatter_plot, series_from_records
from models.evaluation.harness import EvalResult
from models.evaluation.scoring import METRICS

__all__ = ["results_markdown", "write_results"]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _cell(stat: Mapping[str, Any] | None, digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f}"


_DIGITS = {"psnr_head": 2, "psnr_person": 2, "ssim_head": 3, "ssim_person": 3, "id_dist_target": 3,
           "id_dist_ref": 3, "lmk_err_pct": 1}


def results_markdown(result: EvalResult, summary: Mapping[str, Any] | None = None) -> str:
    """The tables of results.md (each says which mask it uses)."""
    summary = summary or result.summary()
    labels = [bin_label(b) for b in result.config.bins]
    methods = result.methods
    L: list[str] = ["# Novel-view evaluation", ""]
    L.append(f"{len(result.clips)} clip(s) evaluated, {len(result.skipped)} skipped, {len(result.records)} pairs; "
             f"crop size {result.config.size} px; methods: {', '.join(methods)}.")
    for note in result.meta.get("notes", []):
        L.append(f"- {note}")
    L += ["", "Pairs: the most frontal frame of each clip is the reference; targets binned by |yaw difference| "
          f"(degrees), at most {result.config.max_pairs_per_bin} per bin and clip, excluding frames within "
          f"{result.config.min_gap_frames} frames or {result.config.min_yaw_diff_deg} deg of the reference. "
          "Means over pairs (every pair weighs the same); n = pairs.", ""]

    def table(metric: str, title: str) -> None:
        L.append(f"## {title}")
        L.append("")
        L.append("| method | " + " | ".join(f"{lab} deg" for lab in labels) + " | all |")
        L.append("|---|" + "---|" * (len(labels) + 1))
        d = _DIGITS[metric]
        for m in methods:
            cells = [_cell(summary["per_bin"][lab][m][metric], d) for lab in labels]
            cells.append(_cell(summary["overall"][m][metric], d))
            L.append(f"| {m} | " + " | ".join(cells) + " |")
        ns = [str(summary["per_bin"][lab][methods[0]][metric]["n"]) for lab in labels]
        L.append("| n | " + " | ".join(ns) + f" | {summary['overall'][methods[0]][metric]['n']} |")
        L.append("")

    table("psnr_head", "PSNR (dB), HEAD mask (primary)")
    table("ssim_head", "SSIM, HEAD mask (primary)")
    table("psnr_person", "PSNR (dB), PERSON mask")
    table("ssim_person", "SSIM, PERSON mask")
    if result.config.identity:
        table("id_dist_target", "Identity distance to the target (dlib, lower is better; no mask: face crop)")
        table("id_dist_ref", "Identity distance to the reference (dlib; no mask: face crop)")
    if result.config.landmarks:
        table("lmk_err_pct", "Landmark error, % of inter-ocular distance (no mask: face mesh)")
        L.append("The reenacted avatar takes its geometry from the target's own landmarks, so for raw/refined this "
                 "measures how well the picture keeps that geometry (renderer, refiner), not pose prediction; "
                 "for the baseline it measures the head motion between the two frames.")
        L.append("")
        L.append("Face-mesh failures on the output (no face found), share of pairs:")
        L.append("")
        L.append("| method | " + " | ".join(f"{lab} deg" for lab in labels) + " | all |")
        L.append("|---|" + "---|" * (len(labels) + 1))
        for m in methods:
            cells = [summary["per_bin"][lab][m]["lmk_fail_rate"] for lab in labels] + [summary["overall"][m]["lmk_fail_rate"]]
            L.append(f"| {m} | " + " | ".join("–" if c is None else f"{100 * c:.0f}%" for c in cells) + " |")
        L.append("")

    L.append("## Per clip: PSNR (dB) / SSIM, HEAD mask, all bins")
    L.append("")
    L.append("| clip | pairs | " + " | ".join(methods) + " |")
    L.append("|---|---|" + "---|" * len(methods))
    for clip, groups in summary["per_clip"].items():
        g = groups["all"]
        cells = [f"{_cell(g[m]['psnr_head'], 2)} / {_cell(g[m]['ssim_head'], 3)}" for m in methods]
        L.append(f"| {clip} | {g[methods[0]]['n_pairs']} | " + " | ".join(cells) + " |")
    L.append("")

    if result.flicker:
        L.append(f"## Temporal flicker, slow orbit (yaw -{result.config.flicker_yaw_deg:g}..+"
                 f"{result.config.flicker_yaw_deg:g} deg in {result.config.flicker_step_deg:g} deg steps)")
        L.append("")
        L.append("Mean |frame t - frame t+1 warped back| inside the rendered head (alpha > 0.5), in 8-bit levels "
                 "(x255); motion from DIS optical flow on the raw renders, occlusions left out by a "
                 "forward-backward check. refined - raw = flicker the refiner adds.")
        L.append("")
        keys = [k for k in ("raw", "refined", "refined_minus_raw") if any(k in f for f in result.flicker.values())]
        L.append("| clip | " + " | ".join(keys) + " |")
        L.append("|---|" + "---|" * len(keys))
        for clip, f in result.flicker.items():
            L.append(f"| {clip} | " + " | ".join("–" if f.get(k) is None else f"{255 * f[k]:.2f}" for k in keys) + " |")
        L.append("")
    elif result.config.flicker:
        L.append("Flicker: not measured (no method renders an orbit).")
        L.append("")

    if result.skipped:
        L.append("## Skipped clips")
        L.append("")
        for s in result.skipped:
            L.append(f"- {s['clip']}: {s['reason']}")
        L.append("")
    if result.sheets or result.records:
        L.append("## Pictures")
        L.append("")
        L.append("Contact sheets (reference | raw | refined | target with the head mask outlined): `sheets/<clip>.png`. "
                 "Metric against |yaw difference|: `plots/<metric>.png`.")
        L.append("")
    return "\n".join(L)


def write_results(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and plots/<metric>.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    doc = {
        "meta": {**result.meta, "config": asdict(result.config), "methods": list(result.methods),
                 "metrics": METRICS, "masks": {"head": "target head region (face oval grown upward, "
                                               "intersected with the person mask)", "person": "target person mask"}},
        "clips": result.clips,
        "skipped": result.skipped,
        "overall": summary["overall"],
        "per_bin": summary["per_bin"],
        "per_clip": summary["per_clip"],
        "flicker": result.flicker,
        "pairs": result.records,
        "sheets": result.sheets,
    }
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    paths["md"].write_text(results_markdown(result, summary))
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    for metric, description in METRICS.items():
        series = series_from_records(result.records, result.methods, metric)
        if not any(np.isfinite(s.y).any() for s in series):
            continue
        img = scatter_plot(series, description[:80], "|yaw difference| (deg)", metric, bins=result.config.bins)
        paths[f"plot_{metric}"] = plot_dir / f"{metric}.png"
        save_png(paths[f"plot_{metric}"], img)
    return paths
