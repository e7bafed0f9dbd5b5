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

__all__ = ["memory_frame_ids", "ClipObservations", "clip_memory", "MemoryRunner", "steady_stretches", "memory_flicker"]


def memory_frame_ids(index: ClipIndex, before: int, exclude_s: Sequence[tuple[float, float]] = (),
                     every: int = 1) -> list[int]:
    """The analysed frames with a face up to frame ``before`` (included: a live sender's memory has seen the
    current frame too), every ``every``-th of them (``before`` always), minus
    those whose time (frame id / fps, seconds) falls in any [start, end] of ``exclude_s``."""
    fps = index.fps or 30.0
    ids = [int(f) for f, ok in zip(index.frame_ids, index.found) if ok and f < before][::every]
    ids += [before] if index.found[index.position(before)] else []
    return [f for f in ids if not any(a <= f / fps <= b for a, b in exclude_s)]


class ClipObservations:
    """What each analysed frame of a clip shows of the memory's atlas (models.avatar.memory.observe_texels of
    the frame's own avatar, built at ``size`` as the sender builds it), made once per frame and kept as
    uint8 on the host (5 bytes a texel): memories fed different frames of one clip (the evaluation's
    windows around each target) replay them instead of building every frame's avatar again."""

    def __init__(self, index: ClipIndex, avatar_config: Any = None, device: str = "cpu", size: int = 256,
                 memory_config: Any = None):
        from models.avatar import AvatarConfig
        from models.avatar.memory import MemoryConfig

        self.index = index
        self.config = avatar_config if avatar_config is not None else AvatarConfig()
        self.device = device
        self.size = size
        self.memory_config = memory_config or MemoryConfig(texels=max(32, size // 2))
        self._kept: dict[int, tuple[Any, Any]] = {}  # frame id -> (colour [T, 4] uint8, quality [T] uint8)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() + q.numel() for x, q in self._kept.values())

    def _observe(self, frame_ids: Sequence[int]) -> None:
        """Decode (streamed, once) and observe the frames not kept yet."""
        import torch

        from models.avatar import build_avatar
        from models.avatar.atlas import observe_texels
        from models.avatar.memory import AppearanceMemory

        wanted = sorted({int(f) for f in frame_ids} - set(self._kept))
        if not wanted:
            return
        wanted_set = set(wanted)
        probe = AppearanceMemory(self.memory_config, self.device)
        probe.allocate(self.config)
        cap = cv2.VideoCapture(str(self.index.path))
        if not cap.isOpened():
            raise VideoReadError(f"cannot open '{self.index.path}'")
        try:
            k = 0
            with torch.no_grad():
                while k <= wanted[-1]:
                    if k not in wanted_set:
                        if not cap.grab():
                            break
                    else:
                        ok, bgr = cap.read()
                        if not ok:
                            break
                        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                        avatar = build_avatar(rgb, self.index.observation(k), self.config, device=self.device,
                                              render_size=self.size)
                        x, q = observe_texels(probe.atlas, avatar)
                        self._kept[k] = (_to_u8(x), _to_u8(q))
                    k += 1
        finally:
            cap.release()

    def memory(self, frame_ids: Sequence[int], look_yaw_deg: float | None = None, memory_config: Any = None,
               now: int | None = None) -> Any:
        """A fresh models.avatar.memory.AppearanceMemory fed the given frames, in order, its view lit as the last
        and made for a mesh fitted at head yaw ``look_yaw_deg`` (None: the last frame's). memory_config: other
        settings of the same atlas (texels, ratio_cell) than the one the frames were observed for. now: the
        current frame (the one the rendered avatar is built from), lit as and compared against even where
        it is not among the frames fed (kept out of the memory)."""
        from models.avatar.memory import AppearanceMemory

        config = memory_config or self.memory_config
        if (config.texels, config.ratio_cell) != (self.memory_config.texels, self.memory_config.ratio_cell):
            raise ValueError(f"expected a memory config of the observed atlas (texels {self.memory_config.texels}, "
                             f"ratio_cell {self.memory_config.ratio_cell}), got {config.texels}, {config.ratio_cell}")
        memory = AppearanceMemory(config, self.device)
        ids = [int(f) for f in frame_ids]
        if not ids:
            return memory
        extra = [] if now is None or now in ids else [int(now)]
        self._observe(ids + extra)
        ids = [f for f in ids if f in self._kept]  # frames past the video's end: not there
        extra = [f for f in extra if f in self._kept]
        memory.allocate(self.config)
        for i, f in enumerate(ids):
            x, q = self._kept[f]
            memory.feed(_from_u8(x, self.device), _from_u8(q, self.device), self.index.yaw_deg(f),
                        view=i == len(ids) - 1 and not extra)
        for f in extra:  # the current frame, kept out of the memory
            x, q = self._kept[f]
            memory.feed(_from_u8(x, self.device), _from_u8(q, self.device), self.index.yaw_deg(f), blend=False)
        if look_yaw_deg is not None:
            memory.look_from(look_yaw_deg)
        log.info("appearance memory: %d frames of '%s' fed, %.0f %% of the head filled", len(ids), self.index.name,
                 100.0 * float(memory.fill_fraction()))
        return memory


def steady_stretches(index: ClipIndex, seconds: float = 1.0, max_yaw_range_deg: float = 3.0,
                     after_s: float = 2.0) -> list[tuple[int, int]]:
    """Stretches of the clip (first and last frame id) at least ``after_s`` into it, ``seconds`` long, over which
    the head's yaw stays within ``max_yaw_range_deg`` and every analysed frame has a face; not overlapping."""
    fps = index.fps or 30.0
    n = max(2, int(round(seconds * fps)))
    ids, yaw, found = index.frame_ids, index.pose_deg[:, 0], index.found
    out, i = [], 0
    while i + n <= len(ids):
        window = slice(i, i + n)
        if ids[i] / fps >= after_s and found[window].all() and ids[i + n - 1] - ids[i] == n - 1 \
                and float(np.ptp(yaw[window])) <= max_yaw_range_deg:
            out.append((int(ids[i]), int(ids[i + n - 1])))
            i += n
        else:
            i += 1
    return out


def memory_flicker(observations: ClipObservations, stretch: tuple[int, int], yaw_deg: float,
                   memory_config: Any = None, smooth_landmarks: bool = True) -> dict[str, float]:
    """Temporal flicker (models.evaluation.metrics.temporal_flicker) of each frame's own avatar over a steady
    stretch, seen from orbit yaw ``yaw_deg`` as a viewer would see the call: "raw" without the memory, "memory"
    with the memory fed every analysed frame from the clip's start, as a live sender feeds it. The motion is
    estimated on the raw renders (same geometry); both are scored inside the raw renders' alpha.
    smooth_landmarks: the stretch's landmarks smoothed over frames as the live pipeline smooths them
    (models.face.smoothing.LandmarkSmoother, run in capture order from half a second before the stretch)."""
    import torch

    from models.avatar import build_avatar, render_views
    from models.avatar.atlas import observe_texels
    from models.avatar.memory import AppearanceMemory
    from models.evaluation.metrics import temporal_flicker
    from models.face.smoothing import LandmarkSmoother

    index, (start, end) = observations.index, stretch
    before = [int(f) for f, ok in zip(index.frame_ids, index.found) if ok and f < start]
    memory = observations.memory(before, memory_config=memory_config) if before else \
        AppearanceMemory(memory_config or observations.memory_config, observations.device)
    memory.allocate(observations.config)
    frames = index.read_frames(range(start, end + 1))
    smoothed: dict[int, Any] = {}
    if smooth_landmarks:
        smoother, fps = LandmarkSmoother(), index.fps or 25.0
        for f, ok in zip(index.frame_ids, index.found):
            if ok and start - 0.5 * fps <= f <= end:
                smoothed[int(f)] = smoother(f / fps, index.observation(int(f)))
    raw, remembered, alpha = [], [], []
    pose = [OrbitPose(yaw_deg=yaw_deg)]
    with torch.no_grad():
        for f in range(start, end + 1):
            obs = smoothed.get(f) or index.observation(f)
            avatar = build_avatar(frames[f], obs, observations.config, device=observations.device,
                                  render_size=observations.size)
            memory.feed(*observe_texels(memory.atlas, avatar), obs.pose.yaw_deg)
            single = render_views(avatar, pose, observations.size)
            raw.append(_hwc(single.rgb[0]))
            alpha.append(single.alpha[0, 0].float().cpu().numpy())
            remembered.append(_hwc(render_views(memory.attach(avatar), pose, observations.size).rgb[0]))
    raw_a, masks = np.stack(raw), (np.stack(alpha) > 0.5).astype(np.float32)
    return {"raw": temporal_flicker(raw_a, masks, flow_frames=raw_a),
            "memory": temporal_flicker(np.stack(remembered), masks, flow_frames=raw_a)}


def _to_u8(t: Any) -> Any:
    import torch

    return (t.float().clamp(0.0, 1.0) * 255.0).round().to("cpu", dtype=torch.uint8)


def _from_u8(t: Any, device: str) -> Any:
    return t.to(device).float() / 255.0


def clip_memory(index: ClipIndex, frame_ids: Sequence[int], avatar_config: Any = None, device: str = "cpu",
                size: int = 256, memory_config: Any = None, look_yaw_deg: float | None = None) -> Any:
    """A fresh models.avatar.memory.AppearanceMemory fed the given frames of the clip, in order (each
    frame's own avatar, built at ``size`` as the sender builds it). The video is decoded once, streamed."""
    return ClipObservations(index, avatar_config, device, size, memory_config).memory(frame_ids, look_yaw_deg)


class MemoryRunner(AvatarRunner):
    """AvatarRunner plus "memory": the raw reenactment render with an appearance memory attached, fed
    the clip's frames before the reference minus ``exclude_s`` seconds either side of the target (the
    target's own look never reaches the memory), seen as a mesh fitted at the target's head pose sees it;
    the reference is the current frame (lighting ratio, the quality the layers are weighed against) even
    where the window keeps it out of the memory.
    Memories are made per distinct feed (targets whose window misses every fed frame share one) from the
    clip's frames observed once (ClipObservations).

    memory_configs: {method name: models.avatar.memory.MemoryConfig or None (the default for the picture
    size)}, all of one atlas, to compare settings on the same pairs (default: {"memory": None})."""

    def __init__(self, *args, exclude_s: float = 0.5, every: int = 1, memory_configs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_configs = dict(memory_configs or {"memory": None})
        self.methods = self.methods + tuple(self.memory_configs)
        self.exclude_s = exclude_s
        self.every = every
        self._indexes: dict[str, ClipIndex] = {}
        self._observed: ClipObservations | None = None  # the current clip's (one clip's at a time: they are large)
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
            if self._observed is None or self._observed.index is not index or self._observed.size != case.size:
                first = next(iter(self.memory_configs.values()))
                self._observed = ClipObservations(index, self.config, self.device, case.size, first)
            self._cached = (key, {name: self._observed.memory(ids, memory_config=config, now=case.pair.ref)
                                  for name, config in self.memory_configs.items()})
        with torch.inference_mode():
            reenacted = self._build(case.ref_frame, case.ref_obs, case.size, geometry=case.tgt_obs)
        for name, memory in self._cached[1].items():
            with torch.no_grad():  # the layers as a mesh fitted at the target's head pose sees them
                memory.look_from(case.tgt_obs.pose.yaw_deg)
            with torch.inference_mode():
                out = self._av.render_views(memory.attach(reenacted), [OrbitPose()], case.size)
            result[name] = _hwc(out.rgb[0])
        return result
