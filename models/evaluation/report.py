"""What a run leaves behind: results.json, results.md (the tables, each naming its mask; clip pairs
and multi-camera targets in separate sections) and plots/, from an EvalResult."""
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


_DIGITS = {"psnr_head": 2, "psnr_head_gain": 2, "psnr_person": 2, "ssim_head": 3, "ssim_person": 3, "id_dist_target": 3,
           "id_dist_ref": 3, "lmk_err_pct": 1}


def _metric_tables(L: list[str], summary: Mapping[str, Any], labels: list[str], methods: tuple[str, ...],
                   config: Any) -> None:
    """The per-bin tables of every metric (### headings), each naming its mask."""

    def table(metric: str, title: str) -> None:
        L.append(f"### {title}")
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
    table("psnr_head_gain", "PSNR (dB), HEAD mask, each colour channel's gain fitted to the target (a diagnostic: "
          "the error left without the cameras' colour balance; not the score)")
    table("psnr_person", "PSNR (dB), PERSON mask")
    table("ssim_person", "SSIM, PERSON mask")
    if config.identity:
        table("id_dist_target", "Identity distance to the target (dlib, lower is better; no mask: face crop)")
        table("id_dist_ref", "Identity distance to the reference (dlib; no mask: face crop)")
    if config.landmarks:
        table("lmk_err_pct", "Landmark error, % of inter-ocular distance (no mask: face mesh)")
        L.append("The reenacted avatar takes its geometry from the target's own landmarks, so for raw/refined this "
                 "measures how well the picture keeps that geometry (renderer, refiner), not pose prediction; "
                 "for the baseline it measures the head motion between the two pictures.")
        L.append("")
        L.append("Face-mesh failures on the output (no face found), share of pairs:")
        L.append("")
        L.append("| method | " + " | ".join(f"{lab} deg" for lab in labels) + " | all |")
        L.append("|---|" + "---|" * (len(labels) + 1))
        for m in methods:
            cells = [summary["per_bin"][lab][m]["lmk_fail_rate"] for lab in labels] + [summary["overall"][m]["lmk_fail_rate"]]
            L.append(f"| {m} | " + " | ".join("–" if c is None else f"{100 * c:.0f}%" for c in cells) + " |")
        L.append("")


def _bullets(L: list[str], title: str, items: list[str]) -> None:
    if items:
        L += [f"### {title}", ""] + [f"- {item}" for item in items] + [""]


def _clip_section(L: list[str], result: EvalResult, summary: Mapping[str, Any]) -> None:
    config, methods = result.config, result.methods
    L += ["## Reenactment (other frame of a clip)", "",
          f"{len(result.clips)} clip(s) evaluated, {len(result.skipped)} skipped, {len(result.records)} pairs. "
          "The most frontal frame of each clip is the reference; targets binned by |yaw difference| "
          f"(degrees), at most {config.max_pairs_per_bin} per bin and clip, excluding frames within "
          f"{config.min_gap_frames} frames or {config.min_yaw_diff_deg} deg of the reference.", ""]
    _metric_tables(L, summary, [bin_label(b) for b in config.bins], methods, config)

    L.append("### Per clip: PSNR (dB) / SSIM, HEAD mask, all bins")
    L.append("")
    L.append("| clip | pairs | " + " | ".join(methods) + " |")
    L.append("|---|---|" + "---|" * len(methods))
    for clip, groups in summary["per_clip"].items():
        g = groups["all"]
        cells = [f"{_cell(g[m]['psnr_head'], 2)} / {_cell(g[m]['ssim_head'], 3)}" for m in methods]
        L.append(f"| {clip} | {g[methods[0]]['n_pairs']} | " + " | ".join(cells) + " |")
    L.append("")

    if result.flicker:
        L.append(f"### Temporal flicker, slow orbit (yaw -{config.flicker_yaw_deg:g}..+"
                 f"{config.flicker_yaw_deg:g} deg in {config.flicker_step_deg:g} deg steps)")
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
    elif config.flicker:
        L.append("Flicker: not measured (no method renders an orbit).")
        L.append("")

    _bullets(L, "Skipped clips", [f"{s['clip']}: {s['reason']}" for s in result.skipped])


def _set_section(L: list[str], result: EvalResult, summary: Mapping[str, Any]) -> None:
    config, methods = result.config, result.methods
    mv = config.multiview
    L += ["## Multi-camera (same moment)", "",
          f"{len(result.sets)} set(s) evaluated, {len(result.set_skipped)} skipped, {len(result.set_records)} targets. "
          "Per set the reference is the view it names, else its most frontal one (smallest |yaw| + "
          f"{mv.pitch_weight:g} |pitch|, measured); the targets are its other views with a face, each mapped into the "
          "reference camera (its head origin on the reference's, at the same pixels per metre) and then scored like a "
          "clip pair. Bins: the angle between the two view directions, acos(cos dyaw cos dpitch), with dyaw and dpitch "
          "from the cameras where the set gives them, else measured (MediaPipe head pose; it reads large yaws "
          "15-20 % low); each target's sources are listed below.", ""]
    _metric_tables(L, summary, [bin_label(b) for b in mv.bins], methods, config)

    L.append("### Per set: PSNR (dB) / SSIM, HEAD mask, all bins")
    L.append("")
    L.append("| set | reference | targets | " + " | ".join(methods) + " | angles |")
    L.append("|---|---|---|" + "---|" * (len(methods) + 1))
    for name, groups in summary["per_set"].items():
        g, info = groups["all"], result.set_info.get(name, {})
        cells = [f"{_cell(g[m]['psnr_head'], 2)} / {_cell(g[m]['ssim_head'], 3)}" for m in methods]
        L.append(f"| {name} | {info.get('reference', '?')} | {g[methods[0]]['n_pairs']} | " + " | ".join(cells)
                 + f" | {info.get('angles', '')} |")
    L.append("")

    L.append("### Targets: angle to the reference and PSNR (dB), HEAD mask")
    L.append("")
    L.append("| set | target | angle deg | yaw diff (source) | pitch diff (source) | " + " | ".join(methods) + " |")
    L.append("|---|---|---|---|---|" + "---|" * len(methods))
    for r in result.set_records:
        cells = [_cell({"mean": r["methods"][m].get("psnr_head")}, 2) if m in r["methods"] else "–" for m in methods]
        L.append(f"| {r['set']} | {r['tgt']} | {r['angle_deg']:.1f} | {r['yaw_diff_deg']:+.1f} ({r['yaw_source']}) | "
                 f"{r['pitch_diff_deg']:+.1f} ({r['pitch_source']}) | " + " | ".join(cells) + " |")
    L.append("")

    _bullets(L, "Views that are not targets", [f"{s['set']} / {s['view']}: {s['reason']}" for s in result.skipped_views])
    _bullets(L, "Skipped sets", [f"{s['set']}: {s['reason']}" for s in result.set_skipped])


def results_markdown(
    result: EvalResult, summary: Mapping[str, Any] | None = None, set_summary: Mapping[str, Any] | None = None
) -> str:
    """The tables of results.md (each says which mask it uses): clip pairs and multi-camera targets apart."""
    L: list[str] = ["# Novel-view evaluation", ""]
    L.append(f"Crop size {result.config.size} px; methods: {', '.join(result.methods)}. Means over pairs "
             "(every pair weighs the same); n = pairs.")
    for note in result.meta.get("notes", []):
        L.append(f"- {note}")
    L.append("")
    if result.clips or result.skipped:
        _clip_section(L, result, summary or result.summary())
    if result.sets or result.set_skipped:
        _set_section(L, result, set_summary or result.set_summary())
    if result.sheets or result.records or result.set_records:
        L.append("## Pictures")
        L.append("")
        L.append("Contact sheets (reference | raw | refined | target with the head mask outlined): `sheets/<clip>.png`, "
                 "`sheets/multiview/<set>.png`. Metric against the angle: `plots/<metric>.png` (clips, |yaw "
                 "difference|), `plots/multiview_<metric>.png` (sets, view angle).")
        L.append("")
    return "\n".join(L)


def _plots(records: list[dict[str, Any]], methods: tuple[str, ...], bins, x_key: str, xlabel: str, folder: Path,
           prefix: str) -> dict[str, Path]:
    out = {}
    xs = [r[x_key] for r in records]
    shown = tuple(b for b in bins if b[1] < 180.0 or (xs and b[0] <= max(xs)))  # no empty open-ended bin
    for metric, description in METRICS.items():
        series = series_from_records(records, methods, metric, x_key=x_key)
        if not any(np.isfinite(s.y).any() for s in series):
            continue
        img = scatter_plot(series, description[:80], xlabel, metric, bins=shown)
        out[f"plot_{prefix}{metric}"] = folder / f"{prefix}{metric}.png"
        save_png(out[f"plot_{prefix}{metric}"], img)
    return out


def write_results(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and plots/<metric>.png (clips), plots/multiview_<metric>.png (sets)
    under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, set_summary = result.summary(), result.set_summary()
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
        "multiview": {
            "kind": "multi-camera (same moment); bins: angle between the view directions",
            "sets": result.sets,
            "skipped": result.set_skipped,
            "skipped_views": result.skipped_views,
            "info": result.set_info,
            "overall": set_summary["overall"],
            "per_bin": set_summary["per_bin"],
            "per_set": set_summary["per_set"],
            "targets": result.set_records,
            "sheets": result.set_sheets,
        },
    }
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    paths["md"].write_text(results_markdown(result, summary, set_summary))
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    paths.update(_plots(result.records, result.methods, result.config.bins, "abs_yaw_diff_deg",
                        "|yaw difference| (deg)", plot_dir, ""))
    paths.update(_plots(result.set_records, result.methods, result.config.multiview.bins, "angle_deg",
                        "angle between the views (deg)", plot_dir, "multiview_"))
    return paths
