"""Aggregation of pair records: pair-weighted mean, median, std and n of every metric, per
angle bin, per clip (or set) and overall."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.evaluation.clips import DEFAULT_BINS, bin_label
from models.evaluation.scoring import METRICS

__all__ = ["aggregate"]


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    vals = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if vals.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(vals.mean()), "median": float(np.median(vals)), "std": float(vals.std()), "n": int(vals.size)}


def _group(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        rows = [r["methods"][m] for r in records if m in r["methods"]]
        out[m] = {k: _stats([row.get(k) for row in rows]) for k in METRICS}
        tried = [row["lmk_failed"] for row in rows if row.get("lmk_failed") is not None]
        out[m]["lmk_fail_rate"] = float(np.mean(tried)) if tried else None
        out[m]["n_pairs"] = len(rows)
    return out


def aggregate(
    records: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    group_key: str = "clip",
) -> dict[str, Any]:
    """Pair-weighted statistics (mean, median, std, n) of every metric:
    {"per_bin": {bin: {method: ...}}, "per_<group_key>": {group: {"all": ..., bin: ...}}, "overall": {method: ...}},
    groups being the records' values of ``group_key`` ("clip", or "set" for multi-camera sets)."""
    labels = [bin_label(b) for b in bins]
    per_bin = {lab: _group([r for r in records if r["bin"] == lab], methods) for lab in labels}
    per_group: dict[str, Any] = {}
    for group in dict.fromkeys(r[group_key] for r in records):
        rows = [r for r in records if r[group_key] == group]
        per_group[group] = {"all": _group(rows, methods)}
        for lab in labels:
            sub = [r for r in rows if r["bin"] == lab]
            if sub:
                per_group[group][lab] = _group(sub, methods)
    return {"per_bin": per_bin, f"per_{group_key}": per_group, "overall": _group(records, methods)}
