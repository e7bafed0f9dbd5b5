"""What a training run writes as it goes: log.jsonl (one JSON object per log step and per
validation) and TensorBoard (scalars, sample images), on the main rank only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger("models.training.trainer")

PERF_KEYS = ("lr", "step_s", "data_s", "samples_per_s", "grad_norm")
"""Logged per step beside the losses: learning rate, seconds per step, seconds waiting for data, throughput."""


def image_grid(columns: list[Tensor]) -> Tensor:
    """Columns of images, each [N, 3, S, S] in [0, 1] -> one picture [3, N S, len(columns) S]."""
    return torch.cat([torch.cat(list(col.float().clamp(0, 1).cpu()), dim=1) for col in columns], dim=2)


class Window:
    """Running sums of scalars between log steps."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()


class RunLog:
    """The run folder's log.jsonl and logs/ (TensorBoard, opened on first use; off with one
    log line when tensorboard is not installed). Only the main rank writes."""

    def __init__(self, out_dir: Path, is_main: bool):
        self.out_dir = out_dir
        self.is_main = is_main
        self._writer = None
        self._writer_failed = False

    def writer(self):
        if self._writer is None and not self._writer_failed and self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer_failed = True
                logger.info("TensorBoard logs off: tensorboard is not installed (scalars still go to log.jsonl)")
                return None
            self._writer = SummaryWriter(str(self.out_dir / "logs"))
        return self._writer

    def append(self, record: dict) -> None:
        with open(self.out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def scalars(self, step: int, stage: int, wall_s: float, means: dict[str, float]) -> dict:
        """One log step's means (stage 0-based) -> log.jsonl and TensorBoard; returns the record."""
        record = {"step": step, "stage": stage + 1, "wall_s": round(wall_s, 3), **{k: float(v) for k, v in means.items()}}
        self.append(record)
        writer = self.writer()
        if writer is not None:
            for k, v in means.items():
                group = "lr" if k == "lr" else ("perf" if k in PERF_KEYS else "loss")
                writer.add_scalar(f"{group}/{k}", v, step)
            if "step_s" in means and means["step_s"] > 0:
                writer.add_scalar("perf/it_per_s", 1.0 / means["step_s"], step)
            writer.add_scalar("stage", stage + 1, step)
        return record

    def validation(self, step: int, metrics: dict[str, float]) -> None:
        self.append({"step": step, **{f"val/{k}": v for k, v in metrics.items()}})
        writer = self.writer()
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(f"val/{k}", v, step)

    def images(self, tag: str, columns: list[Tensor], step: int) -> None:
        writer = self.writer()
        if writer is not None:
            writer.add_image(tag, image_grid(columns), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
