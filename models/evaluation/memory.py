"""The appearance memory fed from a clip's frames (issue 20's reproducible entry): the frames before a
reference, minus excluded spans, through models.avatar.memory, as a live call would have fed it.
Used by `telepresence render --video` and by the evaluation's memory mode (MemoryRunner)."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from models.evaluation.clips import ClipIndex, VideoReadError
from models.evaluation.runners import AvatarRunner, PairCase, _hwc
from models.geometry.camera import OrbitPose

log = logging.getLogger(__name__)

__all__ = ["memory_frame_ids", "clip_memory", "MemoryRunner"]


def memory_frame_ids(index: ClipIndex, before: int, exclude_s: Sequence[tuple[float, float]] = (),
                     every: int = 1) -> list[int]:
    """The analysed frames with a face up to frame ``before`` (included: a live sender's memory has seen the
    current frame too), every ``every``-th of them (``before`` always), minus
    those whose time (frame id / fps, seconds) falls in any [start, end] of ``exclude_s``."""
    fps = index.fps or 30.0
    ids = [int(f) for f, ok in zip(index.frame_ids, index.found) if ok and f < before][::every]
    ids += [before] if index.found[index.position(before)] else []
    return [f for f in ids if not any(a <= f / fps <= b for a, b in exclude_s)]


def clip_memory(index: ClipIndex, frame_ids: Sequence[int], avatar_config: Any = None, device: str = "cpu",
                size: int = 256, memory_config: Any = None) -> Any:
    """A fresh models.avatar.memory.AppearanceMemory fed the given frames of the clip, in order (each
    frame's own avatar, built at ``size`` as the sender builds it). The video is decoded once, streamed."""
    import torch

    from models.avatar import AvatarConfig, build_avatar
    from models.avatar.memory import AppearanceMemory, MemoryConfig

    config = avatar_config if avatar_config is not None else AvatarConfig()
    memory = AppearanceMemory(memory_config or MemoryConfig(texels=max(32, size // 2)), device)
    wanted = sorted({int(f) for f in frame_ids})
    if not wanted:
        return memory
    wanted_set = set(wanted)
    cap = cv2.VideoCapture(str(index.path))
    if not cap.isOpened():
        raise VideoReadError(f"cannot open '{index.path}'")
    try:
        k, fed = 0, 0
        with torch.no_grad():  # not inference_mode: the memory's buffers are updated in place later
            while k <= wanted[-1]:
                if k not in wanted_set:
                    if not cap.grab():
                        break
                else:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                    avatar = build_avatar(rgb, index.observation(k), config, device=device, render_size=size)
                    memory.update(avatar)
                    fed += 1
                k += 1
    finally:
        cap.release()
    log.info("appearance memory: %d frames of '%s' fed, %.0f %% of the head filled", fed, index.name,
             100.0 * float(memory.fill_fraction()))
    return memory


class MemoryRunner(AvatarRunner):
    """AvatarRunner plus "memory": the raw reenactment render with an appearance memory attached, fed
    the clip's frames before the reference minus ``exclude_s`` seconds either side of the target (the
    target's own look never reaches the memory). Memories are rebuilt per distinct feed (targets whose
    window misses every fed frame share one)."""

    def __init__(self, *args, exclude_s: float = 0.5, every: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.methods = self.methods + ("memory",)
        self.exclude_s = exclude_s
        self.every = every
        self._indexes: dict[str, ClipIndex] = {}
        self._cached: tuple[tuple, Any] | None = None

    def add_clip(self, index: ClipIndex) -> None:
        """Make the clip's frames known to the memory mode (by the clip's name, as PairCase carries it)."""
        self._indexes[index.name] = index

    def render(self, case: PairCase) -> dict[str, np.ndarray]:
        import torch

        result = super().render(case)
        index = self._indexes[case.clip]
        t = case.pair.tgt / (index.fps or 30.0)
        ids = memory_frame_ids(index, case.pair.ref, [(t - self.exclude_s, t + self.exclude_s)], self.every)
        key = (case.clip, tuple(ids))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, clip_memory(index, ids, self.config, self.device, case.size))
        memory = self._cached[1]
        with torch.inference_mode():
            reenacted = self._build(case.ref_frame, case.ref_obs, case.size, geometry=case.tgt_obs)
            out = self._av.render_views(memory.attach(reenacted), [OrbitPose()], case.size)
        result["memory"] = _hwc(out.rgb[0])
        return result
