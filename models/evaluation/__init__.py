"""Evaluation of novel views against real pictures: the harness, metrics, reports, clip index."""
from models.evaluation.harness import (
    METRICS,
    AvatarFraming,
    AvatarRunner,
    CallableRunner,
    EvalConfig,
    EvalResult,
    FaceBoxFraming,
    Framing,
    MethodRunner,
    PairCase,
    UnusableClipError,
    aggregate,
    evaluate,
    results_markdown,
    write_results,
)

__all__ = [
    "METRICS", "AvatarFraming", "AvatarRunner", "CallableRunner", "EvalConfig", "EvalResult", "FaceBoxFraming",
    "Framing", "MethodRunner", "PairCase", "UnusableClipError", "aggregate", "evaluate", "results_markdown",
    "write_results",
]
