"""The methods under evaluation: the reference's crop camera every scored picture lives in
(Framing: FaceBoxFraming, AvatarFraming) and the runners that make the methods' pictures for a
(reference, target) pair (MethodRunner: CallableRunner, AvatarRunner)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np

from models.evaluation.clips import Pair
from models.face.analysis import FaceObservation
from models.geometry.camera import OrbitPose

__all__ = [
    "BASELINE", "Framing", "FaceBoxFraming", "AvatarFraming", "PairCase", "MethodRunner", "CallableRunner", "AvatarRunner",
]

BASELINE = "baseline"
"""The method every run has: the reference frame unchanged (framing.source_view())."""


class Framing(Protocol):
    """The reference's crop camera: where every scored picture lives."""

    size: int

    def crop(self, image: np.ndarray) -> np.ndarray:
        """A source-camera picture [H, W] or [H, W, C] (uint8 or float) -> [S, S] or [S, S, C] float32
        (uint8 scaled to [0, 1], float kept)."""

    def source_view(self) -> np.ndarray:
        """The reference as shown by the baseline: [S, S, 3] float32 in [0, 1]."""


class FaceBoxFraming:
    """Square crop around the reference face (no avatar needed).

    Side = scale * h, centre = the mesh's bounding-box centre moved down by
    drop * h, where h is the height of the face mesh (forehead to chin): the
    same proportions as models.avatar's default crop camera.
    """

    def __init__(self, ref_frame: np.ndarray, ref_obs: FaceObservation, size: int, scale: float = 2.6, drop: float = 0.15):
        xy = ref_obs.landmarks_px[:468, :2].astype(np.float64)
        lo, hi = xy.min(0), xy.max(0)
        h = float(hi[1] - lo[1])
        cx, cy = (lo + hi) / 2.0
        cy += drop * h
        side = scale * h
        s = size / side
        # Pixel centres at (j + 0.5): x_dst + 0.5 = s (x_src + 0.5 - cx) + S / 2.
        self._M = np.array([[s, 0.0, s * (0.5 - cx) + size / 2.0 - 0.5], [0.0, s, s * (0.5 - cy) + size / 2.0 - 0.5]])
        self.size = size
        self._ref = ref_frame

    def crop(self, image: np.ndarray) -> np.ndarray:
        img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        out = cv2.warpAffine(img, self._M, (self.size, self.size), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out.reshape((self.size, self.size) + img.shape[2:])

    def source_view(self) -> np.ndarray:
        return self.crop(self._ref)


class AvatarFraming:
    """The crop camera of a models.avatar.Avatar (crop / source_view)."""

    def __init__(self, avatar: Any, size: int):
        self.avatar = avatar
        self.size = size

    def crop(self, image: np.ndarray) -> np.ndarray:
        out = self.avatar.crop(image, self.size)  # [C, S, S]
        arr = out.detach().float().cpu().numpy().transpose(1, 2, 0)
        return arr[..., 0] if image.ndim == 2 else arr

    def source_view(self) -> np.ndarray:
        return _hwc(self.avatar.source_view(self.size))


def _hwc(t: Any) -> np.ndarray:
    """torch [3, S, S] or numpy [S, S, 3] -> numpy float32 [S, S, 3] clipped to [0, 1]."""
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy().transpose(1, 2, 0)
    return np.clip(np.asarray(t, np.float32), 0.0, 1.0)


@dataclass(frozen=True)
class PairCase:
    """Everything a method gets for one (reference, target) pair."""

    clip: str
    pair: Pair
    ref_frame: np.ndarray = field(repr=False)  # [H, W, 3] uint8
    ref_obs: FaceObservation = field(repr=False)
    tgt_frame: np.ndarray = field(repr=False)  # [H, W, 3] uint8
    tgt_obs: FaceObservation = field(repr=False)
    framing: Framing = field(repr=False)

    @property
    def size(self) -> int:
        return self.framing.size


class MethodRunner(Protocol):
    """Produces the pictures of the non-baseline methods."""

    methods: tuple[str, ...]
    """Names of the pictures :meth:`render` returns."""

    def framing(self, ref_frame: np.ndarray, ref_obs: FaceObservation, size: int) -> Framing:
        """The crop camera of a reference frame (called once per reference)."""

    def render(self, case: PairCase) -> dict[str, np.ndarray]:
        """{method: [S, S, 3] float in [0, 1]} for one pair, in ``case.framing``."""

    def orbit(self, framing: Framing, poses: Sequence[OrbitPose]) -> dict[str, np.ndarray] | None:
        """A slow orbit around the reference: {method: [V, S, S, 3] float, "alpha": [V, S, S]}, or None."""


class CallableRunner:
    """Methods given as functions ``fn(case: PairCase) -> [S, S, 3] float in [0, 1]``,
    framed by :class:`FaceBoxFraming`. No orbit (no flicker)."""

    def __init__(self, methods: Mapping[str, Callable[[PairCase], np.ndarray]] | None = None, crop_scale: float = 2.6):
        self._fns = dict(methods or {})
        if BASELINE in self._fns:
            raise ValueError(f"expected method names other than '{BASELINE}', got it among {list(self._fns)}")
        self.methods = tuple(self._fns)
        self.crop_scale = crop_scale

    def framing(self, ref_frame, ref_obs, size) -> Framing:
        return FaceBoxFraming(ref_frame, ref_obs, size, scale=self.crop_scale)

    def render(self, case: PairCase) -> dict[str, np.ndarray]:
        return {name: _hwc(fn(case)) for name, fn in self._fns.items()}

    def orbit(self, framing, poses):
        return None


class AvatarRunner:
    """The avatar ("raw": reenactment render) and the refiner ("refined").

    raw picture for target t: build_avatar(frame s, obs s, geometry=obs t)
    rendered at OrbitPose() (the video camera). refined: refiner.refine(source
    view, raw, seen). The orbit for flicker renders the reference's own avatar.
    """

    def __init__(self, avatar_config: Any = None, refiner: Any = None, device: str = "cpu", refine_batch: int = 8,
                 seed: int = 0):
        import importlib
        import inspect

        avatar_mod = importlib.import_module("models.avatar")  # imported only when used

        self._av = avatar_mod
        self.config = avatar_config if avatar_config is not None else avatar_mod.AvatarConfig()
        self.refiner = refiner
        self.device = device
        self.refine_batch = refine_batch
        self.seed = seed
        self.methods = ("raw", "refined") if refiner is not None else ("raw",)
        self._render_size_arg = "render_size" in inspect.signature(avatar_mod.build_avatar).parameters
        self._generator = None
        if refiner is not None:
            params = inspect.signature(refiner.refine).parameters
            self._takes_generator = "generator" in params

    def _build(self, frame, obs, size, geometry=None):
        kwargs = {"render_size": size} if self._render_size_arg else {}
        return self._av.build_avatar(frame, obs, self.config, device=self.device, geometry=geometry, **kwargs)

    def framing(self, ref_frame, ref_obs, size) -> Framing:
        return AvatarFraming(self._build(ref_frame, ref_obs, size), size)

    def _refine(self, ref, views, seen):
        """ref [3, S, S], views [N, 3, S, S], seen [N, 1, S, S] -> [N, 3, S, S], one view per sample
        (as when streaming), in chunks of refine_batch; noise from one seeded generator per run."""
        import torch

        from models.refiner import refine_views

        if self._takes_generator and self._generator is None:
            self._generator = torch.Generator(device=views.device).manual_seed(self.seed)
        out = refine_views(self.refiner, ref, views[:, None], seen[:, None], batch=self.refine_batch, generator=self._generator)
        return out[:, 0].float()

    def render(self, case: PairCase) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            reenacted = self._build(case.ref_frame, case.ref_obs, case.size, geometry=case.tgt_obs)
            out = self._av.render_views(reenacted, [OrbitPose()], case.size)
            result = {"raw": _hwc(out.rgb[0])}
            if self.refiner is not None:
                ref = case.framing.avatar.source_view(case.size)
                result["refined"] = _hwc(self._refine(ref, out.rgb, out.seen)[0])
        return result

    def orbit(self, framing, poses):
        import torch

        with torch.inference_mode():
            out = self._av.render_views(framing.avatar, list(poses), framing.size)
            result = {
                "raw": out.rgb.float().cpu().numpy().transpose(0, 2, 3, 1).clip(0, 1),
                "alpha": out.alpha[:, 0].float().cpu().numpy(),
            }
            if self.refiner is not None:
                ref = framing.avatar.source_view(framing.size)
                refined = self._refine(ref, out.rgb, out.seen)
                result["refined"] = refined.float().cpu().numpy().transpose(0, 2, 3, 1).clip(0, 1)
        return result
