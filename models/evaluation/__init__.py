"""Evaluation of novel views against real pictures: the harness, metrics, reports, clip index."""
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
from models.evaluation.scoring import METRICS

__all__ = [
    "METRICS", "AvatarFraming", "AvatarRunner", "CallableRunner", "EvalConfig", "EvalResult", "FaceBoxFraming",
    "Framing", "MethodRunner", "PairCase", "UnusableClipError", "aggregate", "evaluate", "results_markdown",
    "write_results",
]
