"""Calibrated multi-view captures (NeRSemble / Ava-256 style) -> real training pairs.

Folder format (see docs/training.md)::

    CAPTURE/
      cameras.json                 intrinsics and extrinsics per camera id
      images/<frame>/<cam>.png     (or .jpg / .jpeg) RGB, the camera's full picture
      masks/<frame>/<cam>.png      optional person masks, 8-bit (255 = person)

cameras.json::

    {
      "convention": "opencv",              # optional; the only one accepted
      "reference_camera": "cam00",         # optional default reference
      "cameras": {
        "cam00": {"fx": 1200.0, "fy": 1200.0, "cx": 512.0, "cy": 512.0,
                  "width": 1024, "height": 1024,
                  "world_to_camera": [[...4...], [...], [...], [0, 0, 0, 1]]},
        "cam01": {..., "R": [[...3...], [...], [...]], "t": [tx, ty, tz]},
        "cam02": {..., "camera_to_world": [[...4x4...]]}
      }
    }

OpenCV convention (the project's, models.geometry.camera): x right, y down, z
forward; world->camera X_c = R X_w + t; pixel (i, j) has its centre at
(x, y) = (j + 0.5, i + 0.5) in the intrinsics' pixel units. Translations may
be in any unit: by default the rig is rescaled to the avatar's metric scale
(``align_scale``, below).

Samples (:func:`build_capture_samples`): per frame, the reference camera's
picture -> face analysis -> one-image avatar (models.avatar) -> a render at
every other camera whose viewing direction is within ``max_angle_deg`` of the
reference. The avatar lives in the reference camera's frame, so a target's
viewmat is V_target @ inverse(V_ref). Each target picture is cropped to a
square around the projected head (same framing as the avatar's reference
crop) and resampled to S x S; the target's S x S intrinsics K_S follow the
same crop, so render and picture see the same rays.

``align_scale``: one picture fixes the avatar's scale only through the
canonical face size, so the rig's translations are rescaled so that the point
where the cameras' optical axes meet (least squares; the head, on a capture
rig) lies at the avatar's head-centre depth. Turn it off only for rigs in
metres whose cameras do not converge.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from models.pictures import to_uint8

logger = logging.getLogger(__name__)

CAMERAS_FILE = "cameras.json"
IMAGE_DIR = "images"
MASK_DIR = "masks"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class CaptureFormatError(ValueError):
    """The capture folder does not follow the documented format."""


@dataclass(frozen=True)
class CaptureCamera:
    """One calibrated camera (OpenCV convention)."""

    name: str
    """Camera id (file stem of its pictures)."""
    K: np.ndarray
    """Intrinsics [3, 3] (fx, fy, cx, cy) in pixels of the full picture."""
    viewmat: np.ndarray
    """World->camera [4, 4]."""
    width: int
    """Picture width, pixels."""
    height: int
    """Picture height, pixels."""

    @property
    def centre(self) -> np.ndarray:
        """Camera centre in world coordinates [3]."""
        R, t = self.viewmat[:3, :3], self.viewmat[:3, 3]
        return -R.T @ t

    @property
    def axis(self) -> np.ndarray:
        """Optical axis (unit, world coordinates) [3]."""
        return self.viewmat[2, :3].copy()

    def to_json(self) -> dict:
        return {
            "fx": float(self.K[0, 0]), "fy": float(self.K[1, 1]), "cx": float(self.K[0, 2]), "cy": float(self.K[1, 2]),
            "width": int(self.width), "height": int(self.height), "world_to_camera": self.viewmat.tolist(),
        }


def _matrix(value, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CaptureFormatError(f"{what}: expected a numeric array of shape {shape}, got {value!r}") from exc
    if m.shape != shape or not np.isfinite(m).all():
        raise CaptureFormatError(f"{what}: expected a finite array of shape {shape}, got shape {m.shape}")
    return m


def _parse_camera(name: str, entry: dict) -> CaptureCamera:
    where = f"{CAMERAS_FILE} camera {name!r}"
    if not isinstance(entry, dict):
        raise CaptureFormatError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [k for k in ("fx", "fy", "cx", "cy", "width", "height") if k not in entry]
    if missing:
        raise CaptureFormatError(f"{where}: expected fields fx fy cx cy width height, missing {missing}")
    fx, fy, cx, cy = (float(entry[k]) for k in ("fx", "fy", "cx", "cy"))
    width, height = entry["width"], entry["height"]
    if fx <= 0 or fy <= 0:
        raise CaptureFormatError(f"{where}: expected fx, fy > 0, got {fx}, {fy}")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise CaptureFormatError(f"{where}: expected positive integer width and height, got {width!r}, {height!r}")
    keys = [k for k in ("world_to_camera", "camera_to_world", "R") if k in entry]
    if len(keys) != 1:
        raise CaptureFormatError(f"{where}: expected exactly one of world_to_camera (4x4), camera_to_world (4x4) or R (3x3) + t (3), got {keys or 'none'}")
    if keys[0] == "R":
        if "t" not in entry:
            raise CaptureFormatError(f"{where}: expected t (3) with R, got none")
        viewmat = np.eye(4)
        viewmat[:3, :3] = _matrix(entry["R"], (3, 3), f"{where} R")
        viewmat[:3, 3] = _matrix(entry["t"], (3,), f"{where} t")
    else:
        viewmat = _matrix(entry[keys[0]], (4, 4), f"{where} {keys[0]}")
        if not np.allclose(viewmat[3], [0, 0, 0, 1], atol=1e-6):
            raise CaptureFormatError(f"{where} {keys[0]}: expected last row [0, 0, 0, 1], got {viewmat[3].tolist()}")
        if keys[0] == "camera_to_world":
            viewmat = np.linalg.inv(viewmat)
    R = viewmat[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise CaptureFormatError(f"{where}: expected a rotation (orthonormal, det +1), got det {np.linalg.det(R):.4f} and |R R^T - I| = {np.abs(R @ R.T - np.eye(3)).max():.2e}")
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    return CaptureCamera(name=name, K=K, viewmat=viewmat, width=width, height=height)


@dataclass
class Capture:
    """A loaded capture: cameras and the picture files per frame (pictures are read on demand)."""

    root: Path
    cameras: dict[str, CaptureCamera]
    frames: list[str]
    images: dict[tuple[str, str], Path]  # (frame, camera) -> picture
    masks: dict[tuple[str, str], Path]  # (frame, camera) -> mask
    reference_camera: str | None = None

    def cameras_in(self, frame: str) -> list[str]:
        return sorted(c for (f, c) in self.images if f == frame)

    def image(self, frame: str, camera: str) -> np.ndarray:
        """RGB uint8 [H, W, 3], checked against cameras.json."""
        from models.face.analysis import read_image

        path = self.images.get((frame, camera))
        if path is None:
            raise CaptureFormatError(f"expected a picture {IMAGE_DIR}/{frame}/{camera}.*, got none in {self.root}")
        image = read_image(path)
        cam = self.cameras[camera]
        if image.shape[:2] != (cam.height, cam.width):
            raise CaptureFormatError(f"{path}: expected {cam.width}x{cam.height} ({CAMERAS_FILE}), got {image.shape[1]}x{image.shape[0]}")
        return image

    def mask(self, frame: str, camera: str) -> np.ndarray | None:
        """Person mask float32 [H, W] in [0, 1], or None when the capture has none for this picture."""
        import cv2

        path = self.masks.get((frame, camera))
        if path is None:
            return None
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise CaptureFormatError(f"{path}: expected an 8-bit mask picture, got an unreadable file")
        cam = self.cameras[camera]
        if mask.shape != (cam.height, cam.width):
            raise CaptureFormatError(f"{path}: expected {cam.width}x{cam.height} ({CAMERAS_FILE}), got {mask.shape[1]}x{mask.shape[0]}")
        return mask.astype(np.float32) / 255.0


def _pictures(folder: Path, cameras: dict, kind: str) -> tuple[list[str], dict[tuple[str, str], Path]]:
    found: dict[tuple[str, str], Path] = {}
    frames = sorted(p.name for p in folder.iterdir() if p.is_dir())
    for frame in frames:
        for file in sorted((folder / frame).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if file.stem not in cameras:
                raise CaptureFormatError(f"{kind}/{frame}/{file.name}: expected a camera id from {CAMERAS_FILE} ({sorted(cameras)[:5]}...), got {file.stem!r}")
            if (frame, file.stem) in found:
                raise CaptureFormatError(f"{kind}/{frame}: expected one picture per camera, got two for {file.stem!r}")
            found[(frame, file.stem)] = file
    return frames, found


def load_capture(root: str | Path) -> Capture:
    """Read and validate a capture folder's layout and cameras.json (pictures are checked when read)."""
    root = Path(root)
    if not root.is_dir():
        raise CaptureFormatError(f"expected a capture folder, got no folder at {root}")
    if not (root / CAMERAS_FILE).is_file():
        raise CaptureFormatError(f"expected {root}/{CAMERAS_FILE}, got none")
    try:
        meta = json.loads((root / CAMERAS_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CaptureFormatError(f"{root}/{CAMERAS_FILE}: expected JSON, got a parse error ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("cameras"), dict) or not meta["cameras"]:
        raise CaptureFormatError(f"{root}/{CAMERAS_FILE}: expected an object with a non-empty \"cameras\" object, got {str(meta)[:80]}")
    convention = meta.get("convention", "opencv")
    if convention != "opencv":
        raise CaptureFormatError(f"{root}/{CAMERAS_FILE}: expected convention \"opencv\" (x right, y down, z forward, world->camera), got {convention!r}")
    cameras = {str(name): _parse_camera(str(name), entry) for name, entry in meta["cameras"].items()}
    reference = meta.get("reference_camera")
    if reference is not None and reference not in cameras:
        raise CaptureFormatError(f"{root}/{CAMERAS_FILE}: expected reference_camera among the cameras, got {reference!r}")
    if not (root / IMAGE_DIR).is_dir():
        raise CaptureFormatError(f"expected {root}/{IMAGE_DIR}/<frame>/<camera>.png, got no {IMAGE_DIR}/ folder")
    frames, images = _pictures(root / IMAGE_DIR, cameras, IMAGE_DIR)
    frames = [f for f in frames if any(k[0] == f for k in images)]
    if not frames:
        raise CaptureFormatError(f"expected pictures in {root}/{IMAGE_DIR}/<frame>/<camera>.png, got none")
    masks: dict[tuple[str, str], Path] = {}
    if (root / MASK_DIR).is_dir():
        _, masks = _pictures(root / MASK_DIR, cameras, MASK_DIR)
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise CaptureFormatError(f"{MASK_DIR}/{orphans[0][0]}/{orphans[0][1]}: expected a mask for an existing picture, got no {IMAGE_DIR}/{orphans[0][0]}/{orphans[0][1]}.*")
    return Capture(root=root, cameras=cameras, frames=frames, images=images, masks=masks, reference_camera=reference)


def write_capture(
    root: str | Path,
    cameras: Iterable[CaptureCamera],
    images: dict[str, dict[str, np.ndarray]],
    masks: dict[str, dict[str, np.ndarray]] | None = None,
    reference_camera: str | None = None,
) -> Path:
    """Write a capture folder: images[frame][camera] RGB uint8 [H, W, 3]; masks[frame][camera] [H, W] in [0, 1] or uint8."""
    import cv2

    root = Path(root)
    cams = {c.name: c for c in cameras}
    meta = {"convention": "opencv", "cameras": {n: c.to_json() for n, c in cams.items()}}
    if reference_camera is not None:
        meta["reference_camera"] = reference_camera
    root.mkdir(parents=True, exist_ok=True)
    (root / CAMERAS_FILE).write_text(json.dumps(meta, indent=2))
    for kind, pictures in ((IMAGE_DIR, images), (MASK_DIR, masks or {})):
        for frame, per_cam in pictures.items():
            (root / kind / frame).mkdir(parents=True, exist_ok=True)
            for cam, pic in per_cam.items():
                if cam not in cams:
                    raise CaptureFormatError(f"expected a camera from {sorted(cams)}, got {cam!r}")
                if kind == IMAGE_DIR:
                    pic = cv2.cvtColor(np.ascontiguousarray(pic), cv2.COLOR_RGB2BGR)
                else:
                    pic = to_uint8(pic)
                cv2.imwrite(str(root / kind / frame / f"{cam}.png"), pic)
    return root


# ---- geometry ----------------------------------------------------------------------------------------------------
def rig_focus(cameras: Iterable[CaptureCamera], min_spread: float = 1e-3) -> np.ndarray | None:
    """World point nearest to every optical axis (least squares), [3]; None when the axes are (nearly) parallel.

    p = argmin sum_i || (I - d_i d_i^T)(p - C_i) ||^2  =>  (sum_i P_i) p = sum_i P_i C_i
    """
    A = np.zeros((3, 3))
    b = np.zeros(3)
    n = 0
    for cam in cameras:
        d = cam.axis / np.linalg.norm(cam.axis)
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ cam.centre
        n += 1
    if n < 2 or np.linalg.eigvalsh(A / n)[0] < min_spread:
        return None
    return np.linalg.solve(A, b)


def warp_affine(image: np.ndarray, ax: float, bx: float, ay: float, by: float, width: int, height: int, border=0) -> np.ndarray:
    """Resample image so that output coordinates are x' = ax x + bx, y' = ay y + by
    (continuous pixel coordinates, centres at +0.5), size width x height.
    Area-averages first when shrinking by more than 2 (no aliasing)."""
    import cv2

    h, w = image.shape[:2]
    shrink = min(ax, ay)
    if shrink < 0.5:
        k = int(1.0 / shrink)
        w2, h2 = max(1, round(w / k)), max(1, round(h / k))
        image = cv2.resize(image, (w2, h2), interpolation=cv2.INTER_AREA)
        ax, ay = ax * w / w2, ay * h / h2
    # index j = x - 0.5: j' = ax j + (bx + 0.5 ax - 0.5)
    M = np.array([[ax, 0.0, bx + 0.5 * ax - 0.5], [0.0, ay, by + 0.5 * ay - 0.5]], dtype=np.float64)
    return cv2.warpAffine(image, M, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=border)


@dataclass(frozen=True)
class CaptureSampleConfig:
    """How captures become training pairs."""

    size: int = 256
    """Side S of the square samples, pixels."""
    reference_camera: str | None = None
    """Camera whose picture builds the avatar; None: cameras.json's reference_camera, else the first id."""
    max_angle_deg: float = 75.0
    """Targets whose optical axis turns more than this from the reference's are skipped."""
    align_scale: bool = True
    """Rescale rig translations to the avatar's metric scale (see module docstring)."""
    background_weight: float = 1.0
    """Loss weight outside the person mask (inside it: 1; outside the target picture: 0)."""
    frames: tuple[str, ...] | None = None
    """Frames to use; None: all."""
    bg_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Background colour of renders and targets (the avatar removes the background)."""

    def __post_init__(self):
        if self.size < 16:
            raise ValueError(f"expected size >= 16, got {self.size}")
        if not 0 < self.max_angle_deg <= 180:
            raise ValueError(f"expected max_angle_deg in (0, 180], got {self.max_angle_deg}")
        if not 0 <= self.background_weight <= 1:
            raise ValueError(f"expected background_weight in [0, 1], got {self.background_weight}")


def _normalised_reference(image: np.ndarray, mask: np.ndarray | None, cam: CaptureCamera):
    """Resample the reference picture to a centred principal point and square pixels
    (f = fy), which is what the face analysis and the avatar assume. Same size."""
    H, W = cam.height, cam.width
    f = float(cam.K[1, 1])
    ax = f / float(cam.K[0, 0])
    bx = W / 2.0 - ax * float(cam.K[0, 2])
    by = H / 2.0 - float(cam.K[1, 2])
    if abs(ax - 1) < 1e-9 and abs(bx) < 1e-6 and abs(by) < 1e-6:
        return image, mask, f
    image = warp_affine(image, ax, bx, 1.0, by, W, H)
    if mask is not None:
        mask = warp_affine(mask, ax, bx, 1.0, by, W, H)
    return image, mask, f


def build_capture_samples(capture: Capture, analyzer, config: CaptureSampleConfig = CaptureSampleConfig(), device="cpu") -> list[dict]:
    """Pairs (the sample format, V = 1) for every (frame, target camera); see the module docstring.

    analyzer: a models.face.analysis.FaceAnalyzer (MediaPipe; not on the GPU machine:
    build the pairs where MediaPipe runs and carry them as a TensorPairDataset file).
    Frames whose reference picture shows no face are skipped with a log line.
    """
    from models.avatar import AvatarConfig, build_avatar, render_cameras
    from models.face.analysis import FaceAnalysisError, FaceObservation, metric_landmarks

    ref_name = config.reference_camera or capture.reference_camera or sorted(capture.cameras)[0]
    if ref_name not in capture.cameras:
        raise CaptureFormatError(f"expected a reference camera from {sorted(capture.cameras)}, got {ref_name!r}")
    ref_cam = capture.cameras[ref_name]
    frames = list(config.frames) if config.frames is not None else capture.frames
    unknown = sorted(set(frames) - set(capture.frames))
    if unknown:
        raise CaptureFormatError(f"expected frames from {capture.frames[:5]}..., got unknown {unknown[:3]}")
    focus = rig_focus(capture.cameras.values()) if config.align_scale else None
    if config.align_scale and focus is None:
        logger.warning("capture %s: camera axes do not converge; translations are used as metres", capture.root)
    S = config.size
    avatar_config = AvatarConfig(background="remove", bg_color=config.bg_color)
    bg = np.asarray(config.bg_color, np.float32)
    V_ref_inv = np.linalg.inv(ref_cam.viewmat)
    samples = []
    for frame in frames:
        cams = capture.cameras_in(frame)
        if ref_name not in cams:
            logger.info("capture %s frame %s: no reference picture (%s), skipped", capture.root.name, frame, ref_name)
            continue
        image, mask, f = _normalised_reference(capture.image(frame, ref_name), capture.mask(frame, ref_name), ref_cam)
        H, W = image.shape[:2]
        fov_deg = math.degrees(2 * math.atan(H / 2.0 / f))
        try:
            lms = analyzer.landmarks(image)
        except FaceAnalysisError as exc:
            logger.info("capture %s frame %s: %s, skipped", capture.root.name, frame, exc)
            continue
        points, pose = metric_landmarks(lms, (H, W), fov_deg)
        if mask is None:
            mask = analyzer.person_mask(image)
        obs = FaceObservation(image_size=(H, W), landmarks_px=lms, points_cam=points, pose=pose, fov_deg=fov_deg, mask=mask)
        avatar = build_avatar(image, obs, avatar_config, device=device, render_size=S)
        ref_view = avatar.source_view(S).cpu()
        pivot = avatar.pivot.double().cpu().numpy()  # [3] in the reference camera frame
        scale = 1.0
        if focus is not None:
            z_true = float((ref_cam.viewmat @ np.append(focus, 1.0))[2])
            if z_true <= 0:
                raise CaptureFormatError(f"capture {capture.root}: expected the cameras' focus in front of the reference camera, got depth {z_true:.3g}")
            scale = float(pivot[2]) / z_true
        # Reference crop in normalised-reference pixels: side and centre offset from the projected pivot.
        cK = avatar.crop_K.double().cpu().numpy()
        side_ref = f / cK[0, 0]
        crop_cx = W / 2.0 - (cK[0, 2] - 0.5) * side_ref
        crop_cy = H / 2.0 - (cK[1, 2] - 0.5) * side_ref
        piv_px = (f * pivot[0] / pivot[2] + W / 2.0, f * pivot[1] / pivot[2] + H / 2.0)
        offset = np.array([crop_cx - piv_px[0], crop_cy - piv_px[1]]) / side_ref  # in crop sides
        viewmats, Ks, targets, weights, names = [], [], [], [], []
        for name in cams:
            cam = capture.cameras[name]
            if name == ref_name:
                continue
            angle = math.degrees(math.acos(float(np.clip(np.dot(cam.axis, ref_cam.axis), -1, 1))))
            if angle > config.max_angle_deg:
                continue
            rel = cam.viewmat @ V_ref_inv  # reference camera frame -> target camera
            rel[:3, 3] *= scale
            pc = rel[:3, :3] @ pivot + rel[:3, 3]  # pivot in the target camera
            if pc[2] <= 0:
                continue
            fx, fy, cx, cy = cam.K[0, 0], cam.K[1, 1], cam.K[0, 2], cam.K[1, 2]
            side = side_ref * (fy / f) * (pivot[2] / pc[2])  # same head size as the reference crop
            u = fx * pc[0] / pc[2] + cx + offset[0] * side
            v = fy * pc[1] / pc[2] + cy + offset[1] * side
            x0, y0 = u - side / 2.0, v - side / 2.0
            a = S / side
            K_S = np.array([[fx * a, 0, (cx - x0) * a], [0, fy * a, (cy - y0) * a], [0, 0, 1]])
            picture = capture.image(frame, name).astype(np.float32) / 255.0
            person = capture.mask(frame, name)
            if person is None:
                person = analyzer.person_mask(capture.image(frame, name))
            crop = warp_affine(picture, a, -a * x0, a, -a * y0, S, S)
            alpha = warp_affine(person.astype(np.float32), a, -a * x0, a, -a * y0, S, S)[..., None]
            inside = warp_affine(np.ones(person.shape, np.float32), a, -a * x0, a, -a * y0, S, S)[..., None]
            target = crop * alpha + bg * (1 - alpha)
            weight = inside * (alpha + config.background_weight * (1 - alpha))
            viewmats.append(rel)
            Ks.append(K_S)
            targets.append(torch.from_numpy(np.ascontiguousarray(target)).permute(2, 0, 1).float().clamp(0, 1))
            weights.append(torch.from_numpy(np.ascontiguousarray(weight)).permute(2, 0, 1).float().clamp(0, 1))
            names.append(name)
        if not names:
            continue
        out = render_cameras(avatar, torch.tensor(np.stack(viewmats), dtype=torch.float32), torch.tensor(np.stack(Ks), dtype=torch.float32), S)
        for i, name in enumerate(names):
            samples.append(
                {
                    "ref": ref_view.clone(),
                    "views": out.rgb[i : i + 1].cpu(),
                    "seen": out.seen[i : i + 1].cpu(),
                    "target": targets[i][None],
                    "weight": weights[i][None],
                    "meta": {"clip": capture.root.name, "frame": frame, "reference": ref_name, "camera": name, "stage": "real"},
                }
            )
    logger.info("capture %s: %d pairs from %d frames", capture.root.name, len(samples), len(frames))
    return samples


__all__ = [
    "Capture", "CaptureCamera", "CaptureFormatError", "CaptureSampleConfig", "build_capture_samples",
    "load_capture", "rig_focus", "warp_affine", "write_capture",
]
