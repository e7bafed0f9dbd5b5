"""Synchronized multi-camera sets (one person, one moment, several cameras): reading a set folder,
analysing its views, the reference (the most frontal view), each target's angle to it (from the
cameras where the set gives them, else measured) and the target mapped into the reference camera,
so that the harness scores it exactly like a clip pair (models.evaluation.harness).

A set is a folder of pictures, optionally with a ``views.json``::

    {"views": [{"file": "cam28.jpg", "azimuth_deg": -170.7, "elevation_deg": 0.0}, ...],
     "reference": "cam28.jpg",       # optional: the frontal view (default: the most frontal measured)
     "azimuth_sign": -1}             # optional: +1 when azimuth grows toward + yaw (default: fitted)

``"tiles": [file, ...]`` may stand for ``"views"``; other keys (notes, heights in metres or as
labels, earlier measurements) are ignored. Without views.json every picture of the folder is a
view and every angle is measured. Yaw and pitch follow models.face.analysis.HeadPose (yaw + = the
head shows its left cheek, like an orbit camera at + yaw).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from models.face.analysis import (
    FaceAnalysisError,
    FaceAnalyzer,
    FaceObservation,
    NoFaceError,
    observation_from_landmarks,
    read_image,
)

__all__ = [
    "IMAGE_SUFFIXES", "MULTIVIEW_BINS", "SetReadError", "UnusableSetError", "MultiviewConfig", "View", "MultiviewSet",
    "SetAnalysis", "TargetAngle", "find_sets", "read_set", "analyse_set", "reference_view", "view_angle_deg",
    "target_angles", "align_to_reference",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MULTIVIEW_BINS: tuple[tuple[float, float], ...] = (
    (0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 45.0), (45.0, 60.0), (60.0, 180.0))
"""Bins of the angle between the target's and the reference's view directions, degrees, half-open [lo, hi)."""


class SetReadError(FaceAnalysisError):
    """The folder is not a multi-camera set, its views.json is malformed, or a picture cannot be read."""


class UnusableSetError(FaceAnalysisError):
    """The set holds faces but no (reference, target) pair: fewer than two views with a face."""


@dataclass(frozen=True)
class MultiviewConfig:
    """How multi-camera sets are analysed and binned (part of EvalConfig)."""

    bins: tuple[tuple[float, float], ...] = MULTIVIEW_BINS
    """Bins of the view angle (degrees, half-open [lo, hi)); a target outside them is skipped."""
    pitch_weight: float = 0.5
    """Reference = the view with the smallest |yaw| + pitch_weight |pitch| (measured), unless the set names one."""
    max_angle_disagreement_deg: float = 30.0
    """A set's camera angles are used only if every target's camera difference agrees with its measured one within
    this (MediaPipe reads a 60-degree camera as about 48 degrees); otherwise all of its angles are measured."""
    fov_deg: float = 30.0
    """Assumed vertical field of view of every camera (see models.face.analysis)."""

    def __post_init__(self) -> None:
        if not self.bins:
            raise ValueError("expected at least one angle bin, got none")
        for lo, hi in self.bins:
            if not 0.0 <= lo < hi:
                raise ValueError(f"expected bins as (lo, hi) with 0 <= lo < hi, got {(lo, hi)}")
        if self.pitch_weight < 0 or self.max_angle_disagreement_deg <= 0:
            raise ValueError(f"expected pitch_weight >= 0 and max_angle_disagreement_deg > 0, got "
                             f"{self.pitch_weight}, {self.max_angle_disagreement_deg}")
        if not 1.0 <= self.fov_deg <= 150.0:
            raise ValueError(f"expected fov_deg in [1, 150], got {self.fov_deg}")


@dataclass(frozen=True)
class View:
    """One camera of a set."""

    file: str
    """Picture file name inside the set folder."""
    camera: str | None = None
    azimuth_deg: float | None = None
    """Camera azimuth around the head, degrees (any zero), or None when the set does not give it."""
    elevation_deg: float | None = None
    """Camera elevation, degrees (+ = above), or None."""


@dataclass(frozen=True)
class MultiviewSet:
    """A set folder as read from disk (pictures not loaded)."""

    path: Path
    views: tuple[View, ...]
    reference: str | None = None
    """The view the set names as frontal, or None (the most frontal measured one is used)."""
    azimuth_sign: int | None = None
    """+1 / -1: sign from azimuth difference to yaw difference; None: fitted to the measured yaws."""

    @property
    def name(self) -> str:
        return self.path.name


def _is_set(folder: Path) -> bool:
    return (folder / "views.json").is_file() or any(
        q.suffix.lower() in IMAGE_SUFFIXES and q.is_file() for q in folder.iterdir())


def find_sets(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Set folders among ``paths``: a set folder itself, or a folder whose sub-folders are sets (one level)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise SetReadError(f"expected a multi-camera set folder or a folder of sets, got '{p}': "
                               f"{'a file' if p.exists() else 'no such folder'}")
        out.extend([p] if _is_set(p) else sorted(q for q in p.iterdir() if q.is_dir() and _is_set(q)))
    return out


def _angle(entry: Mapping, key: str, where: str) -> float | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SetReadError(f"expected {key} as a number of degrees in {where}, got {value!r}")
    return float(value)


def read_set(path: str | Path) -> MultiviewSet:
    """The views of a set folder (views.json, else every picture in it); raises SetReadError."""
    path = Path(path)
    meta = path / "views.json"
    if meta.is_file():
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError) as exc:
            raise SetReadError(f"cannot read '{meta}': {exc}") from exc
        entries = doc.get("views") if isinstance(doc, dict) else None
        if entries is None and isinstance(doc, dict) and isinstance(doc.get("tiles"), list):
            entries = [{"file": t} for t in doc["tiles"]]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                                    for e in entries):
            raise SetReadError(f"expected views.json with a list 'views' of {{'file': ...}} (or 'tiles'), got {meta}")
        views = tuple(View(e["file"], None if e.get("camera") is None else str(e["camera"]),
                           _angle(e, "azimuth_deg", str(meta)), _angle(e, "elevation_deg", str(meta)))
                      for e in entries)
        reference, sign = doc.get("reference"), doc.get("azimuth_sign")
        if sign not in (None, 1, -1):
            raise SetReadError(f"expected azimuth_sign +1 or -1 in {meta}, got {sign!r}")
    else:
        views = tuple(View(q.name) for q in sorted(path.iterdir()) if q.suffix.lower() in IMAGE_SUFFIXES)
        reference, sign = None, None
    missing = [v.file for v in views if not (path / v.file).is_file()]
    if missing:
        raise SetReadError(f"expected the pictures of set '{path.name}', got no file {missing[:3]}")
    if len(views) < 2:
        raise SetReadError(f"expected at least 2 views in set '{path.name}', got {len(views)}")
    if reference is not None and reference not in {v.file for v in views}:
        raise SetReadError(f"expected the reference of set '{path.name}' among its views, got {reference!r}")
    return MultiviewSet(path, views, reference, sign)


@dataclass(frozen=True, eq=False)
class SetAnalysis:
    """A set's pictures and face analysis."""

    set: MultiviewSet
    images: dict[str, np.ndarray] = field(repr=False)
    """View file -> RGB uint8 [H, W, 3]."""
    observations: dict[str, FaceObservation] = field(repr=False)
    """View file -> face analysis (with person mask), for the views with a face."""
    missing: dict[str, str]
    """View file -> why it has no observation."""

    def view(self, file: str) -> View:
        return next(v for v in self.set.views if v.file == file)


def analyse_set(mvset: MultiviewSet, analyzer: FaceAnalyzer) -> SetAnalysis:
    """Read every view and run the face analysis (a static-image analyzer with segmentation) on it."""
    images, observations, missing = {}, {}, {}
    for view in mvset.views:
        try:
            images[view.file] = read_image(mvset.path / view.file)
        except FaceAnalysisError as exc:
            raise SetReadError(f"cannot read view '{view.file}' of set '{mvset.name}': {exc}") from exc
        try:
            observations[view.file] = analyzer.analyze(images[view.file], with_mask=True)
        except NoFaceError:
            missing[view.file] = "no face found (MediaPipe face mesh): the back or side of the head"
    return SetAnalysis(mvset, images, observations, missing)


def reference_view(analysis: SetAnalysis, pitch_weight: float = 0.5) -> str:
    """The view the set names, else the view with a face of smallest |yaw| + pitch_weight |pitch|
    (the first on ties). Raises UnusableSetError when the named one or every view has no face."""
    named = analysis.set.reference
    if named is not None:
        if named not in analysis.observations:
            raise UnusableSetError(f"the reference view '{named}' of set '{analysis.set.name}' has no face")
        return named
    if not analysis.observations:
        raise NoFaceError(f"no face found in any of the {len(analysis.set.views)} views of set '{analysis.set.name}'")
    return min(analysis.observations, key=lambda f: abs(analysis.observations[f].pose.yaw_deg)
               + pitch_weight * abs(analysis.observations[f].pose.pitch_deg))


def view_angle_deg(yaw_diff_deg: float, pitch_diff_deg: float) -> float:
    """Angle between the reference's view direction and the direction (yaw_diff, pitch_diff) from it, degrees:
    acos(cos(yaw_diff) cos(pitch_diff)), rounded to 1e-6 degrees so that it equals |yaw_diff| when
    pitch_diff = 0 (a camera at 30 degrees falls in the 30-45 bin)."""
    y, p = math.radians(yaw_diff_deg), math.radians(pitch_diff_deg)
    # atan2(|d x z|, d . z) for d = (sin y cos p, sin p, cos y cos p): accurate at small angles too.
    return round(math.degrees(math.atan2(math.hypot(math.sin(y) * math.cos(p), math.sin(p)), math.cos(y) * math.cos(p))), 6)


@dataclass(frozen=True)
class TargetAngle:
    """Where a target camera sits relative to the reference one."""

    yaw_diff_deg: float
    """yaw(target) - yaw(reference), the value used (from ``yaw_source``)."""
    pitch_diff_deg: float
    """pitch(target) - pitch(reference), the value used (from ``pitch_source``)."""
    yaw_source: str
    """"cameras" (the set's azimuths) or "measured" (MediaPipe head pose in each view)."""
    pitch_source: str
    yaw_diff_measured_deg: float
    pitch_diff_measured_deg: float

    @property
    def angle_deg(self) -> float:
        return view_angle_deg(self.yaw_diff_deg, self.pitch_diff_deg)


def _wrap_deg(a: float) -> float:
    return (a + 180.0) % 360.0 - 180.0


def _from_cameras(
    camera: Mapping[str, float], measured: Mapping[str, float], sign: int | None, tol_deg: float, what: str
) -> tuple[dict[str, float], str]:
    """Camera differences (signed by ``sign``, else by the sign that fits the measured ones best) for the
    targets that have one, when every such target agrees with its measurement within tol_deg; else {}.
    Returns (values, a note saying what was used)."""
    if not camera:
        return {}, f"{what} measured"
    signs = [sign] if sign is not None else [1, -1]
    err = {s: max(abs(s * camera[t] - measured[t]) for t in camera) for s in signs}
    best = min(signs, key=lambda s: (err[s], -s))
    how = "given" if sign is not None else "fitted"
    if err[best] > tol_deg:
        return {}, (f"{what} measured: the cameras' {what} disagrees with the measured one by up to {err[best]:.0f} deg "
                    f"(sign {best:+d} {how}; limit {tol_deg:g})")
    return ({t: best * d for t, d in camera.items()},
            f"{what} from the cameras (sign {best:+d} {how}; at most {err[best]:.0f} deg from the measured)")


def target_angles(
    analysis: SetAnalysis, ref: str, max_disagreement_deg: float = 30.0
) -> tuple[dict[str, TargetAngle], str]:
    """The angle of every other view with a face relative to ``ref``, and a note on where they come from.

    Camera differences: wrap(azimuth(t) - azimuth(ref)) for yaw, elevation(t) - elevation(ref) for pitch,
    where the set gives both views' values; their sign (the set's azimuth convention) is the set's
    ``azimuth_sign`` or the one that fits the measured differences. All of a set's camera values are
    dropped for measured ones when any target disagrees by more than ``max_disagreement_deg``.
    """
    obs = analysis.observations
    r_view, r_pose = analysis.view(ref), obs[ref].pose
    targets = [f for f in obs if f != ref]
    yaw_m = {t: obs[t].pose.yaw_deg - r_pose.yaw_deg for t in targets}
    pitch_m = {t: obs[t].pose.pitch_deg - r_pose.pitch_deg for t in targets}
    az = {t: _wrap_deg(analysis.view(t).azimuth_deg - r_view.azimuth_deg) for t in targets
          if analysis.view(t).azimuth_deg is not None and r_view.azimuth_deg is not None}
    el = {t: analysis.view(t).elevation_deg - r_view.elevation_deg for t in targets
          if analysis.view(t).elevation_deg is not None and r_view.elevation_deg is not None}
    yaw_c, yaw_note = _from_cameras(az, yaw_m, analysis.set.azimuth_sign, max_disagreement_deg, "yaw")
    pitch_c, pitch_note = _from_cameras(el, pitch_m, 1, max_disagreement_deg, "pitch")
    out = {
        t: TargetAngle(
            yaw_diff_deg=yaw_c.get(t, yaw_m[t]), pitch_diff_deg=pitch_c.get(t, pitch_m[t]),
            yaw_source="cameras" if t in yaw_c else "measured", pitch_source="cameras" if t in pitch_c else "measured",
            yaw_diff_measured_deg=yaw_m[t], pitch_diff_measured_deg=pitch_m[t],
        )
        for t in targets
    }
    return out, f"{yaw_note}; {pitch_note}"


def _head_centre_px(obs: FaceObservation) -> tuple[np.ndarray, float]:
    """Pixel position (x, y) of the head origin and pixels per metre at its depth."""
    H, W = obs.image_size
    X, Y, Z = (float(v) for v in obs.pose.translation)
    f = obs.focal_px
    return np.array([f * X / Z + W / 2.0, f * Y / Z + H / 2.0]), f / Z


def align_to_reference(
    image: np.ndarray, obs: FaceObservation, ref_obs: FaceObservation
) -> tuple[np.ndarray, FaceObservation]:
    """Map a target view into the reference camera: the similarity x' = s (x - c_t) + c_r that puts the
    target's head origin c_t at the reference's c_r, with s = (f_r / Z_r) / (f_t / Z_t) (the same pixels
    per metre at the head), on the reference's picture size. In that frame the target is what a camera
    with the reference's intrinsics, at the reference's distance, sees from the target's direction: a
    picture of the reference camera, as reenactment needs (models.avatar: geometry from the same camera).

    image: RGB uint8 [H_t, W_t, 3]; obs: its FaceObservation (with mask). Returns the picture
    [H_r, W_r, 3] uint8 (zeros outside the target picture) and the observation rebuilt from the mapped
    landmarks (x, y mapped, depth z scaled by s) and mask.
    """
    c_t, k_t = _head_centre_px(obs)
    c_r, k_r = _head_centre_px(ref_obs)
    s = k_r / k_t
    H, W = ref_obs.image_size
    src = image
    if s < 1.0:  # shrink with area averaging first, then one sub-pixel affine
        small = (max(1, round(image.shape[1] * s)), max(1, round(image.shape[0] * s)))
        src = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
    # Continuous coordinates (pixel centres at j + 0.5): x' = s (x - c_t) + c_r, from the picture src.
    sx, sy = image.shape[1] / src.shape[1], image.shape[0] / src.shape[0]
    offset = c_r - s * c_t
    M = np.array([[s * sx, 0.0, s * sx * 0.5 + offset[0] - 0.5], [0.0, s * sy, s * sy * 0.5 + offset[1] - 0.5]])
    warped = cv2.warpAffine(src, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = None
    if obs.mask is not None:
        m_src = cv2.resize(obs.mask, (src.shape[1], src.shape[0]), interpolation=cv2.INTER_AREA) if src is not image \
            else obs.mask
        mask = cv2.warpAffine(m_src, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    lms = obs.landmarks_px.astype(np.float64).copy()
    lms[:, :2] = s * lms[:, :2] + offset
    lms[:, 2] *= s
    return warped, observation_from_landmarks(lms.astype(np.float32), (H, W), ref_obs.fov_deg, mask)
