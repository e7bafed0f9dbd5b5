"""Shared fixtures. Development data (real photos and clips) is read from
../shared/data beside the checkout, or from $TELEPRESENCE_SHARED_DATA."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("TELEPRESENCE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "images").is_dir():
        pytest.skip(f"development data not found at {path} (set TELEPRESENCE_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def analyzer():
    from telepresence.face import FaceAnalyzer, FaceConfig

    with FaceAnalyzer(FaceConfig(static_image=True)) as fa:
        yield fa
