"""Evaluation of novel views against real pictures: the harness, metrics, reports, clip index,
multi-camera sets."""
from models.evaluation.aggregate import aggregate
from models.evaluation.harness import EvalConfig, EvalResult, UnusableClipError, evaluate
from models.evaluation.report import results_markdown, write_results
from models.evaluation.runners import (
    AvatarFraming,
    AvatarRunner,
    CallableRunner,
    FaceBoxFraming,
    Framing,
    MethodRunner,
    PairCase,
)
from models.evaluation.multiview import MultiviewConfig, find_sets
from models.evaluation.scoring import METRICS

__all__ = [
    "METRICS", "AvatarFraming", "AvatarRunner", "CallableRunner", "EvalConfig", "EvalResult", "FaceBoxFraming",
    "Framing", "MethodRunner", "MultiviewConfig", "PairCase", "UnusableClipError", "aggregate", "evaluate",
    "find_sets", "results_markdown", "write_results",
]
