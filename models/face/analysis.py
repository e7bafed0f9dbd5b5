"""Face analysis: MediaPipe face mesh (478 landmarks with iris), metric head
pose, and a person mask (selfie segmentation).

Images are RGB uint8 [H, W, 3] numpy arrays throughout. Landmarks are pixel
coordinates (x right, y down) plus MediaPipe's relative depth z scaled to
pixels (z * W; larger = farther from the camera). Metric quantities use the
camera convention of :mod:`models.geometry.camera` with a pinhole camera of
vertical field of view ``fov_deg`` (unknown for a webcam; 30 degrees is the
default guess, which fits cropped portrait video).
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

from models.face.native_log import native_logs_to_debug
from models.geometry.camera import rotation_to_euler_deg

log = logging.getLogger(__name__)

__all__ = [
    "FaceAnalysisError",
    "NoFaceError",
    "ImageReadError",
    "FaceConfig",
    "HeadPose",
    "FaceObservation",
    "FaceAnalyzer",
    "FaceModel",
    "face_model",
    "read_image",
    "observation_from_landmarks",
    "face_oval_mask",
    "head_region_mask",
]

NUM_LANDMARKS = 478
NUM_MESH_VERTICES = 468
# MediaPipe landmark ids: outer eye corners (subject's right, left) and iris centres.
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 33, 263
RIGHT_IRIS, LEFT_IRIS = 468, 473


class FaceAnalysisError(Exception):
    """Base class of the face-analysis errors a CLI turns into one clear line."""


class NoFaceError(FaceAnalysisError):
    """The picture holds no detectable face."""


class ImageReadError(FaceAnalysisError):
    """The file is missing, not an image, or corrupt."""


MIN_IMAGE_SIDE = 16
"""Smallest picture side face analysis takes, pixels."""


def read_image(path: str | Path, min_side: int | None = None, max_side: int | None = None) -> np.ndarray:
    """Read an image file as RGB uint8 [H, W, 3]; raises ImageReadError (a truncated file too).
    min_side: refuse a picture whose shorter side is under it. max_side: downscale (INTER_AREA)
    a picture whose longer side exceeds it, saying so in one log line."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"cannot read image '{path}': no such file")
    if path.is_dir():
        raise ImageReadError(f"cannot read image '{path}': it is a directory")
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None and bytes(data[:6]) in (b"GIF87a", b"GIF89a"):
        image = _first_gif_frame(path)  # OpenCV's image decoders leave GIF out; its video reader takes it
    if image is None:
        unsupported = _unsupported_format(bytes(data[:16]))
        if unsupported:
            raise ImageReadError(f"cannot read image '{path}': {unsupported} pictures are not supported "
                                 "(convert it to JPEG or PNG)")
        raise ImageReadError(f"cannot read image '{path}': not an image file, or corrupt")
    image = _over_white(image, data, path)
    H, W = image.shape[:2]
    if min_side is not None and min(H, W) < min_side:
        raise ImageReadError(f"cannot read image '{path}': {W}x{H} pixels is too small "
                             f"(expected at least {min_side}x{min_side})")
    if max_side is not None and max(H, W) > max_side:
        scale = max_side / max(H, W)
        size = (max(1, round(W * scale)), max(1, round(H * scale)))
        if min_side is not None and min(size) < min_side:
            raise ImageReadError(f"cannot read image '{path}': {W}x{H} pixels is too narrow (its longer side is "
                                 f"brought to {max_side} px, which leaves {min(size)} px on the shorter, under "
                                 f"{min_side}: crop it nearer the face)")
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        log.info("downscaled %s from %dx%d to %dx%d (longer side capped at %d px)", path.name, W, H, *size, max_side)
    return np.ascontiguousarray(image[:, :, ::-1])


def _over_white(image: np.ndarray, data: np.ndarray, path: Path) -> np.ndarray:
    """`image` (BGR, as OpenCV's colour decode gives it) laid over white where the file says it is transparent (PNG,
    WebP, TIFF with alpha), said in one log line: the colour decode drops the alpha and keeps whatever colour the
    transparent pixels hold (a green screen's, in one picture tried), which the person's edge then carries."""
    if bytes(data[:8]) != b"\x89PNG\r\n\x1a\n" and bytes(data[8:12]) != b"WEBP" and bytes(data[:2]) not in (b"II", b"MM"):
        return image
    full = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if full is None or full.ndim != 3 or full.shape[2] not in (2, 4) or full.shape[:2] != image.shape[:2]:
        return image
    alpha = full[:, :, -1].astype(np.float32) / float(np.iinfo(full.dtype).max if full.dtype.kind == "u" else 1.0)
    if alpha.min() >= 1.0:
        return image
    log.info("%s has transparent pixels (%.0f %%): laid over white", path.name, 100.0 * float((alpha < 1.0).mean()))
    a = alpha[:, :, None]
    return np.clip(image.astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5, 0, 255).astype(np.uint8)


def _first_gif_frame(path: Path) -> np.ndarray | None:
    """A GIF's first frame (BGR), through OpenCV's video reader; None if it cannot be read."""
    capture = cv2.VideoCapture(str(path))
    try:
        ok, frame = capture.read()
        if ok and capture.read()[0]:
            log.info("%s is an animated GIF: its first frame is used", path.name)
    finally:
        capture.release()
    return frame if ok else None


def _unsupported_format(head: bytes) -> str | None:
    """The name of a picture format OpenCV does not read, from a file's first bytes (ISO media brands: HEIC, AVIF)."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC"
        if brand in (b"avif", b"avis"):
            return "AVIF"
    return None


@dataclass(frozen=True)
class FaceModel:
    """MediaPipe's canonical face model, converted to the head frame.

    Head frame: x to the picture's right when the face is frontal, y down,
    z away from the camera (into the head), metres; origin = the canonical
    model's origin (about the middle of the head, between the ears).
    """

    vertices: np.ndarray  # [468, 3] float32, metres, head frame
    triangles: np.ndarray  # [898, 3] int64, counter-clockwise on screen for a frontal face
    procrustes_ids: np.ndarray  # [K] landmark ids used for the rigid fit
    procrustes_weights: np.ndarray  # [K] their weights
    face_oval: np.ndarray  # [36] landmark ids of the face outline, in loop order


@lru_cache(maxsize=1)
def face_model() -> FaceModel:
    """Load the bundled canonical face model (telepresence/assets/face_model.npz)."""
    with resources.files("models.face.assets").joinpath("face_model.npz").open("rb") as fh:
        data = np.load(fh)
        verts = data["vertices_cm"].astype(np.float32) * np.array([1, -1, -1], np.float32) / 100.0
        tris = data["triangles"].astype(np.int64)
        # The y/z flip mirrors the model, so reverse the winding to keep it counter-clockwise
        # on screen (x right, y down) for a frontal face.
        tris = tris[:, [0, 2, 1]]
        return FaceModel(
            vertices=verts,
            triangles=tris,
            procrustes_ids=data["procrustes_ids"].astype(np.int64),
            procrustes_weights=data["procrustes_weights"].astype(np.float32),
            face_oval=data["face_oval"].astype(np.int64),
        )


@dataclass(frozen=True)
class FaceConfig:
    """Settings of :class:`FaceAnalyzer`."""

    static_image: bool = True
    """True: detect afresh in every picture; False: track across video frames (faster, steadier)."""
    max_faces: int = 4
    """Faces looked for; the largest one wins."""
    min_detection_confidence: float = 0.5
    """MediaPipe face-detection threshold."""
    min_tracking_confidence: float = 0.5
    """MediaPipe tracking threshold (video mode)."""
    segmentation: bool = True
    """Compute the person mask (selfie segmentation)."""
    fov_deg: float = 30.0
    """Assumed vertical field of view of the source camera."""

    def __post_init__(self) -> None:
        if self.max_faces < 1:
            raise ValueError(f"expected max_faces >= 1, got {self.max_faces}")
        if not 1.0 <= self.fov_deg <= 150.0:
            raise ValueError(f"expected fov_deg in [1, 150], got {self.fov_deg}")


@dataclass(frozen=True)
class HeadPose:
    """Rigid head pose in the source camera: X_cam = rotation @ X_head + translation."""

    rotation: np.ndarray  # [3, 3] head frame -> camera frame
    translation: np.ndarray  # [3] head origin in the camera frame, metres
    yaw_deg: float  # same sign convention as an orbit camera (models.geometry.camera)
    pitch_deg: float
    roll_deg: float
    fit_rmse_m: float  # RMS residual of the rigid fit, metres


@dataclass(frozen=True)
class FaceObservation:
    """Everything the avatar needs from one picture."""

    image_size: tuple[int, int]  # (H, W)
    landmarks_px: np.ndarray  # [478, 3] float32: x px, y px, relative depth z in px (+ = farther)
    points_cam: np.ndarray  # [478, 3] float32, metric landmark positions in the camera frame
    pose: HeadPose
    fov_deg: float  # vertical field of view of the source camera
    mask: np.ndarray | None = field(repr=False)  # [H, W] float32 in [0, 1], person (hair, face, shoulders)

    @property
    def iod_px(self) -> float:
        """Inter-ocular distance (outer eye corners) in pixels."""
        d = self.landmarks_px[LEFT_EYE_OUTER, :2] - self.landmarks_px[RIGHT_EYE_OUTER, :2]
        return float(np.hypot(d[0], d[1]))

    @property
    def focal_px(self) -> float:
        return (self.image_size[0] / 2.0) / math.tan(math.radians(self.fov_deg) / 2.0)


def _umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted similarity fit dst ~ s * R @ src + t (Umeyama 1991). src, dst [K, 3]."""
    w = weights / weights.sum()
    mu_s, mu_d = w @ src, w @ dst
    xs, xd = src - mu_s, dst - mu_d
    cov = (xd * w[:, None]).T @ xs
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1.0
    R = U @ D @ Vt
    var_s = (w * (xs**2).sum(1)).sum()
    s = float(np.trace(np.diag(S) @ D) / var_s)
    t = mu_d - s * R @ mu_s
    return s, R, t


def metric_landmarks(
    landmarks_px: np.ndarray, image_size: tuple[int, int], fov_deg: float
) -> tuple[np.ndarray, HeadPose]:
    """Lift pixel landmarks [478, 3] to metric camera coordinates and fit the head pose.

    Each landmark's depth is Z_i = Z0 * (1 + z_i / f) (MediaPipe's z is in the
    units of x); X_i = (u_i - cx) Z_i / f, Y_i = (v_i - cy) Z_i / f. All points
    scale with Z0, so Z0 is chosen to make the face as large as the canonical
    model under the weighted Procrustes fit MediaPipe itself uses.
    """
    H, W = image_size
    f = (H / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    u, v, z = landmarks_px[:, 0], landmarks_px[:, 1], landmarks_px[:, 2]
    Z = 1.0 + z / f
    unit = np.stack([(u - W / 2.0) * Z / f, (v - H / 2.0) * Z / f, Z], axis=1)  # Z0 = 1
    model = face_model()
    ids, weights = model.procrustes_ids, model.procrustes_weights
    s, R, t = _umeyama(model.vertices[ids].astype(np.float64), unit[ids].astype(np.float64), weights)
    points = (unit / s).astype(np.float32)  # Z0 = 1 / s
    t = t / s
    fitted = (R @ model.vertices[ids].T).T + t
    rmse = float(np.sqrt(((fitted - points[ids]) ** 2).sum(1).mean()))
    yaw, pitch, roll = rotation_to_euler_deg(R).tolist()
    pose = HeadPose(R.astype(np.float32), t.astype(np.float32), yaw, pitch, roll, rmse)
    return points, pose


def observation_from_landmarks(
    landmarks_px: np.ndarray, image_size: tuple[int, int], fov_deg: float = 30.0, mask: np.ndarray | None = None
) -> FaceObservation:
    """Rebuild a FaceObservation from stored landmarks [478, 3] (no detector needed:
    for caches, and for machines without MediaPipe)."""
    landmarks_px = np.asarray(landmarks_px, np.float32)
    if landmarks_px.shape != (NUM_LANDMARKS, 3):
        raise ValueError(f"expected landmarks [{NUM_LANDMARKS}, 3], got {landmarks_px.shape}")
    points, pose = metric_landmarks(landmarks_px, image_size, fov_deg)
    return FaceObservation(tuple(image_size), landmarks_px, points, pose, fov_deg, mask)


class FaceAnalyzer:
    """MediaPipe face mesh + selfie segmentation. One instance per thread."""

    def __init__(self, config: FaceConfig = FaceConfig()):
        with native_logs_to_debug():
            import mediapipe as mp  # heavy import: only when an analyzer is made

            self.config = config
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=config.static_image,
                max_num_faces=config.max_faces,
                refine_landmarks=True,
                min_detection_confidence=config.min_detection_confidence,
                min_tracking_confidence=config.min_tracking_confidence,
            )
            self._seg = (
                mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
                if config.segmentation
                else None
            )
            # A graph opens its models on MediaPipe's own threads, logging natively as they do, some
            # time after it is made: one blank picture through each now waits for that, in here.
            blank = np.zeros((64, 64, 3), np.uint8)
            for graph in (self._mesh, self._seg):
                if graph is not None:
                    graph.process(blank)
        self._window_mesh = None
        self._lock = threading.Lock()
        self._first_runs: set[str] = set()  # graphs that have run once (their first run logs natively)

    def _process(self, name: str, graph, image: np.ndarray):
        """graph.process(image); a graph's first run (when MediaPipe logs natively) under native_logs_to_debug."""
        if name in self._first_runs:
            return graph.process(image)
        with native_logs_to_debug():
            result = graph.process(image)
        self._first_runs.add(name)
        return result

    def close(self) -> None:
        self._mesh.close()
        if self._window_mesh is not None:
            self._window_mesh.close()
        if self._seg is not None:
            self._seg.close()

    def __enter__(self) -> "FaceAnalyzer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def landmarks(self, image: np.ndarray) -> np.ndarray:
        """Landmarks [478, 3] of the largest face (pixels, see module doc); raises NoFaceError."""
        _check_image(image)
        H, W = image.shape[:2]
        with self._lock:
            result = self._process("mesh", self._mesh, image)
            candidates = [(face, 0, 0, W, H) for face in (result.multi_face_landmarks or [])]
            if not candidates and max(H, W) > 1.2 * min(H, W):
                candidates = self._search_square_windows(image)
        if not candidates:
            raise NoFaceError("no face found in the picture")
        best, best_area = None, -1.0
        for face, x0, y0, w, h in candidates:
            # Landmark coordinates are normalised to the window they were found in.
            pts = np.array([(x0 + p.x * w, y0 + p.y * h, p.z * w) for p in face.landmark], np.float32)
            area = float(np.ptp(pts[:, 0]) * np.ptp(pts[:, 1]))
            if area > best_area:
                best, best_area = pts, area
        if best.shape[0] != NUM_LANDMARKS:
            raise FaceAnalysisError(f"expected {NUM_LANDMARKS} landmarks, got {best.shape[0]}")
        return best

    def _search_square_windows(self, image: np.ndarray) -> list:
        """MediaPipe's detector squeezes the whole picture into a small square, so a
        face in a tall or wide picture can be missed: look again in square windows
        along the long side (a static-mode mesh, so video tracking is not disturbed)."""
        H, W = image.shape[:2]
        if self._window_mesh is None:
            import mediapipe as mp

            with native_logs_to_debug():
                self._window_mesh = mp.solutions.face_mesh.FaceMesh(
                    static_image_mode=True, max_num_faces=self.config.max_faces, refine_landmarks=True,
                    min_detection_confidence=self.config.min_detection_confidence,
                )
        side = min(H, W)
        long_side = max(H, W)
        starts = sorted({int(round(s)) for s in np.linspace(0, long_side - side, 3)})
        found = []
        for start in starts:
            x0, y0 = (start, 0) if W > H else (0, start)
            window = np.ascontiguousarray(image[y0 : y0 + side, x0 : x0 + side])
            result = self._process("window", self._window_mesh, window)
            found += [(face, x0, y0, side, side) for face in (result.multi_face_landmarks or [])]
        return found

    def person_mask(self, image: np.ndarray) -> np.ndarray:
        """Person mask [H, W] float32 in [0, 1] (hair, face, neck, shoulders)."""
        _check_image(image)
        if self._seg is None:
            raise FaceAnalysisError("segmentation is off in this FaceConfig")
        with self._lock:
            result = self._process("segmentation", self._seg, image)
        return np.clip(result.segmentation_mask.astype(np.float32), 0.0, 1.0)

    def analyze(self, image: np.ndarray, with_mask: bool | None = None) -> FaceObservation:
        """Landmarks, metric head pose and person mask of the largest face in ``image``."""
        lms = self.landmarks(image)
        points, pose = metric_landmarks(lms, image.shape[:2], self.config.fov_deg)
        want_mask = self.config.segmentation if with_mask is None else with_mask
        mask = self.person_mask(image) if want_mask else None
        return FaceObservation(
            image_size=tuple(image.shape[:2]),
            landmarks_px=lms,
            points_cam=points,
            pose=pose,
            fov_deg=self.config.fov_deg,
            mask=mask,
        )


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got shape {shape} dtype {dtype}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"expected an image of at least 16x16 pixels, got {image.shape[1]}x{image.shape[0]}")


def face_oval_mask(landmarks_px: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Filled face-oval polygon [H, W] float32 in {0, 1}."""
    H, W = image_size
    oval = landmarks_px[face_model().face_oval, :2]
    mask = np.zeros((H, W), np.uint8)
    cv2.fillPoly(mask, [np.round(oval * 4).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=2)
    return mask.astype(np.float32)


def head_region_mask(
    landmarks_px: np.ndarray,
    image_size: tuple[int, int],
    person_mask: np.ndarray | None = None,
    grow_up: float = 0.35,
    grow_side: float = 0.08,
) -> np.ndarray:
    """Head region [H, W] float32 in {0, 1}: the face oval grown upward (by
    ``grow_up`` of the face height, to take in the hair) and sideways (by
    ``grow_side`` of the face width), intersected with the person mask (>0.5).
    This is the region the evaluation scores (see DESIGN notes: the torso of a
    head-turn clip does not move like a camera orbit)."""
    oval = landmarks_px[face_model().face_oval, :2].astype(np.float64)
    centre = oval.mean(0)
    height = np.ptp(oval[:, 1])
    width = np.ptp(oval[:, 0])
    grown = oval.copy()
    above = oval[:, 1] < centre[1]
    # Push the upper half of the outline up and every point outward.
    grown[above, 1] -= grow_up * height * (centre[1] - oval[above, 1]) / (centre[1] - oval[:, 1].min() + 1e-6)
    grown[:, 0] = centre[0] + (grown[:, 0] - centre[0]) * (1.0 + 2.0 * grow_side * width / max(width, 1e-6))
    H, W = image_size
    mask = np.zeros((H, W), np.uint8)
    cv2.fillPoly(mask, [np.round(grown * 4).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=2)
    out = mask.astype(np.float32)
    if person_mask is not None:
        out *= (person_mask > 0.5).astype(np.float32)
    return out
