"""Shared fixtures. The product's tests read only the repository: small real pictures in
tests/data (see its README). Development data (../shared/data beside the checkout, or
$TELEPRESENCE_SHARED_DATA) is for tests whose whole point is that data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"


def shared_data_dir() -> Path:
    return Path(os.environ.get("TELEPRESENCE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "images").is_dir():
        pytest.skip(f"development data not found at {path} (set TELEPRESENCE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def test_data() -> Path:
    """tests/data: stills and a few frames of a head-turn clip, with their licence."""
    return TEST_DATA


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and it keeps OpenMP from stalling when other jobs share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A CPU Pipeline sets torch's (process-wide) thread count; later tests get the count back."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def analyzer():
    from models.face.analysis import FaceAnalyzer, FaceConfig

    with FaceAnalyzer(FaceConfig(static_image=True)) as fa:
        yield fa


# ---- GPU-only tests: marked `gpu`, skipped without CUDA, counted in one line at the end ----------------------
GPU_SKIP = "needs a CUDA device (runs on the GPU machine)"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    gpu = [r for r in skipped if GPU_SKIP in str(r.longrepr)]
    if gpu:
        terminalreporter.write_line(f"{len(gpu)} GPU-only tests skipped: no CUDA device on this machine")
    for report in skipped:
        if report not in gpu:  # any other skip is listed with its reason
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            terminalreporter.write_line(f"SKIPPED {report.nodeid}: {reason}")
