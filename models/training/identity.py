"""Identity distance with dlib's face embedding: a METRIC, not a loss.

dlib's ResNet face recogniser (``dlib_face_recognition_resnet_model_v1.dat``
from the face-recognition-models package; 128-d embedding, ~85 ms per face on
a 2-core CPU) runs in dlib's C++ code: no gradient reaches the refiner, so it
cannot be trained on. The trainer reports it on validation samples:

    d_id = || e(output) - e(target) ||_2      (dlib: same person below about 0.6)

Both embeddings use the face box found in the TARGET (dlib's HOG detector), so
the same region is compared; when the target shows no detectable face the box
of an avatar crop is assumed (models.avatar's default framing: face height
S / 2.6, centred horizontally, 0.15 face heights above the centre).

Without dlib (the GPU machine has none) the metric switches itself off with
one log line and returns None.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.pictures import to_rgb_uint8

logger = logging.getLogger(__name__)

EMBEDDING_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
SAME_PERSON_THRESHOLD = 0.6  # dlib's documented threshold for its 128-d embedding
_AVATAR_CROP_SCALE, _AVATAR_CROP_DROP = 2.6, 0.15  # models.avatar.AvatarConfig defaults


def _models_dir() -> Path | None:
    """The face_recognition_models data folder, found without importing the package
    (its __init__ needs pkg_resources, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class IdentityMetric:
    """dlib 128-d face-embedding distance between images (see module docstring)."""

    def __init__(self, models_dir: str | Path | None = None):
        self.available = False
        self.reason = ""
        try:
            import dlib
        except ImportError:
            self.reason = "dlib is not installed (pip install dlib-bin face-recognition-models)"
        else:
            folder = Path(models_dir) if models_dir is not None else _models_dir()
            if folder is None or not (folder / EMBEDDING_FILE).is_file() or not (folder / LANDMARKS_FILE).is_file():
                self.reason = f"no {EMBEDDING_FILE} / {LANDMARKS_FILE} found (pip install face-recognition-models), looked in {folder}"
            else:
                self._detector = dlib.get_frontal_face_detector()
                self._landmarks = dlib.shape_predictor(str(folder / LANDMARKS_FILE))
                self._encoder = dlib.face_recognition_model_v1(str(folder / EMBEDDING_FILE))
                self._rect = dlib.rectangle
                self.available = True
        if not self.available:
            logger.info("identity metric off: %s", self.reason)

    @staticmethod
    def _to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
        """[3, H, W] float tensor in [0, 1] or [H, W, 3] uint8 -> contiguous [H, W, 3] uint8."""
        if isinstance(image, Tensor):
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
            image = to_rgb_uint8(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.shape} {image.dtype}")
        return np.ascontiguousarray(image)

    def face_box(self, image: np.ndarray):
        """The largest face dlib's HOG detector finds, else the avatar-crop default box."""
        found = list(self._detector(image, 1))
        if found:
            return max(found, key=lambda r: r.width() * r.height())
        h, w = image.shape[:2]
        face = min(h, w) / _AVATAR_CROP_SCALE
        cx, cy = w / 2, h / 2 - _AVATAR_CROP_DROP * face
        return self._rect(int(cx - face / 2), int(cy - face / 2), int(cx + face / 2), int(cy + face / 2))

    def embed(self, image: Tensor | np.ndarray, box=None) -> np.ndarray | None:
        """128-d embedding [128] of the face in ``box`` (default: face_box), or None when off."""
        if not self.available:
            return None
        img = self._to_uint8(image)
        box = box if box is not None else self.face_box(img)
        shape = self._landmarks(img, box)
        return np.asarray(self._encoder.compute_face_descriptor(img, shape), dtype=np.float32)

    def distance(self, output: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float | None:
        """|| e(output) - e(target) || with the target's face box, or None when off."""
        if not self.available:
            return None
        tgt = self._to_uint8(target)
        box = self.face_box(tgt)
        return float(np.linalg.norm(self.embed(output, box) - self.embed(tgt, box)))

    def batch_distance(self, outputs: Tensor, targets: Tensor) -> list[float] | None:
        """outputs, targets [N, 3, H, W] in [0, 1] -> N distances, or None when off."""
        if not self.available:
            return None
        if outputs.shape != targets.shape or outputs.ndim != 4:
            raise ValueError(f"expected outputs and targets [N, 3, H, W] of one shape, got {tuple(outputs.shape)} and {tuple(targets.shape)}")
        with torch.no_grad():
            return [self.distance(o, t) for o, t in zip(outputs, targets)]
