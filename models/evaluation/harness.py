"""Evaluation harness: self-reenactment pairs from head-turn clips, scored per
pair, aggregated per clip / yaw bin / overall, written as results.json,
results.md, contact sheets and metric-vs-yaw plots.

Protocol (DESIGN.md section 7):

* Pairs: per clip, the most frontal frame is the reference s; targets t are
  other frames binned by |yaw(t) - yaw(s)| (models.evaluation.clips.pairs), with
  near-duplicates of s left out.
* Every picture lives in the reference's CROP camera (S x S): the target is
  frame t warped by ``framing.crop``; the baseline "reference frame unchanged"
  is ``framing.source_view()``; a method renders the avatar of s reenacted
  with the geometry of t, seen by the video camera.
* Scores inside the target's HEAD region (face oval grown upward for the
  hair, intersected with the person mask; models.face.analysis.head_region_mask)
  and, for comparison, the whole person mask. In a head-turn clip only the
  head rotates; the torso and background do not move like a camera orbit.

Methods: "baseline" always; the others come from a :class:`MethodRunner`
(:class:`AvatarRunner` gives "raw" and, with a refiner, "refined";
:class:`CallableRunner` wraps plain functions, for tests and quick experiments).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import platform
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from models.evaluation.clips import (
    DEFAULT_BINS,
    ClipIndex,
    ClipIndexConfig,
    Pair,
    VideoReadError,
    bin_label,
    index_clip,
    pairs,
    reference_frame,
)
from models.evaluation.figures import contact_sheet, label_tile, save_png, scatter_plot, series_from_records
from models.evaluation.metrics import (
    IdentityEmbedder,
    identity_distance,
    masked_psnr,
    masked_ssim,
    output_landmark_error,
    temporal_flicker,
)
from models.geometry.camera import OrbitPose
from models.pictures import to_uint8
from models.face.analysis import (
    LEFT_EYE_OUTER,
    RIGHT_EYE_OUTER,
    FaceAnalysisError,
    FaceAnalyzer,
    FaceConfig,
    FaceObservation,
    NoFaceError,
    head_region_mask,
)

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "EvalConfig",
    "UnusableClipError",
    "Framing",
    "FaceBoxFraming",
    "AvatarFraming",
    "PairCase",
    "MethodRunner",
    "CallableRunner",
    "AvatarRunner",
    "EvalResult",
    "evaluate",
    "aggregate",
    "write_results",
    "results_markdown",
]

METRICS: dict[str, str] = {
    "psnr_head": "PSNR (dB) inside the target's head region",
    "ssim_head": "SSIM inside the target's head region",
    "psnr_person": "PSNR (dB) inside the target's person mask",
    "ssim_person": "SSIM inside the target's person mask",
    "id_dist_target": "dlib identity distance to the target (lower = same person; < 0.6 same by dlib's rule)",
    "id_dist_ref": "dlib identity distance to the reference",
    "lmk_err_pct": "landmark error, % of the target's inter-ocular distance (face mesh on output vs on target)",
}
"""Per-pair metrics of every method, with what they mean (higher is better for PSNR/SSIM only)."""
BASELINE = "baseline"


class UnusableClipError(FaceAnalysisError):
    """The clip has faces but yields no evaluation pair (no near-frontal reference, no target in the bins)."""


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run (saved in results.json)."""

    size: int = 256
    """Side S of the crop-camera pictures scored, pixels."""
    bins: tuple[tuple[float, float], ...] = DEFAULT_BINS
    """|yaw difference| bins, degrees, half-open [lo, hi)."""
    max_pairs_per_bin: int = 8
    """Pairs per bin per clip (evenly spread over the clip, or random with ``seed``)."""
    min_gap_frames: int = 5
    """Targets closer than this many frames to the reference are near-duplicates, left out."""
    min_yaw_diff_deg: float = 0.5
    """Targets whose |yaw difference| is below this are near-duplicates, left out."""
    seed: int | None = None
    """None: deterministic evenly spread pairs; an int: random pairs from that seed."""
    max_reference_yaw_deg: float = 20.0
    """A clip whose most frontal frame has |yaw| above this has no near-frontal reference: skipped."""
    index: ClipIndexConfig = ClipIndexConfig()
    """How clips are analysed (stride, max frames, mask size, fov)."""
    identity: bool = True
    """Compute dlib identity distances (needs the eval extra)."""
    landmarks: bool = True
    """Compute the landmark error (face mesh on every output)."""
    flicker: bool = True
    """Render a slow orbit per clip and measure temporal flicker (methods with an orbit only)."""
    flicker_yaw_deg: float = 15.0
    """The orbit goes from -flicker_yaw_deg to +flicker_yaw_deg ..."""
    flicker_step_deg: float = 0.5
    """... in steps of this many degrees (one frame each)."""
    sheet_pairs_per_bin: int = 1
    """Rows per bin in each clip's contact sheet."""

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 2048:
            raise ValueError(f"expected size in [32, 2048], got {self.size}")
        if self.max_pairs_per_bin < 1:
            raise ValueError(f"expected max_pairs_per_bin >= 1, got {self.max_pairs_per_bin}")
        if not self.bins:
            raise ValueError("expected at least one yaw bin, got none")
        if self.flicker_step_deg <= 0 or self.flicker_yaw_deg <= 0:
            raise ValueError(
                f"expected positive flicker_yaw_deg and flicker_step_deg, got {self.flicker_yaw_deg}, {self.flicker_step_deg}"
            )


# ----------------------------------------------------------------------------- framing


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


# ----------------------------------------------------------------------------- runners


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
            # A refiner trained without the seen mask refuses one (models.refiner: config.seen_mask).
            self._use_seen = bool(getattr(getattr(refiner, "config", None), "seen_mask", True))

    def _build(self, frame, obs, size, geometry=None):
        kwargs = {"render_size": size} if self._render_size_arg else {}
        return self._av.build_avatar(frame, obs, self.config, device=self.device, geometry=geometry, **kwargs)

    def framing(self, ref_frame, ref_obs, size) -> Framing:
        return AvatarFraming(self._build(ref_frame, ref_obs, size), size)

    def _refine(self, ref, views, seen):
        """ref [3, S, S], views [N, 3, S, S], seen [N, 1, S, S] -> [N, 3, S, S], one view per sample
        (as when streaming), in chunks of refine_batch; noise from one seeded generator per run."""
        import torch

        dtype = getattr(self.refiner, "dtype", views.dtype)
        kwargs = {}
        if self._takes_generator:
            if self._generator is None:
                self._generator = torch.Generator(device=views.device).manual_seed(self.seed)
            kwargs["generator"] = self._generator
        outs = []
        for i in range(0, views.shape[0], self.refine_batch):
            v = views[i : i + self.refine_batch].to(dtype)
            r = ref[None].expand(v.shape[0], -1, -1, -1).to(dtype)
            sv = seen[i : i + self.refine_batch, None].to(dtype) if self._use_seen else None
            outs.append(self.refiner.refine(r, v[:, None], sv, **kwargs)[:, 0].float())
        return torch.cat(outs)

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


# ----------------------------------------------------------------------------- scoring


class _Scorer:
    """Face mesh and identity embedder shared by all pairs of a run, with caches."""

    def __init__(self, config: EvalConfig):
        self.config = config
        self.analyzer = FaceAnalyzer(FaceConfig(static_image=True, max_faces=1, segmentation=False)) \
            if (config.landmarks or config.identity) else None
        self.embedder = IdentityEmbedder() if config.identity else None

    def close(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()

    def face(self, picture: np.ndarray) -> np.ndarray | None:
        """Landmarks [478, 3] of a picture [S, S, 3] float, or None when no face is found."""
        if self.analyzer is None:
            return None
        try:
            return self.analyzer.landmarks(to_uint8(picture))
        except NoFaceError:
            return None

    def embed(self, picture: np.ndarray, lms: np.ndarray | None) -> np.ndarray | None:
        if self.embedder is None or lms is None:
            return None
        return self.embedder.embed(to_uint8(picture), lms)


def _score(
    out: np.ndarray,
    target: np.ndarray,
    head: np.ndarray,
    person: np.ndarray,
    scorer: _Scorer,
    tgt_lms: np.ndarray | None,
    tgt_emb: np.ndarray | None,
    ref_emb: np.ndarray | None,
) -> dict[str, Any]:
    """Metrics of one method's picture for one pair (None where not computable)."""
    rec: dict[str, Any] = {k: None for k in METRICS}
    if head.sum() > 0:
        rec["psnr_head"] = masked_psnr(out, target, head)
        rec["ssim_head"] = masked_ssim(out, target, head)
    if person.sum() > 0:
        rec["psnr_person"] = masked_psnr(out, target, person)
        rec["ssim_person"] = masked_ssim(out, target, person)
    if scorer.analyzer is not None and tgt_lms is not None:
        iod = float(np.hypot(*(tgt_lms[LEFT_EYE_OUTER, :2] - tgt_lms[RIGHT_EYE_OUTER, :2])))
        err, lms = output_landmark_error(scorer.analyzer, out, tgt_lms, iod)
        rec["lmk_failed"] = err is None
        if scorer.config.landmarks:
            rec["lmk_err_pct"] = err
        emb = scorer.embed(out, lms)
        if emb is not None:
            rec["id_dist_target"] = identity_distance(emb, tgt_emb) if tgt_emb is not None else None
            rec["id_dist_ref"] = identity_distance(emb, ref_emb) if ref_emb is not None else None
    return rec


# ----------------------------------------------------------------------------- the run


@dataclass
class EvalResult:
    """Everything :func:`write_results` writes."""

    config: EvalConfig
    methods: tuple[str, ...]
    records: list[dict[str, Any]]
    flicker: dict[str, dict[str, float | None]]
    skipped: list[dict[str, str]]
    clips: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    sheets: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return aggregate(self.records, self.methods, self.config.bins)


def _reference_view(framing: Framing, scorer: _Scorer) -> tuple[np.ndarray, np.ndarray | None]:
    view = framing.source_view()
    return view, scorer.embed(view, scorer.face(view)) if scorer.embedder is not None else None


def _evaluate_clip(
    index: ClipIndex, runner: MethodRunner, config: EvalConfig, scorer: _Scorer, progress: bool, out_dir: Path | None
) -> tuple[list[dict[str, Any]], dict[str, float | None] | None, str | None]:
    """Records of one clip, its flicker, and its contact sheet path (or raises FaceAnalysisError to skip it)."""
    from tqdm.auto import tqdm

    name = index.name
    ref = reference_frame(index)
    if abs(index.yaw_deg(ref)) > config.max_reference_yaw_deg:
        raise UnusableClipError(
            f"no near-frontal reference in '{name}': its most frontal frame {ref} has yaw "
            f"{index.yaw_deg(ref):+.1f} deg (limit {config.max_reference_yaw_deg:g})"
        )
    chosen = pairs(index, bins=config.bins, max_per_bin=config.max_pairs_per_bin, min_gap_frames=config.min_gap_frames,
                   min_yaw_diff_deg=config.min_yaw_diff_deg, ref=ref, rng=config.seed)
    if not chosen:
        raise UnusableClipError(
            f"no target frame of '{name}' falls in the yaw bins "
            f"(yaw range {np.nanmin(index.pose_deg[:, 0]):.1f}..{np.nanmax(index.pose_deg[:, 0]):.1f} deg)"
        )
    frames = index.read_frames([ref] + [p.tgt for p in chosen])
    ref_obs = index.observation(ref)
    framing = runner.framing(frames[ref], ref_obs, config.size)
    ref_view, ref_emb = _reference_view(framing, scorer)
    yaw_ref = index.yaw_deg(ref)
    pitch_ref = float(index.pose_deg[index.position(ref), 1])

    sheet_rows, sheet_titles, per_bin_rows = [], [], {}
    records = []
    target_cache: dict[int, tuple] = {}
    for pair in tqdm(chosen, desc=f"pairs {name}", unit="pair", disable=not progress, leave=False):
        tgt_obs = index.observation(pair.tgt)
        target = framing.crop(frames[pair.tgt])
        head_full = head_region_mask(tgt_obs.landmarks_px, index.image_size, tgt_obs.mask)
        head = (framing.crop(head_full) > 0.5).astype(np.float32)
        person = (framing.crop(tgt_obs.mask) > 0.5).astype(np.float32)
        if pair.tgt not in target_cache:
            tgt_lms = scorer.face(target)
            target_cache[pair.tgt] = (tgt_lms, scorer.embed(target, tgt_lms))
        tgt_lms, tgt_emb = target_cache[pair.tgt]

        case = PairCase(name, pair, frames[ref], ref_obs, frames[pair.tgt], tgt_obs, framing)
        try:
            outputs = {BASELINE: ref_view, **runner.render(case)}
        except FaceAnalysisError as exc:
            log.warning("clip '%s' pair %d->%d skipped: %s", name, pair.ref, pair.tgt, exc)
            continue
        rec: dict[str, Any] = {
            "clip": name,
            "ref": pair.ref,
            "tgt": pair.tgt,
            "bin": bin_label(pair.bin),
            "yaw_ref_deg": yaw_ref,
            "yaw_tgt_deg": index.yaw_deg(pair.tgt),
            "yaw_diff_deg": pair.yaw_diff_deg,
            "abs_yaw_diff_deg": abs(pair.yaw_diff_deg),
            "pitch_diff_deg": float(index.pose_deg[index.position(pair.tgt), 1]) - pitch_ref,
            "head_px": int(head.sum()),
            "person_px": int(person.sum()),
            "target_face_found": tgt_lms is not None if scorer.analyzer is not None else None,
            "methods": {},
        }
        for method, picture in outputs.items():
            rec["methods"][method] = _score(picture, target, head, person, scorer, tgt_lms, tgt_emb, ref_emb)
        records.append(rec)

        rows_in_bin = per_bin_rows.setdefault(pair.bin, 0)
        if rows_in_bin < config.sheet_pairs_per_bin and out_dir is not None:
            per_bin_rows[pair.bin] = rows_in_bin + 1
            sheet_rows.append(_sheet_row(outputs, target, head, rec, runner.methods))
            sheet_titles.append(
                f"bin {rec['bin']} deg: ref frame {pair.ref} (yaw {yaw_ref:+.1f}) -> target frame {pair.tgt} "
                f"(yaw {rec['yaw_tgt_deg']:+.1f}), diff {pair.yaw_diff_deg:+.1f} deg"
            )

    sheet_path = None
    if sheet_rows and out_dir is not None:
        sheet_path = out_dir / "sheets" / f"{name}.png"
        sheet_path.parent.mkdir(parents=True, exist_ok=True)
        save_png(sheet_path, contact_sheet(sheet_rows, sheet_titles))

    flicker = None
    if config.flicker:
        flicker = _clip_flicker(runner, framing, config)
    return records, flicker, str(sheet_path) if sheet_path else None


def _fmt(v: float | None, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.2f}{unit}"


def _sheet_row(outputs, target, head, rec, methods) -> list[np.ndarray]:
    """reference | raw | refined | target, with head-mask PSNR on each method tile."""
    S = target.shape[0]
    tiles = []
    for method in [BASELINE, "raw", "refined"] + [m for m in methods if m not in ("raw", "refined")]:
        title = "reference" if method == BASELINE else method
        if method in outputs:
            m = rec["methods"][method]
            lines = [f"PSNR {_fmt(m['psnr_head'])} dB", f"SSIM {_fmt(m['ssim_head'])}"]
            tiles.append(label_tile(outputs[method], title, lines))
        else:
            blank = np.full((S, S, 3), 0.85, np.float32)
            tiles.append(label_tile(blank, title, ["not run"]))
    tiles.append(label_tile(target, "target", outline=head))
    return tiles


def _clip_flicker(runner: MethodRunner, framing: Framing, config: EvalConfig) -> dict[str, float | None] | None:
    n = int(round(2 * config.flicker_yaw_deg / config.flicker_step_deg)) + 1
    yaws = np.linspace(-config.flicker_yaw_deg, config.flicker_yaw_deg, n)
    orbit = runner.orbit(framing, [OrbitPose(yaw_deg=float(y)) for y in yaws])
    if orbit is None:
        return None
    alpha = orbit.get("alpha")
    masks = None if alpha is None else (alpha > 0.5).astype(np.float32)
    motion = orbit.get("raw")
    out: dict[str, float | None] = {}
    for method, frames in orbit.items():
        if method == "alpha":
            continue
        value = temporal_flicker(frames, masks, flow_frames=motion if motion is not None else None)
        out[method] = value if math.isfinite(value) else None
    if out.get("raw") is not None and out.get("refined") is not None:
        out["refined_minus_raw"] = out["refined"] - out["raw"]
    return out


def evaluate(
    clips: Sequence[str | Path],
    runner: MethodRunner | None = None,
    config: EvalConfig = EvalConfig(),
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    meta: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Evaluate every clip; clips that cannot be read, hold no face or yield no
    pair are logged, listed in ``skipped`` and left out. With ``out_dir``,
    contact sheets are written there as the run goes (see :func:`write_results`
    for the rest)."""
    from tqdm.auto import tqdm

    runner = runner if runner is not None else CallableRunner()
    methods = (BASELINE,) + tuple(runner.methods)
    out_path = Path(out_dir) if out_dir is not None else None
    records: list[dict[str, Any]] = []
    flicker: dict[str, dict[str, float | None]] = {}
    skipped: list[dict[str, str]] = []
    sheets: dict[str, str] = {}
    evaluated: list[str] = []
    scorer = _Scorer(config)
    try:
        for path in tqdm(list(clips), desc="clips", unit="clip", disable=not progress):
            path = Path(path)
            try:
                index = index_clip(path, config.index, cache_dir=cache_dir, progress=progress)
                if not index.found.any():
                    raise NoFaceError(f"no face found in any of the {len(index)} analysed frames")
                clip_records, clip_flicker, sheet = _evaluate_clip(index, runner, config, scorer, progress, out_path)
            except (FaceAnalysisError, VideoReadError) as exc:
                reason = str(exc)
                log.warning("skipping clip '%s': %s", path.name, reason)
                skipped.append({"clip": path.stem, "path": str(path), "reason": reason})
                continue
            records.extend(clip_records)
            evaluated.append(path.stem)
            if clip_flicker is not None:
                flicker[path.stem] = clip_flicker
            if sheet:
                sheets[path.stem] = sheet
    finally:
        scorer.close()
    full_meta = _run_metadata()
    full_meta.update(meta or {})
    return EvalResult(config, methods, records, flicker, skipped, evaluated, full_meta, sheets)


# ----------------------------------------------------------------------------- aggregation


def _stats(values: Sequence[float | None]) -> dict[str, float | int | None]:
    vals = np.array([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if vals.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(vals.mean()), "median": float(np.median(vals)), "std": float(vals.std()), "n": int(vals.size)}


def _group(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        rows = [r["methods"][m] for r in records if m in r["methods"]]
        out[m] = {k: _stats([row.get(k) for row in rows]) for k in METRICS}
        tried = [row["lmk_failed"] for row in rows if row.get("lmk_failed") is not None]
        out[m]["lmk_fail_rate"] = float(np.mean(tried)) if tried else None
        out[m]["n_pairs"] = len(rows)
    return out


def aggregate(
    records: Sequence[Mapping[str, Any]], methods: Sequence[str], bins: Sequence[tuple[float, float]] = DEFAULT_BINS
) -> dict[str, Any]:
    """Pair-weighted statistics (mean, median, std, n) of every metric:
    {"per_bin": {bin: {method: ...}}, "per_clip": {clip: {"all": ..., bin: ...}}, "overall": {method: ...}}."""
    labels = [bin_label(b) for b in bins]
    per_bin = {lab: _group([r for r in records if r["bin"] == lab], methods) for lab in labels}
    per_clip: dict[str, Any] = {}
    for clip in dict.fromkeys(r["clip"] for r in records):
        rows = [r for r in records if r["clip"] == clip]
        per_clip[clip] = {"all": _group(rows, methods)}
        for lab in labels:
            sub = [r for r in rows if r["bin"] == lab]
            if sub:
                per_clip[clip][lab] = _group(sub, methods)
    return {"per_bin": per_bin, "per_clip": per_clip, "overall": _group(records, methods)}


# ----------------------------------------------------------------------------- output


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _run_metadata() -> dict[str, Any]:
    versions = {"python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__}
    for mod in ("torch", "mediapipe", "dlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional modules; absent or broken means "not reported"
            versions[mod] = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "platform": platform.platform(),
        "versions": versions,
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def _cell(stat: Mapping[str, Any] | None, digits: int) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f}"


_DIGITS = {"psnr_head": 2, "psnr_person": 2, "ssim_head": 3, "ssim_person": 3, "id_dist_target": 3,
           "id_dist_ref": 3, "lmk_err_pct": 1}


def results_markdown(result: EvalResult, summary: Mapping[str, Any] | None = None) -> str:
    """The tables of results.md (each says which mask it uses)."""
    summary = summary or result.summary()
    labels = [bin_label(b) for b in result.config.bins]
    methods = result.methods
    L: list[str] = ["# Novel-view evaluation", ""]
    L.append(f"{len(result.clips)} clip(s) evaluated, {len(result.skipped)} skipped, {len(result.records)} pairs; "
             f"crop size {result.config.size} px; methods: {', '.join(methods)}.")
    for note in result.meta.get("notes", []):
        L.append(f"- {note}")
    L += ["", "Pairs: the most frontal frame of each clip is the reference; targets binned by |yaw difference| "
          f"(degrees), at most {result.config.max_pairs_per_bin} per bin and clip, excluding frames within "
          f"{result.config.min_gap_frames} frames or {result.config.min_yaw_diff_deg} deg of the reference. "
          "Means over pairs (every pair weighs the same); n = pairs.", ""]

    def table(metric: str, title: str) -> None:
        L.append(f"## {title}")
        L.append("")
        L.append("| method | " + " | ".join(f"{lab} deg" for lab in labels) + " | all |")
        L.append("|---|" + "---|" * (len(labels) + 1))
        d = _DIGITS[metric]
        for m in methods:
            cells = [_cell(summary["per_bin"][lab][m][metric], d) for lab in labels]
            cells.append(_cell(summary["overall"][m][metric], d))
            L.append(f"| {m} | " + " | ".join(cells) + " |")
        ns = [str(summary["per_bin"][lab][methods[0]][metric]["n"]) for lab in labels]
        L.append("| n | " + " | ".join(ns) + f" | {summary['overall'][methods[0]][metric]['n']} |")
        L.append("")

    table("psnr_head", "PSNR (dB), HEAD mask (primary)")
    table("ssim_head", "SSIM, HEAD mask (primary)")
    table("psnr_person", "PSNR (dB), PERSON mask")
    table("ssim_person", "SSIM, PERSON mask")
    if result.config.identity:
        table("id_dist_target", "Identity distance to the target (dlib, lower is better; no mask: face crop)")
        table("id_dist_ref", "Identity distance to the reference (dlib; no mask: face crop)")
    if result.config.landmarks:
        table("lmk_err_pct", "Landmark error, % of inter-ocular distance (no mask: face mesh)")
        L.append("The reenacted avatar takes its geometry from the target's own landmarks, so for raw/refined this "
                 "measures how well the picture keeps that geometry (renderer, refiner), not pose prediction; "
                 "for the baseline it measures the head motion between the two frames.")
        L.append("")
        L.append("Face-mesh failures on the output (no face found), share of pairs:")
        L.append("")
        L.append("| method | " + " | ".join(f"{lab} deg" for lab in labels) + " | all |")
        L.append("|---|" + "---|" * (len(labels) + 1))
        for m in methods:
            cells = [summary["per_bin"][lab][m]["lmk_fail_rate"] for lab in labels] + [summary["overall"][m]["lmk_fail_rate"]]
            L.append(f"| {m} | " + " | ".join("–" if c is None else f"{100 * c:.0f}%" for c in cells) + " |")
        L.append("")

    L.append("## Per clip: PSNR (dB) / SSIM, HEAD mask, all bins")
    L.append("")
    L.append("| clip | pairs | " + " | ".join(methods) + " |")
    L.append("|---|---|" + "---|" * len(methods))
    for clip, groups in summary["per_clip"].items():
        g = groups["all"]
        cells = [f"{_cell(g[m]['psnr_head'], 2)} / {_cell(g[m]['ssim_head'], 3)}" for m in methods]
        L.append(f"| {clip} | {g[methods[0]]['n_pairs']} | " + " | ".join(cells) + " |")
    L.append("")

    if result.flicker:
        L.append(f"## Temporal flicker, slow orbit (yaw -{result.config.flicker_yaw_deg:g}..+"
                 f"{result.config.flicker_yaw_deg:g} deg in {result.config.flicker_step_deg:g} deg steps)")
        L.append("")
        L.append("Mean |frame t - frame t+1 warped back| inside the rendered head (alpha > 0.5), in 8-bit levels "
                 "(x255); motion from DIS optical flow on the raw renders, occlusions left out by a "
                 "forward-backward check. refined - raw = flicker the refiner adds.")
        L.append("")
        keys = [k for k in ("raw", "refined", "refined_minus_raw") if any(k in f for f in result.flicker.values())]
        L.append("| clip | " + " | ".join(keys) + " |")
        L.append("|---|" + "---|" * len(keys))
        for clip, f in result.flicker.items():
            L.append(f"| {clip} | " + " | ".join("–" if f.get(k) is None else f"{255 * f[k]:.2f}" for k in keys) + " |")
        L.append("")
    elif result.config.flicker:
        L.append("Flicker: not measured (no method renders an orbit).")
        L.append("")

    if result.skipped:
        L.append("## Skipped clips")
        L.append("")
        for s in result.skipped:
            L.append(f"- {s['clip']}: {s['reason']}")
        L.append("")
    if result.sheets or result.records:
        L.append("## Pictures")
        L.append("")
        L.append("Contact sheets (reference | raw | refined | target with the head mask outlined): `sheets/<clip>.png`. "
                 "Metric against |yaw difference|: `plots/<metric>.png`.")
        L.append("")
    return "\n".join(L)


def write_results(result: EvalResult, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and plots/<metric>.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    doc = {
        "meta": {**result.meta, "config": asdict(result.config), "methods": list(result.methods),
                 "metrics": METRICS, "masks": {"head": "target head region (face oval grown upward, "
                                               "intersected with the person mask)", "person": "target person mask"}},
        "clips": result.clips,
        "skipped": result.skipped,
        "overall": summary["overall"],
        "per_bin": summary["per_bin"],
        "per_clip": summary["per_clip"],
        "flicker": result.flicker,
        "pairs": result.records,
        "sheets": result.sheets,
    }
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False))
    paths["md"].write_text(results_markdown(result, summary))
    plot_dir = out / "plots"
    plot_dir.mkdir(exist_ok=True)
    for metric, description in METRICS.items():
        series = series_from_records(result.records, result.methods, metric)
        if not any(np.isfinite(s.y).any() for s in series):
            continue
        img = scatter_plot(series, description[:80], "|yaw difference| (deg)", metric, bins=result.config.bins)
        paths[f"plot_{metric}"] = plot_dir / f"{metric}.png"
        save_png(paths[f"plot_{metric}"], img)
    return paths
