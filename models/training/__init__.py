"""Refiner training: losses, discriminator, pair data, captures, the trainer (docs/training.md)."""

from .data import TensorPairDataset, check_sample, collate, synthetic_pairs
from .trainer import TrainConfig, Trainer, latest_checkpoint

__all__ = ["TensorPairDataset", "TrainConfig", "Trainer", "check_sample", "collate", "latest_checkpoint", "synthetic_pairs"]
