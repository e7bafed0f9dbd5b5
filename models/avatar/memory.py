"""Appearance memory (issue 20): a fixed-size texture atlas on the avatar's fixed topology that keeps
what the camera has seen of one participant during a call, and the lifecycle that resets it.

The atlas (models.avatar.atlas) lays out the mesh's textured parts in texture space, each covered
texel with its triangle and barycentrics: a frame's update is gathers and element-wise maths of
fixed shape, no host sync, the same code on the CPU and in a CUDA graph.

Per frame, every texel looks itself up in the frame's avatar: its source pixel (projective
texture coordinates are linear in position), how much the source saw it (the shadow map, soft),
cos(normal, view ray) and the resolution (source pixels per texel, at most 1):

    q = seen * ramp(cos) * min(1, sqrt(A_src / A_atlas)) * on_person
    w = q^2 * clamp((q - g b) / ((1 - g) b))      (b: the best q this texel has had in its layer, g = gate)
    m <- m + w / (c + w) * (x - m),   c <- min(c + w, cap),   b <- max(b, q)

into the **pose layer** nearest the frame's head yaw (``pose_layers`` layers ``layer_step_deg`` apart):
MediaPipe's mesh slides on the face as the head turns (a few pixels at 45 degrees), so a texel seen
with the head turned lands where it belongs only on a mesh fitted at about that pose. A render's
mesh at head yaw y takes the layers with the affinity a_k = exp(-(y - y_k)^2 / 2 step^2) times their
confidence (:meth:`AppearanceMemory.look_from`; the newest frame's yaw after each update), and uses
them (models.avatar.render):

- under the frame's own texture where that is worth little in the view (seen badly, stretched),
  from any layer: what the frame did not see, earlier frames did;
- over it where the near layers saw the texel better than the frame did (q_layers - a_own q_now >
  better_by, a_own = 1 for the frame's own mesh; for a reenactment's mesh, fitted at another pose
  than the frame that textures it, the affinity between the two poses: its texture is off there too),
  and only on a mesh fitted ``over_from_deg`` or more from the frame's pose: near it the frame's own
  texture is sharper than any blend of earlier frames (docs/memory.md: 0.2 dB lost at 0-10 otherwise);
- never on the expression regions (lips, eyes, brows and a ring of neighbours: they must follow
  the current frame);
- lit as now: multiplied by a low-frequency ratio, current frame over the memory before it, over the
  texels both see well (blurred over cells of ``ratio_cell`` texels, a global ratio where no cell has
  enough overlap).

The memory lives on the device of the avatar and is never written anywhere.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.avatar.atlas import MemoryAtlas, memory_atlas, observe_texels
from models.avatar.texture import box_mean
from models.avatar.types import Avatar, AvatarConfig
from models.compile_threads import allow_compiles_beside_traces

log = logging.getLogger(__name__)

_STATE = ("colour", "confidence", "best", "_held", "_q_now", "_ratio", "_ratio_now", "_ratio_made", "view",
          "_texel_view", "_sums")
"""AppearanceMemory's buffers that an update writes."""

__all__ = ["AppearanceMemory", "MemoryConfig"]


@dataclass(frozen=True)
class MemoryConfig:
    """Settings of :class:`AppearanceMemory`."""

    texels: int = 128
    """Side of the atlas's face region in texels (the render density of a 256 px view); the
    shell and card regions scale with it. The whole atlas is about 10 x texels^2 texels."""
    cap: float = 32.0
    """Confidence cap, in full-quality observations: the newest good frame keeps a weight of at least 1/cap (8 until
    the tenth session)."""
    ratio_cell: int = 16
    """Cell of the lighting ratio's grid, texels; the ratio is blurred over 5 x 5 cells."""
    update_every: int = 1
    """Update the memory on every N-th frame with a face (renders attach it on every frame; the lighting
    ratio then lags by up to N - 1 frames): the CPU sender's cost cut."""
    lost_after_s: float = 2.0
    """The memory resets after the face has been lost this long (seconds of the frames' clock)."""
    identity_every: int = 60
    """Frames with a face between identity checks (0: no check)."""
    identity_threshold: float = 0.6
    """Descriptor distance from the memory's person above which the memory resets (dlib: 0.6)."""
    gate: float = 0.9
    """An observation below gate x the best quality its texel has had in its layer does not update it (a side
    once seen face-on is not washed out by later slanted looks)."""
    pose_layers: int = 13
    """Layers keyed by the observing frame's head yaw, ``layer_step_deg`` apart about 0: a texel seen with
    the head turned sits on a mesh fitted at that pose, and lands a few pixels off on one fitted at another
    (MediaPipe's mesh slides on the face with the pose), so renders take the layers near their mesh's pose."""
    layer_step_deg: float = 7.5
    """Head yaw between layer centres, degrees."""
    affinity_deg: float | None = 15.0
    """Width of the pose affinity with which a render takes the layers, exp(-d^2 / 2 width^2), degrees; None: the
    layer step. Layers closer than their affinity's width pool their neighbours. Since the tenth session 13 layers
    7.5 degrees apart pooled over 15 degrees, with cap 32 (before: 7 layers 15 degrees apart, affinity the step,
    cap 8): on the 7 shared clips +0.28 dB head PSNR at 10-20 degrees, +0.05 at 30-45, -0.04 at 20-30, flicker
    6.14 against 6.15 (docs/memory.md)."""
    relight: bool | str = True
    """The lighting ratio, now over then: True (per region: cells of ratio_cell texels), "global" (one
    ratio per channel) or False."""
    ratio_keep: float = 0.95
    """Share of the previous lighting ratio kept at each relit update (0: each frame's own ratio; the first
    ratio after a reset is taken whole): smooths its frame-to-frame noise, which shows as flicker where the
    memory's texture is used (docs/memory.md, x 1000 on the steady stretches: 6.216 unsmoothed, 6.162 at 0.8, 6.155 at
    0.9, 6.150 at 0.95 against the single frame's 6.155). At 0.95 a lasting change of light is half followed after
    14 updates (about half a second on a GPU sender, which updates every frame)."""
    own_affinity: bool = True
    """A reenactment (a mesh fitted at another pose than the frame that textures it, models.avatar's
    ``geometry``): the frame's own quality counts only as much as a layer at its pose would there."""
    better_by: float = 0.05
    """The layers near the mesh's pose replace the frame's own texture where their quality beats the frame's
    by more than this (fully from better_by + 0.15): a side seen face-on earlier beats it seen at a slant now."""
    over_from_deg: tuple[float, float] = (5.0, 15.0)
    """... and only on a mesh fitted this far from the newest frame's head yaw, degrees (none up to the first,
    fully from the second): near the frame's own pose its texture is sharper than any blend of earlier frames."""
    @classmethod
    def for_sender(cls, size: int, device: torch.device | str) -> MemoryConfig:
        """The sender's settings for views of ``size`` px: on the CPU a quarter of the texels and an update
        every other frame (issue 20's +10 ms at 256), on CUDA the full atlas every frame."""
        cpu = torch.device(device).type == "cpu"
        return cls(texels=max(32, size // (4 if cpu else 2)), update_every=2 if cpu else 1)

    def __post_init__(self) -> None:
        if not 16 <= self.texels <= 2048:
            raise ValueError(f"expected texels in [16, 2048], got {self.texels}")
        if self.cap < 1.0:
            raise ValueError(f"expected cap >= 1, got {self.cap}")
        if self.ratio_cell < 2:
            raise ValueError(f"expected ratio_cell >= 2, got {self.ratio_cell}")
        if self.update_every < 1:
            raise ValueError(f"expected update_every >= 1, got {self.update_every}")
        if self.lost_after_s < 0 or self.identity_every < 0:
            raise ValueError("expected lost_after_s >= 0 and identity_every >= 0")
        if self.affinity_deg is not None and not self.affinity_deg > 0:
            raise ValueError(f"expected affinity_deg > 0 or None, got {self.affinity_deg}")
        if not 0.0 <= self.gate < 1.0 or self.pose_layers < 1 or self.layer_step_deg <= 0:
            raise ValueError(f"expected gate in [0, 1), pose_layers >= 1 and layer_step_deg > 0, got {self.gate}, "
                             f"{self.pose_layers}, {self.layer_step_deg}")
        if not 0.0 <= self.ratio_keep < 1.0:
            raise ValueError(f"expected ratio_keep in [0, 1), got {self.ratio_keep}")
        if self.relight not in (True, False, "global"):
            raise ValueError(f"expected relight True, False or 'global', got {self.relight!r}")


class AppearanceMemory:
    """The appearance memory of one participant: fixed-size buffers on one device, updated per frame.

    Per frame with a face: :meth:`observe` (lifecycle on the host, then :meth:`update` on the
    device and :meth:`attach` to the avatar that is rendered); per frame without one:
    :meth:`missed`. ``identity(image, obs) -> descriptor [D] or None`` is called every
    ``identity_every`` frames with a face (e.g. models.face.identity.IdentityEmbedder.embed with
    the observation's landmarks); a descriptor further than ``identity_threshold`` from the
    memory's person resets the memory. None: no identity check.
    """

    def __init__(self, config: MemoryConfig = MemoryConfig(), device: str | torch.device = "cpu",
                 identity: Callable[[np.ndarray, object], np.ndarray | None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.device = torch.device(device)
        self.identity = identity
        self.clock = clock
        self.atlas: MemoryAtlas | None = None
        self._key: tuple | None = None
        self.resets = 0  # resets so far (start, reset(), face lost, identity change)
        self._frames = 0  # frames observed since the last reset
        self._lost_since: float | None = None
        self._descriptor: np.ndarray | None = None
        self.cuda_graphs = False
        """Replay :meth:`update` as a CUDA graph (CUDA only; set by a sender whose avatar comes from graphs, so
        that the avatar's tensors are the same every frame). A failed capture goes back to eager, with a warning."""
        self._graphs: dict[tuple, object] = {}  # models.avatar.engine._Graph per avatar (its tensors' addresses)
        self.compile_update = False
        """With :attr:`cuda_graphs`: torch.compile the update before capturing it (fused kernels: the update's replay
        0.88 -> 0.32 ms at 512 on an H200, a probe), about 16 s of compiling at the first capture. A failed compile
        goes back to the plain graph, with a warning. Compiles on the caller's thread: a sender sets
        :attr:`compiler` instead."""
        self._compiled_update: Callable | None = None
        self.compiler = None
        """With :attr:`cuda_graphs`: a models.avatar.compiling.BackgroundCompiler (the avatar engine's, in a sender)
        that compiles the update on its worker thread, on a twin of this memory, while the plain graph serves; the
        next update after it captures the compiled one in its place (0.53 against 1.04 ms a frame at 512 with 4
        views on an H200, docs/memory.md)."""
        self._swap_failed: set = set()
        self._clashes = 0  # captures that met the background compile (CAPTURE_RETRIES are let go)

    _MACHINERY = ("identity", "clock", "compiler", "_graphs", "_compiled_update")

    def __getstate__(self) -> dict:
        """What a pickle of the memory holds: its settings and buffers, never the machinery around them (the
        compiler and its lock, CUDA graphs, the identity model). models.avatar.precompiled pickles the update's
        arguments, this memory among them, for the guards it saves with the compiled update."""
        return {k: v for k, v in self.__dict__.items() if k not in self._MACHINERY}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.identity, self.clock, self.compiler, self._graphs, self._compiled_update = None, time.monotonic, None, {}, None

    # -- buffers --

    def _allocate(self, key: tuple) -> None:
        atlas = memory_atlas(key, self.config.texels, self.config.ratio_cell, self.device)
        T = atlas.texel_ids.shape[0]
        Ha, Wa = atlas.size
        self.atlas, self._key = atlas, key
        K = self.config.pose_layers
        self.colour = torch.zeros(K, T, 4, device=self.device)  # [K, T, 4] straight RGBA per pose layer
        self.confidence = torch.zeros(K, T, device=self.device)  # [K, T] observations' weight, capped
        self.best = torch.zeros(K, T, device=self.device)  # [K, T] the best quality seen
        # Per layer, colour and best quality weighted by the confidence (at most 1): a compose is then one
        # matrix-vector product over the layers (_compose), not a product and a sum of [K, T, 4].
        self._held = torch.zeros(K, T, 5, device=self.device)
        self._q_now = torch.zeros(T, device=self.device)  # [T] the newest frame's quality
        self._ratio = torch.ones(1, 3, Ha, Wa, device=self.device)  # lighting now over then
        self._ratio_now = torch.ones(T, 3, device=self.device)  # the newest frame's, unsmoothed, per texel
        self._ratio_made = torch.zeros((), device=self.device)  # 1 once a ratio was made since the reset
        self._yaw_now = 0.0  # the newest frame's head yaw
        self._centres = torch.tensor(self._layer_centres(), device=self.device)[:, None]  # [K, 1] layers' yaws, degrees
        self.view = torch.zeros(1, 7, Ha, Wa, device=self.device)  # what renders sample (see look_from)
        self._texel_view = torch.zeros(T + 1, 7, device=self.device)  # per texel, then a row of zeros
        self._sums = torch.zeros(atlas.grid[0] * atlas.grid[1], 7, device=self.device)
        self._layer_ids = torch.arange(K, device=self.device)
        self._graphs.clear()  # they wrote into the buffers this replaces

    @property
    def nbytes(self) -> int:
        """Bytes the memory holds on its device (fixed once the first frame set the topology)."""
        if self.atlas is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.colour, self.confidence, self.best, self._held, self.view,
                                                          self._texel_view, self._sums, self._q_now, self._ratio,
                                                          self._ratio_now))

    def reset(self) -> None:
        """Forget everything seen (buffers kept, zeroed in place: graph-safe)."""
        if self.atlas is not None:
            for t in (self.colour, self.confidence, self.best, self._held, self.view, self._q_now):
                t.zero_()
            self._ratio.fill_(1.0)
            self._ratio_now.fill_(1.0)
            self._ratio_made.zero_()
        self._frames, self._lost_since, self._descriptor = 0, None, None
        self.resets += 1

    def fill_fraction(self) -> torch.Tensor:
        """0-d tensor on the device: the share of the head's texels seen well at least once (read it
        with .item() where a host sync costs nothing, e.g. after the frame's pictures are read)."""
        if self.atlas is None:
            return torch.zeros(())
        return ((self.confidence.amax(0) > 0.25) & ~self.atlas.texel_card).sum() / self.atlas.n_head_texels

    # -- per frame --

    def observe(self, avatar: Avatar, image: np.ndarray | None = None, obs: object | None = None,
                t_s: float | None = None) -> Avatar:
        """A frame with a face: the lifecycle (identity check every ``identity_every`` frames), the
        update from ``avatar`` and the avatar with the memory attached. ``avatar`` must be built from
        its own frame's geometry (no reenactment); image/obs feed the identity check."""
        self._lost_since = None
        if self.identity is not None and self.config.identity_every and image is not None \
                and self._frames % self.config.identity_every == 0:
            descriptor = self.identity(image, obs)
            if descriptor is not None:
                if self._descriptor is not None and \
                        float(np.linalg.norm(descriptor - self._descriptor)) > self.config.identity_threshold:
                    log.info("appearance memory reset: another person (identity distance %.2f)",
                             float(np.linalg.norm(descriptor - self._descriptor)))
                    self.reset()
                self._descriptor = descriptor
        yaw = float(obs.pose.yaw_deg) if obs is not None and getattr(obs, "pose", None) is not None else 0.0
        if self._frames % self.config.update_every == 0 or self._key != _topology_key(avatar):
            self.update(avatar, yaw)
        self._frames += 1
        return self.attach(avatar)

    def missed(self, t_s: float | None = None) -> None:
        """A frame without a face: the memory resets once the face has been lost ``lost_after_s``."""
        now = self.clock() if t_s is None else t_s
        if self._lost_since is None:
            self._lost_since = now
        elif now - self._lost_since >= self.config.lost_after_s and self._frames > 0:
            log.info("appearance memory reset: face lost for %.1f s", now - self._lost_since)
            self.reset()

    def allocate(self, config: AvatarConfig) -> None:
        """Make the buffers for avatars of ``config`` (done by the first :meth:`update`; needed
        before :meth:`feed` is given observations made elsewhere)."""
        key = _topology_key(config)
        if key != self._key:
            self._allocate(key)

    def update(self, avatar: Avatar, yaw_deg: float = 0.0) -> None:
        """Blend the avatar's frame (its head at ``yaw_deg``, models.face.analysis.HeadPose) into the memory
        and remake :attr:`view`: device maths with fixed shapes, in place (no host sync); with
        :attr:`cuda_graphs`, one graph replay."""
        self.allocate(avatar.config)
        if self.cuda_graphs and self.device.type == "cuda":
            try:
                self._replay_update(avatar, yaw_deg)
                return
            except Exception as error:  # noqa: BLE001 - any capture failure: eager from now on, said once
                from models.avatar.compiling import CAPTURE_RETRIES, clashed_with_a_capture
                from models.avatar.engine import _end_aborted_capture

                _end_aborted_capture(self.device)
                if self.compiler is not None and clashed_with_a_capture(error) and self._clashes < CAPTURE_RETRIES:
                    self._clashes += 1  # the avatar's background compile ran CUDA work meanwhile: not lasting
                    log.warning("appearance memory: the capture of its update met the background compile; this "
                                "update runs eagerly, the next captures again")
                else:
                    log.warning("appearance memory: could not capture its update as a CUDA graph (%s: %s); eager from "
                                "now on", type(error).__name__, error)
                    self.cuda_graphs = False
                    self._graphs.clear()
        self.feed(*observe_texels(self.atlas, avatar), yaw_deg)

    def _update_at(self, avatar: Avatar, yaw: torch.Tensor) -> None:
        """:meth:`update` with the head yaw as a 0-d device tensor: what the CUDA graph holds (the frame is the
        newest, so its own texture is never under the layers: look_from with no pose offset)."""
        x, q = observe_texels(self.atlas, avatar)
        a = self._affinity_at(yaw)
        self._relight_with(x, q, a)
        k = (self._centres[:, 0] - yaw).abs().argmin()[None]  # [1]: the nearest layer (the first of a tie, as min)
        self._blend(x, q, k)
        self._look_with(self._affinity_at(yaw), own=1.0, far=0.0)

    def _replay_update(self, avatar: Avatar, yaw_deg: float) -> None:
        from models.avatar.engine import _Graph

        tensors = (avatar.verts, avatar.vattr, avatar.faces, avatar.texture, avatar.src_depth, avatar.src_depth_K,
                   avatar.source_image)
        key = (tuple(t.data_ptr() for t in tensors), avatar.tex_span)
        compile_key = ("memory", tuple(tuple(t.shape) for t in tensors), avatar.tex_span, tuple(self.colour.shape))
        self._yaw_now = yaw_deg
        graph = self._graphs.get(key)
        if graph is not None and self.compiler is not None and not graph.compiled and compile_key not in self._swap_failed \
                and self.compiler.ready(compile_key) and self.compiler.idle():
            del self._graphs[key]  # its compiled form is ready: captured below in its place
            graph = None
        if graph is not None:
            graph({"yaw": torch.tensor(yaw_deg, dtype=torch.float32)})
            return
        # The capture runs the update a few times (warm-up, capture, replay): keep the state from before and
        # put it back, then replay once.
        state = [t.clone() for t in self._state()]
        log.info("appearance memory: capturing its update as a CUDA graph (%d texels, %d layers)",
                 self.atlas.texel_ids.shape[0], self.config.pose_layers)
        inputs = {"yaw": torch.tensor(yaw_deg, dtype=torch.float32, device=self.device)}
        if self.compiler is not None and compile_key not in self._swap_failed:
            graph = self._background_graph(avatar, inputs, compile_key)
            for t, saved in zip(self._state(), state):
                t.copy_(saved)
        elif self.compile_update:
            if self._compiled_update is None:
                log.info("appearance memory: compiling its update (torch.compile; about 15 s, once)")
                allow_compiles_beside_traces()
                self._compiled_update = torch.compile(self._update_at, dynamic=False)
            try:
                graph = _Graph(lambda t: self._compiled_update(avatar, t["yaw"]), inputs)
            except Exception as error:  # noqa: BLE001 - any compile failure: the plain graph, said once
                log.warning("appearance memory: could not compile its update (%s: %s); its plain CUDA graph instead",
                            type(error).__name__, error)
                self.compile_update, self._compiled_update = False, None
                for t, saved in zip(self._state(), state):
                    t.copy_(saved)
        if graph is None:
            try:
                graph = _Graph(lambda t: self._update_at(avatar, t["yaw"]), inputs)
            except Exception:
                for t, saved in zip(self._state(), state):  # the warm-up runs before the failure changed it
                    t.copy_(saved)
                raise
        for t, saved in zip(self._state(), state):
            t.copy_(saved)
        while len(self._graphs) >= 4:  # avatars of other build plans (another picture size): the oldest goes
            self._graphs.pop(next(iter(self._graphs)))
        self._graphs[key] = graph
        graph({"yaw": torch.tensor(yaw_deg, dtype=torch.float32)})

    def _background_graph(self, avatar: Avatar, inputs: dict, compile_key: tuple):
        """With :attr:`compiler`: the compiled update's graph if the worker has compiled it (None: not yet, or it
        would compile again here: said once); else None, and the compile is asked for, on a twin of this memory
        (its own copies of every buffer an update writes) so that nothing here changes."""
        from models.avatar.compiling import capture_compiled
        from models.avatar.engine import _end_aborted_capture, _Graph

        update = self.compiler.function("appearance memory update", type(self)._update_at)
        if not self.compiler.ready(compile_key):
            twin, yaw = copy.copy(self), inputs["yaw"].clone()
            for name in _STATE:
                setattr(twin, name, getattr(self, name).clone())
            self.compiler.submit(compile_key, lambda: update(twin, avatar, yaw), "appearance memory's update")
            return None
        if not self.compiler.idle():
            return None

        def failed() -> None:
            _end_aborted_capture(self.device)
            self._swap_failed.add(compile_key)

        return capture_compiled(lambda: _Graph(lambda t: update(self, avatar, t["yaw"]), inputs),
                                "appearance memory's update", failed)

    def _state(self) -> tuple[torch.Tensor, ...]:
        """Every buffer an update writes."""
        return tuple(getattr(self, name) for name in _STATE)

    @property
    def _affinity_width(self) -> float:
        return self.config.affinity_deg or self.config.layer_step_deg

    def _layer_centres(self) -> list[float]:
        K, step = self.config.pose_layers, self.config.layer_step_deg
        return [(k - (K - 1) / 2) * step for k in range(K)]

    def _affinity(self, yaw_deg: float) -> torch.Tensor:
        """[K, 1] how well each pose layer's texels sit on a mesh fitted at head yaw ``yaw_deg``, 1 for the nearest
        layer (device maths with the yaw as a scalar: no upload, no host sync)."""
        step = self._affinity_width
        nearest = min(abs(yaw_deg - c) for c in self._layer_centres())
        return ((self._centres - yaw_deg) / step).square().mul(-0.5).exp() / math.exp(-0.5 * (nearest / step) ** 2)

    def _affinity_at(self, yaw: torch.Tensor) -> torch.Tensor:
        """:meth:`_affinity` for a 0-d device tensor yaw (graph-safe)."""
        d = (self._centres - yaw) / self._affinity_width  # [K, 1]
        return (d.square() - d.abs().amin().square()).mul(-0.5).exp()

    def feed(self, x: torch.Tensor, q: torch.Tensor, yaw_deg: float = 0.0, view: bool = True,
             blend: bool = True) -> None:
        """Blend one frame's observation (:func:`observe_texels`: colour x [T, 4], quality q [T]; the head at
        ``yaw_deg``) into the pose layer nearest that yaw and, with ``view``, remake :attr:`view` for a mesh
        fitted at that yaw, lit as that frame (a replay of many frames needs the view of the last one only).
        blend=False: the frame is the current one (renders compare against it) but does not join the memory
        (an evaluation that keeps it out)."""
        if view:  # lighting now against then: before this frame joins the memory
            self._relight(x, q, yaw_deg)
        if not blend:
            if view:
                self.look_from(yaw_deg)
            return
        k = min(range(self.config.pose_layers), key=lambda i: abs(yaw_deg - self._layer_centres()[i]))
        self._blend(x, q, self._layer_ids[k:k + 1])
        if view:
            self.look_from(yaw_deg)

    def _blend(self, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """The observation into pose layer k (a [1] index on the device)."""
        cfg = self.config
        # The layers keep colours as lit when the memory began: the frame's divided by its own lighting ratio
        # (now over then; unsmoothed, or a change of light would leak into the layers while the smoothed one
        # catches up). Stored as seen, a frame would set the layers near its pose to today's light, and the
        # ratio, made against those layers, would fall back to 1 after one frame, leaving the other layers lit
        # as they were seen.
        x = torch.cat([x[:, :3] / self._ratio_now, x[:, 3:]], -1)
        b, c, colour = self.best.index_select(0, k)[0], self.confidence.index_select(0, k)[0], self.colour.index_select(0, k)[0]
        g = cfg.gate
        w = q.square() * ((q - g * b) / ((1 - g) * b + 1e-3)).clamp(0.0, 1.0)
        colour = colour.lerp(x, (w / (c + w).clamp(min=1e-6))[:, None])
        c, b = torch.minimum(c + w, torch.full_like(c, cfg.cap)), torch.maximum(b, q)
        self.colour.index_copy_(0, k, colour[None])
        self.confidence.index_copy_(0, k, c[None])
        self.best.index_copy_(0, k, b[None])
        self._held.index_copy_(0, k, (torch.cat([colour, b[:, None]], -1) * c.clamp(max=1.0)[:, None])[None])

    def _compose(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layers seen from a mesh of layer affinity ``a`` [K, 1] (:meth:`_affinity` of its yaw): colour
        [T, 4], its quality [T], the confidence of the layers near that yaw [T] and of any layer [T]."""
        c = self.confidence.clamp(max=1.0)  # [K, T]
        K, T = c.shape
        w = a[:, 0]  # [K]
        total = (w @ c).clamp(min=1e-6)  # [T]
        held = (w @ self._held.view(K, T * 5)).view(T, 5) / total[:, None]  # colour and best quality
        return held[:, :4], held[:, 4], (a * c).amax(0), c.amax(0)

    def _relight(self, x: torch.Tensor, q: torch.Tensor, yaw_deg: float) -> None:
        """The lighting ratio (now over then) and quality of the newest frame, against the layers at its yaw."""
        self._yaw_now = yaw_deg
        self._relight_with(x, q, self._affinity(yaw_deg))

    def _relight_with(self, x: torch.Tensor, q: torch.Tensor, a: torch.Tensor) -> None:
        """:meth:`_relight` against the layers of affinity ``a`` [K, 1] (the newest frame's yaw)."""
        atlas, cfg = self.atlas, self.config
        self._q_now.copy_(q)
        if not cfg.relight:
            self._ratio.fill_(1.0)
            self._ratio_now.fill_(1.0)
            return
        if cfg.relight == "global":
            colour, _, near, _ = self._compose(a)
            both = (q * near)[:, None]
            glob = (((both * x[:, :3]).sum(0) + 1e-3) / ((both * colour[:, :3]).sum(0) + 1e-3)).clamp(0.5, 2.0)
            self._set_ratio(glob[None, :, None, None].expand_as(self._ratio))
            return
        colour, _, near, _ = self._compose(a)
        # Lighting now against then: low-frequency ratio over texels both see well, on a grid of cells.
        both = (q * near)[:, None]  # [T, 1]
        m = colour[:, :3]
        per_texel = torch.cat([both * x[:, :3], both * m, both], -1)  # [T, 7]
        sums = self._sums
        sums.zero_()
        sums.index_add_(0, atlas.cell, per_texel)
        gh, gw = atlas.grid
        coarse = box_mean(sums.t().reshape(1, 7, gh, gw), 5)  # [1, 7, gh, gw]
        total = sums.sum(0)  # [7]
        glob = ((total[:3] + 1e-3) / (total[3:6] + 1e-3)).clamp(0.5, 2.0)  # [3]
        have = (coarse[:, 6:7] / (0.05 * coarse[:, 6:7].amax().clamp(min=1e-6))).clamp(max=1.0)
        local = ((coarse[:, :3] + 1e-4) / (coarse[:, 3:6] + 1e-4)).clamp(0.5, 2.0)
        ratio = torch.lerp(glob[None, :, None, None].expand_as(local), local, have)  # [1, 3, gh, gw]
        Ha, Wa = atlas.size
        self._set_ratio(F.interpolate(ratio, size=(Ha, Wa), mode="bilinear", align_corners=False))

    def _set_ratio(self, ratio: torch.Tensor) -> None:
        """The newest frame's lighting ratio, and the one views are lit by: smoothed over updates by ``ratio_keep``,
        the first since the reset whole (device maths in place: graph-safe)."""
        self._ratio_now.copy_(ratio.reshape(3, -1).index_select(1, self.atlas.texel_ids).t())
        self._ratio.lerp_(ratio, 1.0 - self.config.ratio_keep * self._ratio_made)
        self._ratio_made.fill_(1.0)

    def look_from(self, yaw_deg: float) -> None:
        """Remake :attr:`view` for a mesh fitted at head yaw ``yaw_deg`` (the newest frame's, as update does;
        a reenactment's target's), lit and weighed against the newest frame."""
        if self.atlas is None:
            return
        cfg = self.config
        # Weights: where the frame's own texture is worth little (under its fill), and over it where
        # the layers near this pose saw the texel better than the newest frame did. The newest frame's
        # texture sits on a mesh fitted at another pose (a reenactment) no better than a layer there would.
        step, off = cfg.layer_step_deg, abs(yaw_deg - self._yaw_now)
        # Within a layer's step of its own pose, the frame's texture sits as well as any layer's.
        own = math.exp(-0.5 * (max(0.0, off - step) / step) ** 2) if cfg.own_affinity else 1.0
        lo, hi = cfg.over_from_deg
        far = 1.0 if off >= hi else 0.0 if off <= lo else (off - lo) / (hi - lo)
        self._look_with(self._affinity(yaw_deg), own, far)

    def _look_with(self, a: torch.Tensor, own: float, far: float) -> None:
        """:meth:`look_from` for layer affinity ``a`` [K, 1], the newest frame's weight ``own`` and ``far``,
        how far the mesh's pose is from that frame's (0 ... 1 over ``over_from_deg``)."""
        atlas, cfg = self.atlas, self.config
        colour, best, near, anywhere = self._compose(a)
        fill = anywhere * atlas.texel_static
        over = (far * near * atlas.texel_static) * ((best - own * self._q_now - cfg.better_by) / 0.15).clamp(0.0, 1.0)
        T = fill.shape[0]
        # Colour and alpha premultiplied by the coverage k (how much any layer saw the texel), k last: a bilinear
        # lookup beside texels never seen divides by k and keeps the seen texels' colour (straight colour next to
        # the zeros of unseen texels drew a dark line where what the memory saw ends).
        k = anywhere[:, None]
        self._texel_view[:T] = torch.cat([colour * k, fill[:, None], over[:, None], k], -1)
        Ha, Wa = atlas.size
        view = self._texel_view.index_select(0, atlas.gutter).t().reshape(1, 7, Ha, Wa)
        lit = torch.minimum(view[:, :3] * self._ratio, view[:, 6:7]).clamp(min=0.0)
        self.view.copy_(torch.cat([lit, view[:, 3:]], 1))

    def colours(self) -> torch.Tensor:
        """[1, 4, Ha, Wa] straight RGBA of :attr:`view` (lit as now; 0 where no layer saw the texel)."""
        return self.view[:, :4] / self.view[:, 6:7].clamp(min=1e-6)

    def attach(self, avatar: Avatar) -> Avatar:
        """The avatar with the memory's view attached (renders use it where the frame saw badly)."""
        if self.atlas is None or self._key != _topology_key(avatar):
            return avatar
        return replace(avatar, memory=self.view, memory_uv=self.atlas.corner_uv)


def _topology_key(what: Avatar | AvatarConfig) -> tuple[int, int, bool]:
    c = what if isinstance(what, AvatarConfig) else what.config
    return (c.shell_rings, c.card_grid, c.background == "far")
