"""Two `telepresence eval` runs, or two methods of one run, compared on the pictures they share: per bin and
metric, both means, the mean per-picture difference with a bootstrap interval, and how many pictures moved each way.

A difference of two bin means says nothing of its noise: the camera sets' 8 targets at 30-45 degrees spread over
15-23 dB, so whether a 0.2 dB change of the mean is a change depends on how consistently the targets moved. Paired
over the same pictures (a clip pair by its clip, reference and target frames; a camera target by its set, reference
and target views), the spread of the per-picture differences sets the interval: the mean of n differences d_i,
resampled with replacement ``samples`` times, its (1 - level) / 2 and (1 + level) / 2 quantiles (percentile
bootstrap). An interval that holds 0 is a change the pictures do not show.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DEFAULT_METRICS", "HIGHER_IS_BETTER", "Comparison", "ComparisonRow", "compare", "comparison_markdown",
           "pictures"]

HIGHER_IS_BETTER: dict[str, bool] = {
    "psnr_head": True, "ssim_head": True, "psnr_head_gain": True, "psnr_person": True, "ssim_person": True,
    "id_dist_target": False, "lmk_err_pct": False,
}
"""The metrics a comparison can take (models.evaluation.scoring.METRICS, less the distance to the reference, which is
neither better nor worse), and which way is better."""

DEFAULT_METRICS: tuple[str, ...] = ("psnr_head", "ssim_head", "id_dist_target", "lmk_err_pct")

_KINDS = {"clips": "reenactment pairs (another frame of a clip)", "multiview": "multi-camera targets (another camera, same moment)"}
_DIGITS = {"psnr_head": 2, "psnr_head_gain": 2, "psnr_person": 2, "ssim_head": 3, "ssim_person": 3, "id_dist_target": 3,
           "lmk_err_pct": 2}


def pictures(results: Mapping[str, Any], method: str) -> dict[tuple, tuple[str, Mapping[str, Any]]]:
    """The pictures a run scored with ``method``: key (kind, clip or set, reference, target) -> (bin label, that
    method's metrics). results: a loaded results.json of `telepresence eval` (its "pairs" and "multiview" ->
    "targets" records). Pictures the method did not run on are left out."""
    out: dict[tuple, tuple[str, Mapping[str, Any]]] = {}
    for rec in results.get("pairs") or []:
        metrics = (rec.get("methods") or {}).get(method)
        if metrics is not None:
            out[("clips", rec["clip"], rec["ref"], rec["tgt"])] = (rec["bin"], metrics)
    for rec in (results.get("multiview") or {}).get("targets") or []:
        metrics = (rec.get("methods") or {}).get(method)
        if metrics is not None:
            out[("multiview", rec["set"], rec["ref"], rec["tgt"])] = (rec["bin"], metrics)
    return out


@dataclass(frozen=True)
class ComparisonRow:
    """One bin (or "all") and metric of one kind of picture."""

    kind: str
    """"clips" or "multiview"."""
    bin: str
    metric: str
    n: int
    """pictures with the metric in both runs"""
    before: float | None
    after: float | None
    """the two means over those n pictures"""
    diff: float | None
    """mean of after - before, picture by picture (= after - before)"""
    low: float | None
    high: float | None
    """the bootstrap interval of ``diff``; None below 3 pictures"""
    better: int
    worse: int
    """pictures that moved the better / worse way (HIGHER_IS_BETTER), by more than float rounding"""


@dataclass(frozen=True)
class Comparison:
    rows: list[ComparisonRow]
    level: float
    samples: int
    only_before: dict[str, int] = field(default_factory=dict)
    only_after: dict[str, int] = field(default_factory=dict)
    """per kind, pictures one side scored and the other did not (left out of every row)"""
    bins_differ: int = 0
    """shared pictures binned differently by the two runs (the first run's bin is used)"""


def _bin_order(label: str) -> float:
    return float(label.split("-")[0].rstrip("+")) if label != "all" else float("inf")


def _interval(diffs: np.ndarray, samples: int, level: float, rng: np.random.Generator) -> tuple[float | None, float | None]:
    if diffs.size < 3:
        return None, None
    means = diffs[rng.integers(0, diffs.size, size=(samples, diffs.size))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def compare(before: Mapping[tuple, tuple[str, Mapping[str, Any]]], after: Mapping[tuple, tuple[str, Mapping[str, Any]]],
            metrics: Sequence[str] = DEFAULT_METRICS, samples: int = 2000, level: float = 0.95,
            seed: int = 0) -> Comparison:
    """Paired comparison of two :func:`pictures` maps, per kind and bin (and over all bins). samples: bootstrap
    resamples; level in (0, 1): the interval's coverage; seed: the resampling's (the same inputs give the same
    interval)."""
    unknown = [m for m in metrics if m not in HIGHER_IS_BETTER]
    if unknown:
        raise ValueError(f"expected metrics among {sorted(HIGHER_IS_BETTER)}, got {unknown}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"expected a level in (0, 1), got {level}")
    if samples < 1:
        raise ValueError(f"expected at least 1 bootstrap sample, got {samples}")
    shared = sorted(set(before) & set(after), key=str)
    only_before: dict[str, int] = {}
    only_after: dict[str, int] = {}
    for key in set(before) - set(after):
        only_before[key[0]] = only_before.get(key[0], 0) + 1
    for key in set(after) - set(before):
        only_after[key[0]] = only_after.get(key[0], 0) + 1
    rng = np.random.default_rng(seed)
    rows: list[ComparisonRow] = []
    for kind in _KINDS:
        keys = [k for k in shared if k[0] == kind]
        if not keys:
            continue
        labels = sorted({before[k][0] for k in keys}, key=_bin_order) + ["all"]
        for metric in metrics:
            sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
            for label in labels:
                pairs = [(before[k][1].get(metric), after[k][1].get(metric)) for k in keys
                         if label == "all" or before[k][0] == label]
                pairs = [(b, a) for b, a in pairs if b is not None and a is not None]
                if not pairs:
                    continue
                b, a = np.array(pairs, dtype=np.float64).T
                d = a - b
                low, high = _interval(d, samples, level, rng)
                moved = sign * d
                rows.append(ComparisonRow(kind, label, metric, len(pairs), float(b.mean()), float(a.mean()),
                                          float(d.mean()), low, high, int((moved > 1e-9).sum()), int((moved < -1e-9).sum())))
    differ = sum(1 for k in shared if before[k][0] != after[k][0])
    return Comparison(rows, level, samples, only_before, only_after, differ)


def _number(x: float | None, digits: int, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def comparison_markdown(comp: Comparison, before_label: str, after_label: str) -> str:
    """The comparison as Markdown: one table per kind of picture, a row per metric and bin."""
    L = [f"# {after_label} against {before_label}", "",
         f"Per bin: both means over the pictures the two share, the mean per-picture difference (after - before) with its "
         f"{100 * comp.level:g} % bootstrap interval ({comp.samples} resamples; – below 3 pictures), and how many "
         f"pictures moved the better and the worse way. An interval that holds 0: no change the pictures show.", ""]
    for kind, title in _KINDS.items():
        rows = [r for r in comp.rows if r.kind == kind]
        extra = []
        if comp.only_before.get(kind):
            extra.append(f"{comp.only_before[kind]} only in {before_label}")
        if comp.only_after.get(kind):
            extra.append(f"{comp.only_after[kind]} only in {after_label}")
        if not rows and not extra:
            continue
        L += [f"## {title}", ""]
        if extra:
            L += [f"Left out: {', '.join(extra)}.", ""]
        if not rows:
            L += ["No picture in common.", ""]
            continue
        L += ["| metric | bin | n | before | after | change | interval | better / worse |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            d = _DIGITS[r.metric]
            interval = "–" if r.low is None else f"[{r.low:+.{d}f}, {r.high:+.{d}f}]"
            bin_ = "**all**" if r.bin == "all" else r.bin
            L.append(f"| {r.metric} | {bin_} | {r.n} | {_number(r.before, d)} | {_number(r.after, d)} | "
                     f"{_number(r.diff, d, signed=True)} | {interval} | {r.better} / {r.worse} |")
        L.append("")
    if comp.bins_differ:
        L += [f"{comp.bins_differ} shared picture(s) fell in another bin in {after_label}: binned as in {before_label}.", ""]
    return "\n".join(L)
