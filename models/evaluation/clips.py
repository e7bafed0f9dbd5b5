"""Clip index: per-frame face analysis of one video, cached on disk, and the
(reference, target) pair selection shared by evaluation and training stage 2.

Frame ids are VIDEO frame numbers (0-based, decode order) everywhere in this
module: ``ClipIndex.frame_ids`` holds the analysed ones, ``Pair.ref`` /
``Pair.tgt`` and every accessor take them, and :meth:`ClipIndex.read_frames`
returns frames keyed by them. Yaw/pitch/roll are the head pose of
:class:`models.face.analysis.HeadPose` in degrees (yaw + = the head shows its
left cheek, like an orbit camera at + yaw).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from models.face.analysis import (
    NUM_LANDMARKS,
    FaceAnalysisError,
    FaceAnalyzer,
    FaceConfig,
    FaceObservation,
    NoFaceError,
    head_region_mask,
    metric_landmarks,
)
from models.pictures import to_uint8

log = logging.getLogger(__name__)

__all__ = [
    "VIDEO_SUFFIXES",
    "DEFAULT_BINS",
    "VideoReadError",
    "ClipIndexConfig",
    "ClipIndex",
    "default_cache_dir",
    "find_clips",
    "index_clip",
    "Pair",
    "bin_label",
    "frontality_score",
    "reference_frame",
    "near_frontal_frames",
    "pairs",
    "clip_identity",
    "split_by_identity",
]

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
DEFAULT_BINS: tuple[tuple[float, float], ...] = ((0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 45.0))
"""|yaw(target) - yaw(reference)| bins in degrees, each half-open [lo, hi)."""
_CACHE_VERSION = 1


class VideoReadError(FaceAnalysisError):
    """The video file is missing, not a video, or holds no frames."""


@dataclass(frozen=True)
class ClipIndexConfig:
    """What :func:`index_clip` analyses and stores (part of the cache key)."""

    stride: int = 1
    """Analyse every ``stride``-th frame (frame ids 0, stride, 2 * stride, ...)."""
    max_frames: int | None = None
    """Stop after this many analysed frames; None = the whole clip."""
    mask_size: int = 256
    """Long side, in pixels, of the stored person mask (uint8, 0..255); never above the video's."""
    fov_deg: float = 30.0
    """Assumed vertical field of view of the video camera (see models.face.analysis)."""
    min_detection_confidence: float = 0.5
    """MediaPipe face-detection threshold."""

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"stride: expected >= 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames: expected >= 1 or None (every frame), got {self.max_frames}")
        if not 16 <= self.mask_size <= 4096:
            raise ValueError(f"expected mask_size in [16, 4096], got {self.mask_size}")
        if not 1.0 <= self.fov_deg <= 150.0:
            raise ValueError(f"expected fov_deg in [1, 150], got {self.fov_deg}")


@dataclass(frozen=True, eq=False)
class ClipIndex:
    """Face analysis of the frames of one video (N analysed frames)."""

    path: str
    """The video file, as given."""
    config: ClipIndexConfig
    image_size: tuple[int, int]
    """(H, W) of the video frames."""
    fps: float
    frame_ids: np.ndarray = field(repr=False)
    """[N] int64 video frame numbers of the analysed frames, increasing."""
    found: np.ndarray = field(repr=False)
    """[N] bool, False where no face was found (frame recorded as missing)."""
    landmarks: np.ndarray = field(repr=False)
    """[N, 478, 3] float32 landmarks in pixels (models.face.analysis convention); NaN where missing."""
    pose_deg: np.ndarray = field(repr=False)
    """[N, 3] float32 head yaw, pitch, roll in degrees; NaN where missing."""
    masks: np.ndarray = field(repr=False)
    """[N, h, w] uint8 person mask (255 = person), long side ``config.mask_size``; 0 where missing."""

    def __post_init__(self) -> None:
        n = len(self.frame_ids)
        for name, arr, shape in (
            ("found", self.found, (n,)),
            ("landmarks", self.landmarks, (n, NUM_LANDMARKS, 3)),
            ("pose_deg", self.pose_deg, (n, 3)),
        ):
            if arr.shape != shape:
                raise ValueError(f"expected {name} of shape {shape}, got {arr.shape}")
        if self.masks.ndim != 3 or self.masks.shape[0] != n:
            raise ValueError(f"expected masks [{n}, h, w], got {self.masks.shape}")
        if n > 1 and np.any(np.diff(self.frame_ids) <= 0):
            raise ValueError("expected increasing frame_ids")
        object.__setattr__(self, "_pos", {int(f): i for i, f in enumerate(self.frame_ids)})

    # -- lookup ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The file name without its suffix."""
        return Path(self.path).stem

    def __len__(self) -> int:
        return len(self.frame_ids)

    @property
    def valid_frame_ids(self) -> np.ndarray:
        """[M] frame ids with a face."""
        return self.frame_ids[self.found]

    @property
    def missing_frame_ids(self) -> np.ndarray:
        """[N - M] analysed frame ids without a face."""
        return self.frame_ids[~self.found]

    def position(self, frame_id: int) -> int:
        """Row of ``frame_id`` in the arrays; raises KeyError for a frame not analysed."""
        try:
            return self._pos[int(frame_id)]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(f"expected an analysed frame id of '{self.name}', got {frame_id}") from None

    def _valid_position(self, frame_id: int) -> int:
        i = self.position(frame_id)
        if not self.found[i]:
            raise NoFaceError(f"no face in frame {frame_id} of '{self.name}'")
        return i

    def yaw_deg(self, frame_id: int) -> float:
        return float(self.pose_deg[self.position(frame_id), 0])

    def person_mask(self, frame_id: int) -> np.ndarray:
        """Person mask [H, W] float32 in [0, 1] at the video size (upsampled from the stored one)."""
        i = self._valid_position(frame_id)
        H, W = self.image_size
        return cv2.resize(self.masks[i], (W, H), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0

    def head_mask(self, frame_id: int) -> np.ndarray:
        """Head region [H, W] float32 in {0, 1} (models.face.analysis.head_region_mask)."""
        i = self._valid_position(frame_id)
        return head_region_mask(self.landmarks[i], self.image_size, self.person_mask(frame_id))

    def observation(self, frame_id: int, with_mask: bool = True) -> FaceObservation:
        """The FaceObservation of a frame, rebuilt from the stored landmarks
        (metric points and pose are recomputed; the mask is the stored one, upsampled)."""
        i = self._valid_position(frame_id)
        lms = self.landmarks[i].copy()
        points, pose = metric_landmarks(lms, self.image_size, self.config.fov_deg)
        return FaceObservation(
            image_size=self.image_size,
            landmarks_px=lms,
            points_cam=points,
            pose=pose,
            fov_deg=self.config.fov_deg,
            mask=self.person_mask(frame_id) if with_mask else None,
        )

    def read_frames(self, frame_ids: Iterable[int]) -> dict[int, np.ndarray]:
        """Decode the video once and return {frame id: RGB uint8 [H, W, 3]} for the ids asked."""
        wanted = sorted({int(f) for f in frame_ids})
        if not wanted:
            return {}
        out: dict[int, np.ndarray] = {}
        cap = _open_video(self.path)
        try:
            k = 0
            while k <= wanted[-1]:
                ok, bgr = cap.read()
                if not ok:
                    break
                if k in wanted:
                    out[k] = np.ascontiguousarray(bgr[:, :, ::-1])
                k += 1
        finally:
            cap.release()
        missing = [f for f in wanted if f not in out]
        if missing:
            raise VideoReadError(f"expected frames {missing[:5]} in '{self.path}', got only {k} frames")
        return out

    # -- storage -----------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write a compressed .npz (all arrays plus a JSON header)."""
        header = {
            "version": _CACHE_VERSION,
            "path": self.path,
            "config": asdict(self.config),
            "image_size": list(self.image_size),
            "fps": self.fps,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(
            tmp,
            header=np.frombuffer(json.dumps(header).encode(), np.uint8),
            frame_ids=self.frame_ids,
            found=self.found,
            landmarks=self.landmarks,
            pose_deg=self.pose_deg,
            masks=self.masks,
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "ClipIndex":
        with np.load(path) as data:
            header = json.loads(bytes(data["header"]).decode())
            if header.get("version") != _CACHE_VERSION:
                raise ValueError(f"expected clip index version {_CACHE_VERSION}, got {header.get('version')}")
            return cls(
                path=header["path"],
                config=ClipIndexConfig(**header["config"]),
                image_size=tuple(header["image_size"]),
                fps=float(header["fps"]),
                frame_ids=data["frame_ids"],
                found=data["found"],
                landmarks=data["landmarks"],
                pose_deg=data["pose_deg"],
                masks=data["masks"],
            )


def default_cache_dir() -> Path:
    """$TELEPRESENCE_CACHE_DIR/clips, else ~/.cache/telepresence/clips."""
    root = os.environ.get("TELEPRESENCE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "telepresence") / "clips"


def find_clips(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Video files among ``paths`` (files, or folders searched one level deep), sorted by name."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in VIDEO_SUFFIXES and q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise VideoReadError(f"expected a video file or a folder of videos, got '{p}': no such path")
    return out


def _open_video(path: str | Path) -> cv2.VideoCapture:
    path = Path(path)
    if path.is_dir():  # as read_image says of one (render --video DIR said "no such file")
        raise VideoReadError(f"cannot read video '{path}': it is a directory")
    if not path.is_file():
        raise VideoReadError(f"cannot read video '{path}': no such file")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise VideoReadError(f"cannot read video '{path}': not a video file, or corrupt")
    return cap


def _cache_file(path: Path, config: ClipIndexConfig, cache_dir: Path) -> Path:
    st = path.stat()
    key = json.dumps(
        [str(path.resolve()), st.st_size, st.st_mtime_ns, asdict(config), _CACHE_VERSION], sort_keys=True
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_dir / f"{path.stem}-{digest}.npz"


def index_clip(
    path: str | Path,
    config: ClipIndexConfig = ClipIndexConfig(),
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ClipIndex:
    """Analyse a video frame by frame (MediaPipe in tracking mode) into a ClipIndex.

    cache_dir: where to keep the result, keyed by the file's absolute path,
    size, mtime and ``config`` (None = no cache). A tqdm bar shows progress.
    Frames without a face are recorded as missing. Raises VideoReadError for a
    file that cannot be decoded or holds no frames.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    cap = _open_video(path)
    cache = _cache_file(path, config, Path(cache_dir)) if cache_dir is not None else None
    if cache is not None and cache.exists():
        try:
            index = ClipIndex.load(cache)
            cap.release()
            log.debug("clip index of '%s' from cache %s", path, cache)
            # The cache is keyed by the absolute path; the file it read may have been named from another folder.
            return replace(index, path=str(path))
        except (ValueError, KeyError, OSError) as exc:
            log.warning("ignoring unreadable clip cache %s: %s", cache, exc)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    expected = math.ceil(total / config.stride) if total > 0 else None
    if config.max_frames is not None and expected is not None:
        expected = min(expected, config.max_frames)

    face_config = FaceConfig(
        static_image=False,
        max_faces=1,
        min_detection_confidence=config.min_detection_confidence,
        segmentation=True,
        fov_deg=config.fov_deg,
    )
    ids, found, lms, poses, masks = [], [], [], [], []
    image_size: tuple[int, int] | None = None
    mask_hw: tuple[int, int] | None = None
    bar = tqdm(total=expected, desc=f"index {path.stem}", unit="frame", disable=not progress, leave=False)
    try:
        with FaceAnalyzer(face_config) as analyzer:
            k = -1
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                k += 1
                if k % config.stride:
                    continue
                rgb = np.ascontiguousarray(bgr[:, :, ::-1])
                if image_size is None:
                    image_size = rgb.shape[:2]
                    scale = min(1.0, config.mask_size / max(image_size))
                    mask_hw = (max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale)))
                ids.append(k)
                try:
                    obs = analyzer.analyze(rgb)
                except NoFaceError:
                    found.append(False)
                    lms.append(np.full((NUM_LANDMARKS, 3), np.nan, np.float32))
                    poses.append(np.full(3, np.nan, np.float32))
                    masks.append(np.zeros(mask_hw, np.uint8))
                else:
                    found.append(True)
                    lms.append(obs.landmarks_px.astype(np.float32))
                    poses.append(np.array([obs.pose.yaw_deg, obs.pose.pitch_deg, obs.pose.roll_deg], np.float32))
                    small = cv2.resize(obs.mask, (mask_hw[1], mask_hw[0]), interpolation=cv2.INTER_AREA)
                    masks.append(to_uint8(small))
                bar.update(1)
                if config.max_frames is not None and len(ids) >= config.max_frames:
                    break
    finally:
        bar.close()
        cap.release()
    if not ids:
        raise VideoReadError(f"cannot read video '{path}': no frames decoded")
    index = ClipIndex(
        path=str(path),
        config=config,
        image_size=tuple(image_size),
        fps=fps,
        frame_ids=np.asarray(ids, np.int64),
        found=np.asarray(found, bool),
        landmarks=np.stack(lms),
        pose_deg=np.stack(poses),
        masks=np.stack(masks),
    )
    log.info("indexed '%s': %d frames analysed, %d with a face", path.name, len(index), int(index.found.sum()))
    if cache is not None:
        index.save(cache)
    return index


# ----------------------------------------------------------------------------- pairs


class Pair(NamedTuple):
    """One (reference, target) pair; unpacks as ``ref, tgt, yaw_diff_deg, bin``."""

    ref: int
    """Video frame id of the reference (source) frame."""
    tgt: int
    """Video frame id of the target frame."""
    yaw_diff_deg: float
    """yaw(target) - yaw(reference), signed, degrees."""
    bin: tuple[float, float]
    """The |yaw_diff_deg| bin [lo, hi) it was drawn from."""


def bin_label(b: tuple[float, float]) -> str:
    """(10.0, 20.0) -> '10-20'; an open-ended bin (hi >= 180 degrees) -> '60+'."""
    return f"{b[0]:g}+" if b[1] >= 180.0 else f"{b[0]:g}-{b[1]:g}"


def frontality_score(index: ClipIndex, pitch_weight: float = 0.5) -> np.ndarray:
    """[N] |yaw| + pitch_weight * |pitch - median pitch of the clip| in degrees; inf where missing.

    Pitch is measured against the clip's median, not zero: the camera height
    and the guessed field of view bias the estimated pitch of a whole clip,
    while the head turns around it.
    """
    score = np.full(len(index), np.inf)
    if not index.found.any():
        return score
    yaw, pitch = index.pose_deg[:, 0].astype(np.float64), index.pose_deg[:, 1].astype(np.float64)
    med = float(np.median(pitch[index.found]))
    ok = index.found
    score[ok] = np.abs(yaw[ok]) + pitch_weight * np.abs(pitch[ok] - med)
    return score


def reference_frame(index: ClipIndex, pitch_weight: float = 0.5) -> int:
    """Frame id of the most frontal frame (smallest :func:`frontality_score`; the earliest on ties).
    Raises NoFaceError when no frame has a face."""
    score = frontality_score(index, pitch_weight)
    if not np.isfinite(score).any():
        raise NoFaceError(f"no face in any analysed frame of '{index.name}'")
    return int(index.frame_ids[int(np.argmin(score))])


def near_frontal_frames(index: ClipIndex, max_score_deg: float = 8.0, pitch_weight: float = 0.5) -> list[int]:
    """Frame ids whose :func:`frontality_score` is at most ``max_score_deg`` (candidate
    references for training), in frame order; at least the single most frontal one."""
    score = frontality_score(index, pitch_weight)
    ids = [int(f) for f, s in zip(index.frame_ids, score) if s <= max_score_deg]
    return ids or [reference_frame(index, pitch_weight)]


def pairs(
    index: ClipIndex,
    bins: Sequence[tuple[float, float]] = DEFAULT_BINS,
    max_per_bin: int | None = 8,
    min_gap_frames: int = 5,
    min_yaw_diff_deg: float = 0.5,
    ref: int | Sequence[int] | None = None,
    rng: np.random.Generator | int | None = None,
) -> list[Pair]:
    """(reference, target) pairs binned by |yaw(target) - yaw(reference)|.

    ref: reference frame id(s); None = :func:`reference_frame`. Targets are the
    frames with a face, excluding near-duplicates of the reference: those
    within ``min_gap_frames`` frames of it (|tgt - ref| < min_gap_frames) and
    those whose |yaw difference| is below ``min_yaw_diff_deg``. Each bin keeps
    at most ``max_per_bin`` pairs (None = all): with rng=None, evenly spaced in
    (ref, tgt) order (deterministic, spread over the clip); with a seed or a
    numpy Generator, a random subset. Returns pairs sorted by bin, then (ref, tgt).
    """
    if max_per_bin is not None and max_per_bin < 1:
        raise ValueError(f"expected max_per_bin >= 1 or None, got {max_per_bin}")
    for lo, hi in bins:
        if not 0.0 <= lo < hi:
            raise ValueError(f"expected bins as (lo, hi) with 0 <= lo < hi, got {(lo, hi)}")
    if ref is None:
        refs = [reference_frame(index)]
    elif isinstance(ref, (int, np.integer)):
        refs = [int(ref)]
    else:
        refs = [int(r) for r in ref]
    generator = np.random.default_rng(rng) if rng is not None and not isinstance(rng, np.random.Generator) else rng

    tgt_ids = index.valid_frame_ids
    tgt_yaw = index.pose_deg[index.found, 0].astype(np.float64)
    out: list[Pair] = []
    per_bin: dict[tuple[float, float], list[Pair]] = {tuple(b): [] for b in bins}
    for r in refs:
        r_yaw = float(index.pose_deg[index._valid_position(r), 0])
        diff = tgt_yaw - r_yaw
        keep = (np.abs(tgt_ids - r) >= max(min_gap_frames, 1)) & (np.abs(diff) >= min_yaw_diff_deg)
        for b in per_bin:
            sel = keep & (np.abs(diff) >= b[0]) & (np.abs(diff) < b[1])
            per_bin[b].extend(Pair(r, int(t), float(d), b) for t, d in zip(tgt_ids[sel], diff[sel]))
    for b, cands in per_bin.items():
        cands.sort(key=lambda p: (p.ref, p.tgt))
        if max_per_bin is not None and len(cands) > max_per_bin:
            if generator is None:
                picks = np.unique(np.round(np.linspace(0, len(cands) - 1, max_per_bin)).astype(int))
            else:
                picks = np.sort(generator.choice(len(cands), size=max_per_bin, replace=False))
            cands = [cands[i] for i in picks]
        out.extend(cands)
    return out


# ----------------------------------------------------------------------------- splits

_CLIP_SUFFIX = re.compile(r"([_-]?clip[_-]?\d+)?([_-]short)?$", re.IGNORECASE)
_MEAD_SPEAKER = re.compile(r"^(.*?[_-])?([MW]\d{3})_", re.IGNORECASE)


def clip_identity(name: str) -> str:
    """Best-effort identity key of a clip name (file name without suffix).

    Drops a trailing clip number ('Obama_clip2' -> 'obama', 'andrew_clip_1',
    'talk2_clip3', '..._clip2_short'), keeps the MEAD speaker id of names like
    'dreamtalk_M030_front_angry_level3_001' ('m030'), and lower-cases. Clips of
    one person with unrelated names need an explicit ``identity`` function.
    """
    stem = Path(name).stem if Path(name).suffix.lower() in VIDEO_SUFFIXES else name
    m = _MEAD_SPEAKER.match(stem)
    if m:
        return m.group(2).lower()
    return _CLIP_SUFFIX.sub("", stem).lower()


def split_by_identity(
    names: Sequence[str],
    held_out: Sequence[str],
    identity: Callable[[str], str] = clip_identity,
) -> tuple[list[str], list[str]]:
    """Split clip names into (train, validation) BY IDENTITY.

    Every clip whose ``identity(name)`` equals that of a held-out name goes to
    validation, so no person is on both sides. held_out must name clips in
    ``names``. Both lists keep the order of ``names``.
    """
    unknown = [h for h in held_out if h not in names]
    if unknown:
        raise ValueError(f"expected held-out names among the clip names, got unknown {unknown}")
    val_ids = {identity(h) for h in held_out}
    train = [n for n in names if identity(n) not in val_ids]
    val = [n for n in names if identity(n) in val_ids]
    return train, val
