"""Face identity: dlib's 128-d face descriptor, its alignment, and the distance between two faces.

One concept, two engines:

* dlib's own C++ code (``dlib-bin``): the reference. Face box (given, from
  MediaPipe landmarks, or dlib's HOG detector) -> 5-point shape predictor ->
  150 px chip (padding 0.25) -> ResNet. The evaluation and the trainer's
  validation report it.
* the torch port (:mod:`models.face.identity_net`): the same ResNet read from
  the same .dat file, and dlib's chip extraction re-done in torch
  (:func:`align_faces`, differentiable with respect to the picture), batched on
  any device: for losses and GPU metrics. Its descriptors equal dlib's to about
  1e-5 cosine distance on the same 5 points.

    d_id = || e(a) - e(b) ||_2      (dlib: same person below SAME_PERSON_THRESHOLD = 0.6)

The 5 points are dlib's 5-point shape model's, in its order: the eye corners on
the picture's right (outer, inner), on its left (outer, inner), and the base of
the nose. From MediaPipe's mesh they are vertices 263, 382, 33, 155, 2
(:func:`five_points_from_mediapipe`; 2-3 % of the inter-ocular distance from
dlib's on the test pictures).
"""
from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.face.analysis import NUM_MESH_VERTICES, NoFaceError
from models.face.identity_net import CHIP_SIZE, FaceRecognitionNet
from models.pictures import to_rgb_uint8

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_FILE",
    "LANDMARKS_FILE",
    "SAME_PERSON_THRESHOLD",
    "CHIP_PADDING",
    "MEDIAPIPE_FIVE_POINTS",
    "MissingEvalExtraError",
    "model_dir",
    "identity_distance",
    "five_points_from_mediapipe",
    "align_faces",
    "load_face_net",
    "face_descriptors",
    "IdentityEmbedder",
]

EMBEDDING_FILE = "dlib_face_recognition_resnet_model_v1.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
SAME_PERSON_THRESHOLD = 0.6
"""dlib's decision threshold for its descriptor: closer than this is probably one person."""
CHIP_PADDING = 0.25
"""Margin around the 5-point template, in template widths (dlib's compute_face_descriptor default)."""
MEDIAPIPE_FIVE_POINTS = (263, 382, 33, 155, 2)
"""MediaPipe mesh vertices nearest dlib's 5 points (each the best single vertex on 23 test faces)."""

# dlib's get_face_chip_details: the 5 points' places in a unit chip (dlib/image_transforms/interpolation.h)
_TEMPLATE_5 = ((0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
               (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
               (0.4901123135679, 0.6277975316475))
_AVATAR_CROP_SCALE, _AVATAR_CROP_DROP = 2.6, 0.15  # models.avatar.AvatarConfig defaults
_EXTRA_HINT = "pip install 'portrait-telepresence[eval]' (dlib-bin, face-recognition-models, setuptools)"


class MissingEvalExtraError(ImportError):
    """dlib or face_recognition_models is not installed."""


def model_dir(models_dir: str | Path | None = None) -> Path:
    """Folder of the dlib .dat files: ``models_dir``, else face_recognition_models'
    (found without importing the package: its __init__ needs pkg_resources).
    Raises MissingEvalExtraError when the files are not there."""
    if models_dir is None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise MissingEvalExtraError(f"face_recognition_models is not installed; {_EXTRA_HINT}")
        models_dir = Path(list(spec.submodule_search_locations)[0]) / "models"
    folder = Path(models_dir)
    missing = [f for f in (EMBEDDING_FILE, LANDMARKS_FILE) if not (folder / f).is_file()]
    if missing:
        raise MissingEvalExtraError(f"expected {' and '.join(missing)} in '{folder}', got no such file; {_EXTRA_HINT}")
    return folder


def identity_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance of two descriptors [128] (< SAME_PERSON_THRESHOLD: probably one person)."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def five_points_from_mediapipe(landmarks_px: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """MediaPipe landmarks [..., 478 (or 468), 2+] px -> dlib's 5 points [..., 5, 2] px."""
    return landmarks_px[..., list(MEDIAPIPE_FIVE_POINTS), :2]


# ----------------------------------------------------------------------------- alignment (torch)


def _pyramid_down(x: Tensor) -> Tensor:
    """dlib's pyramid_down<2>: 5x5 binomial filter [1 4 6 4 1]^2 / 256, every other pixel,
    no padding: [B, C, H, W] -> [B, C, (H-3)//2, (W-3)//2]. (dlib floors to uint8 here; this does not.)"""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(x, k, stride=2, groups=x.shape[1])


def _down(rect: list[float]) -> list[float]:
    """pyramid_down<2>::rect_down on (l, t, r, b): p -> p / 2 - (1.25, 0.75)."""
    l, t, r, b = rect
    return [l / 2 - 1.25, t / 2 - 0.75, r / 2 - 1.25, b / 2 - 0.75]


def _area(rect: list[float]) -> float:
    l, t, r, b = rect
    return 0.0 if (t > b or l > r) else (r - l + 1) * (b - t + 1)


def _chip_geometry(points: Tensor, size: int, padding: float, image_hw: tuple[int, int]):
    """dlib's get_face_chip_details + the geometry of extract_image_chips, for B faces.

    points [B, 5, 2] float64 px. Returns (crops: B integer boxes (l, t, r, b) of
    the picture, depths: B pyramid depths, affines [B, 2, 3] float64 mapping chip
    pixels (x, y) to pixels of the crop's pyramid level; a torch function of the points).
    """
    H, W = image_hw
    tmpl = (padding + torch.tensor(_TEMPLATE_5, dtype=points.dtype, device=points.device)) / (2 * padding + 1) * size
    # least-squares similarity chip -> image (what Umeyama's method gives in 2-D): y = [[a, -b], [b, a]] x + t
    xs, ys = tmpl - tmpl.mean(0), points - points.mean(1, keepdim=True)  # [5, 2], [B, 5, 2]
    norm = (xs**2).sum()
    a = (xs * ys).sum((1, 2)) / norm
    b = (xs[:, 0] * ys[..., 1] - xs[:, 1] * ys[..., 0]).sum(1) / norm
    mx, my = tmpl.mean(0)
    tx = points[..., 0].mean(1) - (a * mx - b * my)
    ty = points[..., 1].mean(1) - (b * mx + a * my)
    scale = torch.sqrt(a * a + b * b)
    cos, sin = a / scale, b / scale
    # chip_details.rect = centered_drect(tform(size/2, size/2), size*scale, size*scale) as (l, t, r, b)
    cx, cy = (a - b) * size / 2 + tx, (b + a) * size / 2 + ty
    half = (size * scale - 1.0) / 2.0
    rect = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)  # [B, 4]

    # integer bookkeeping (no gradient): pyramid depth and the picture's crop, as dlib does it
    crops, depths = [], []
    for r0, c, s in zip(rect.detach().tolist(), cos.tolist(), sin.tolist()):
        depth, grow, r = 0, 2.0, _down(r0)
        while _area(r) > size * size:
            r, depth, grow = _down(r), depth + 1, grow * 2 + 2
        mx0, my0 = (r0[0] + r0[2]) / 2, (r0[1] + r0[3]) / 2
        corners = [(x - mx0, y - my0) for x, y in ((r0[0], r0[1]), (r0[2], r0[1]), (r0[0], r0[3]), (r0[2], r0[3]))]
        xr = [mx0 + c * dx - s * dy for dx, dy in corners]
        yr = [my0 + s * dx + c * dy for dx, dy in corners]
        box = [max(min(xr) - grow, 0.0), max(min(yr) - grow, 0.0), min(max(xr) + grow, W - 1.0), min(max(yr) + grow, H - 1.0)]
        crop = [int(math.floor(v + 0.5)) for v in box]
        if crop[0] > crop[2] or crop[1] > crop[3]:
            raise ValueError(f"expected a face inside the {W}x{H} picture, got a chip at {r0}")
        crops.append(crop)
        depths.append(depth)

    # the chip rectangle in its level's pixels (d times p -> p / 2 - c), rotated about its centre;
    # the chip's corners (0, 0), (size-1, 0), (0, size-1) map onto its corners
    off = torch.tensor(crops, dtype=rect.dtype, device=rect.device)[:, :2].repeat(1, 2)
    d = torch.tensor(depths, dtype=rect.dtype, device=rect.device)[:, None]
    c = torch.tensor([1.25, 0.75, 1.25, 0.75], dtype=rect.dtype, device=rect.device)
    rect = (rect - off) / 2**d - c * 2 * (1 - 0.5**d)
    l, t, r, b = rect.unbind(1)
    mx, my = (l + r) / 2, (t + b) / 2

    def rot(x, y):  # rotate_point(centre, p, angle)
        return torch.stack([mx + cos * (x - mx) - sin * (y - my), my + sin * (x - mx) + cos * (y - my)], dim=1)

    tl, tr, bl = rot(l, t), rot(r, t), rot(l, b)
    affines = torch.stack([(tr - tl) / (size - 1), (bl - tl) / (size - 1), tl], dim=2)  # [B, 2, 3]
    return crops, depths, affines


def align_faces(
    images: Tensor,  # [B, 3, H, W] RGB in [0, 1]
    points: Tensor,  # [B, 5, 2] dlib's 5 points, px (x right, y down, pixel centres at integers)
    size: int = CHIP_SIZE,
    padding: float = CHIP_PADDING,
) -> Tensor:
    """dlib's face chips (get_face_chip_details + extract_image_chip) in torch: [B, 3, size, size] in [0, 1].

    The chip is the similarity transform that puts the 5 points nearest dlib's
    template (with ``padding``); as in dlib, a chip much smaller than its face
    is sampled from a level of dlib's image pyramid (pyramid_down<2>, built on
    a crop around the face), bilinearly, black outside the picture. Unlike
    dlib nothing is rounded to 8 bits, so the chip is differentiable with
    respect to ``images`` (and ``points``); it differs from dlib's uint8 chip
    by about half a grey level.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    if points.shape != (images.shape[0], 5, 2):
        raise ValueError(f"expected points ({images.shape[0]}, 5, 2), got {tuple(points.shape)}")
    H, W = images.shape[2:]
    ij = torch.arange(size, dtype=torch.float64, device=images.device)
    grid_rc = torch.stack(torch.meshgrid(ij, ij, indexing="xy"), dim=-1)  # [size, size, 2] (x = column, y = row)
    crops, depths, affines = _chip_geometry(points.to(torch.float64), size, padding, (H, W))
    groups: dict[tuple, list[int]] = {}  # faces sharing a crop and a depth are sampled in one batch
    for i, (crop, depth) in enumerate(zip(crops, depths)):
        groups.setdefault((*crop, depth), []).append(i)
    chips = [None] * len(crops)
    for (l, t, r, b, depth), idx in groups.items():
        level = images[idx, :, t:b + 1, l:r + 1]
        for _ in range(depth):
            if min(level.shape[2:]) <= 8:
                raise ValueError(f"expected a face of at least a few pixels, got a pyramid level of {tuple(level.shape[2:])}")
            level = _pyramid_down(level)
        h, w = level.shape[2:]
        A = affines[idx]  # [G, 2, 3]
        xy = grid_rc[None] @ A[:, None, :, :2].transpose(-1, -2) + A[:, None, None, :, 2]  # [G, size, size, 2] level px
        inside = (xy[..., 0] >= 0) & (xy[..., 1] >= 0) & (xy[..., 0] < w - 1) & (xy[..., 1] < h - 1)
        norm = torch.stack([2 * xy[..., 0] / max(w - 1, 1) - 1, 2 * xy[..., 1] / max(h - 1, 1) - 1], dim=-1)
        out = F.grid_sample(level, norm.to(level.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
        out = out * inside[:, None].to(out.dtype)
        for j, i in enumerate(idx):
            chips[i] = out[j]
    return torch.stack(chips)


def load_face_net(models_dir: str | Path | None = None, device: torch.device | str = "cpu") -> FaceRecognitionNet:
    """dlib's face-recognition ResNet with its weights, frozen, float32, on ``device``."""
    return FaceRecognitionNet.from_dlib(model_dir(models_dir) / EMBEDDING_FILE).to(device)


def face_descriptors(
    net: FaceRecognitionNet,
    images: Tensor,  # [B, 3, H, W] RGB in [0, 1]
    points: Tensor,  # [B, 5, 2] px
) -> Tensor:
    """dlib's face descriptors [B, 128] of the faces at ``points``, differentiable w.r.t. ``images``."""
    return net(align_faces(images, points))


# ----------------------------------------------------------------------------- the embedder


def _to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] float tensor in [0, 1] or [H, W, 3] uint8 -> contiguous [H, W, 3] uint8."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image [3, H, W], got {tuple(image.shape)}")
        image = to_rgb_uint8(image)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {getattr(image, 'shape', None)} "
                         f"{getattr(image, 'dtype', type(image).__name__)}")
    return np.ascontiguousarray(image)


class IdentityEmbedder:
    """dlib's 128-d face descriptor of a face in a picture.

    The face box is given, or comes from MediaPipe landmarks (a square over the
    mesh: works on turned heads), or from dlib's HOG detector; dlib's 5-point
    shape predictor places the points in it. ``backend="dlib"`` (the reference)
    runs dlib's network; ``backend="torch"`` runs the torch port on ``device``
    on the same chip geometry (same numbers to ~1e-5 cosine, and
    :meth:`batch_distance` runs as one batch). Raises MissingEvalExtraError
    without dlib or the model files; :meth:`optional` returns None instead.
    """

    def __init__(self, models_dir: str | Path | None = None, backend: str = "dlib", device: torch.device | str = "cpu"):
        if backend not in ("dlib", "torch"):
            raise ValueError(f"expected backend 'dlib' or 'torch', got {backend!r}")
        try:
            import dlib
        except ImportError as exc:
            raise MissingEvalExtraError(f"dlib is not installed; {_EXTRA_HINT}") from exc
        folder = model_dir(models_dir)
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(folder / LANDMARKS_FILE))
        self._detector = None
        self.backend, self.device = backend, torch.device(device)
        if backend == "dlib":
            self._net = dlib.face_recognition_model_v1(str(folder / EMBEDDING_FILE))
        else:
            self._net = load_face_net(folder, self.device)

    @classmethod
    def optional(cls, *args, **kwargs) -> IdentityEmbedder | None:
        """An embedder, or None (with one log line saying why) when dlib or its models are missing."""
        try:
            return cls(*args, **kwargs)
        except MissingEvalExtraError as exc:
            logger.info("identity metric off: %s", exc)
            return None

    # ---- where the face is ----------------------------------------------------------------------------
    def face_box(self, image: np.ndarray, landmarks_px: np.ndarray | None = None):
        """dlib.rectangle of the face: over MediaPipe landmarks [478, 3] when given, else the
        largest box of dlib's HOG detector (NoFaceError when it finds none). image RGB uint8."""
        dlib = self._dlib
        if landmarks_px is not None:
            # Square box over the mesh, shrunk to about the size of dlib's detector boxes
            # (eyebrows to chin), which the 5-point shape model was trained on.
            xy = landmarks_px[:NUM_MESH_VERTICES, :2]
            lo, hi = xy.min(0), xy.max(0)
            cx, cy = (lo + hi) / 2.0
            side = 0.8 * float(max(hi - lo))
            cy += 0.1 * side
            return dlib.rectangle(int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
        if self._detector is None:
            self._detector = dlib.get_frontal_face_detector()
        boxes = self._detector(image, 1)
        if len(boxes) == 0:
            raise NoFaceError("dlib found no face in the picture")
        return max(boxes, key=lambda b: b.area())

    def crop_box(self, image: np.ndarray):
        """The face box of an avatar crop: dlib's detection, else the avatar's default framing
        (face height S / 2.6, centred horizontally, 0.15 face heights above the centre)."""
        try:
            return self.face_box(image)
        except NoFaceError:
            h, w = image.shape[:2]
            face = min(h, w) / _AVATAR_CROP_SCALE
            cx, cy = w / 2, h / 2 - _AVATAR_CROP_DROP * face
            return self._dlib.rectangle(int(cx - face / 2), int(cy - face / 2), int(cx + face / 2), int(cy + face / 2))

    def five_points(self, image: np.ndarray, box) -> np.ndarray:
        """dlib's 5 points [5, 2] float64 px (integers, as dlib stores them) in a face box."""
        shape = self._shape(image, box)
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)

    # ---- descriptors ------------------------------------------------------------------------------------
    def _descriptors(self, images: list[np.ndarray], boxes: list) -> np.ndarray:
        """[N, 128] float32 descriptors of RGB uint8 pictures at their boxes."""
        if self.backend == "dlib":
            return np.stack([np.asarray(self._net.compute_face_descriptor(img, self._shape(img, box)), np.float32)
                             for img, box in zip(images, boxes)])
        out = []
        for img, box in zip(images, boxes):  # one at a time: the pictures may differ in size
            x = torch.from_numpy(img).to(self.device).permute(2, 0, 1)[None].float() / 255.0
            pts = torch.from_numpy(self.five_points(img, box))[None].to(self.device)
            out.append(align_faces(x, pts))
        with torch.no_grad():
            return self._net(torch.cat(out)).cpu().numpy()

    def embed(self, image: Tensor | np.ndarray, landmarks_px: np.ndarray | None = None, box=None) -> np.ndarray:
        """Descriptor [128] float32 of the face in ``image`` (RGB uint8 [H, W, 3], or a tensor
        [3, H, W] in [0, 1]) at ``box`` (a dlib.rectangle), else at the box of :meth:`face_box`."""
        img = _to_uint8(image)
        box = box if box is not None else self.face_box(img, landmarks_px)
        return self._descriptors([img], [box])[0]

    def distance(self, output: Tensor | np.ndarray, target: Tensor | np.ndarray) -> float:
        """|| e(output) - e(target) || with the target's :meth:`crop_box` for both pictures."""
        return self.batch_distance([output], [target])[0]

    def batch_distance(self, outputs: Tensor | list, targets: Tensor | list) -> list[float]:
        """outputs, targets [N, 3, H, W] in [0, 1] (or lists of pictures) -> N distances,
        each with the target's :meth:`crop_box`."""
        if isinstance(outputs, Tensor) and (outputs.shape != targets.shape or outputs.ndim != 4):
            raise ValueError(f"expected outputs and targets [N, 3, H, W] of one shape, got {tuple(outputs.shape)} and {tuple(targets.shape)}")
        outs, tgts = [_to_uint8(o) for o in outputs], [_to_uint8(t) for t in targets]
        boxes = [self.crop_box(t) for t in tgts]
        e, n = self._descriptors(outs + tgts, boxes + boxes), len(outs)
        return [float(np.linalg.norm(e[i] - e[n + i])) for i in range(n)]
