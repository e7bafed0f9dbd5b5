"""The host's share of a build: framing the head (crop_box), the plan that fixes a build's
shapes (BuildPlan) and the packed inputs the device reads (BuildInputs, made by prepare_build)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from models.avatar.topology import CRANIUM_CENTRE
from models.avatar.types import AvatarConfig, HostCameras
from models.face.analysis import NUM_MESH_VERTICES, FaceObservation, face_model

__all__ = ["BuildInputs", "BuildPlan", "ObservationView", "crop_box", "far_picture", "outline_map",
           "pack_observation", "prepare_build", "reach_radius", "reduction_factor", "texture_levels"]


# Landmark ids: forehead top and chin on the face outline.
_FOREHEAD, _CHIN = 10, 152


def crop_box(obs: FaceObservation, config: AvatarConfig = AvatarConfig()) -> tuple[float, float, float]:
    """Square crop (centre x, centre y, side) in source pixels framing the head."""
    lm = obs.landmarks_px
    face_h = float(np.hypot(*(lm[_CHIN, :2] - lm[_FOREHEAD, :2])))
    centre = _pivot_cam(obs)
    f = obs.focal_px
    H, W = obs.image_size
    cx = f * centre[0] / centre[2] + W / 2.0
    cy = f * centre[1] / centre[2] + H / 2.0 + config.crop_drop * face_h
    return float(cx), float(cy), float(config.crop_scale * face_h)


def _pivot_cam(obs: FaceObservation) -> np.ndarray:
    """Cranium centre in the camera frame [3]."""
    R, t = obs.pose.rotation.astype(np.float64), obs.pose.translation.astype(np.float64)
    return R @ np.array(CRANIUM_CENTRE) + t


# One observation on the device is a flat float32 vector: face points [468, 3], head
# rotation [3, 3] and translation [3], pivot [3], face height and chin row (pixels).
_OBS_POINTS = NUM_MESH_VERTICES * 3
_OBS_LEN = _OBS_POINTS + 9 + 3 + 3 + 2
# One frame's camera constants: crop (cx, cy, side), source-depth map A [3, 3],
# crop intrinsics [3, 3] (crop of side 1), source intrinsics Kt [3, 3], the card's
# reach radius (cells).
_FRAME_LEN = 3 + 9 + 9 + 9 + 1


@dataclass(frozen=True)
class ObservationView:
    """Views into one observation vector (tensors on the device)."""

    points: torch.Tensor  # [468, 3] camera frame
    R: torch.Tensor  # [3, 3] head -> camera rotation
    t: torch.Tensor  # [3]
    pivot: torch.Tensor  # [3]
    face_h: torch.Tensor  # 0-d, pixels
    chin_v: torch.Tensor  # 0-d, pixels

    @staticmethod
    def of(vec: torch.Tensor) -> ObservationView:
        o = _OBS_POINTS
        return ObservationView(vec[:o].view(NUM_MESH_VERTICES, 3), vec[o : o + 9].view(3, 3), vec[o + 9 : o + 12],
                               vec[o + 12 : o + 15], vec[o + 15], vec[o + 16])


def pack_observation(obs: FaceObservation) -> np.ndarray:
    """The observation as one float32 vector [_OBS_LEN] (the layout :class:`ObservationView` reads)."""
    lm = obs.landmarks_px
    face_h = float(np.hypot(*(lm[_CHIN, :2] - lm[_FOREHEAD, :2])))
    parts = [obs.points_cam[:NUM_MESH_VERTICES].reshape(-1), obs.pose.rotation.reshape(-1),
             obs.pose.translation.reshape(-1), _pivot_cam(obs), [face_h, float(lm[_CHIN, 1])]]
    return np.concatenate([np.asarray(p, np.float64) for p in parts]).astype(np.float32)


def reduction_factor(image_size: tuple[int, int], side: int) -> int:
    """Integer reduction that brings a picture to at most ``side`` pixels on a side."""
    return max(1, -(-max(image_size) // side))


def outline_map(obs: FaceObservation) -> np.ndarray | None:
    """The face outline filled, float32 at the size of the shell's support map (at most
    160 px on a side); None without a person mask (the shell is then not fitted)."""
    if obs.mask is None:
        return None
    H, W = obs.image_size
    f = reduction_factor((H, W), 160)
    hs, ws = -(-H // f), -(-W // f)
    outline = np.zeros((hs, ws), np.float32)
    oval = obs.landmarks_px[face_model().face_oval, :2] * np.array([ws / W, hs / H])
    cv2.fillPoly(outline, [np.round(oval * 4).astype(np.int32)], 1.0, shift=2)
    return outline


def far_picture(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The background with the person painted out (uint8 [H, W, 3]), for the far layer."""
    if mask is None:
        return image
    small = cv2.resize(image, (max(16, image.shape[1] // 4), max(16, image.shape[0] // 4)), interpolation=cv2.INTER_AREA)
    hole = cv2.resize((mask > 0.3).astype(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    hole = cv2.dilate(hole, np.ones((5, 5), np.uint8))
    filled = cv2.inpaint(small, hole, 5, cv2.INPAINT_TELEA)
    return cv2.resize(filled, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)


def reach_radius(image_size: tuple[int, int], crop_side: float, card_extent: float) -> int:
    """About a card cell, in cells of the reach map (models.avatar.texture.transparent_card_faces)."""
    k = max(3, int(crop_side * card_extent / 8.0 / reduction_factor(image_size, 96)) | 1)
    return k // 2


@dataclass(frozen=True)
class BuildPlan:
    """Everything that fixes the shapes and constants of one build (hashable: with the
    device it keys a captured CUDA graph). Made on the host by :func:`prepare_build`."""

    config: AvatarConfig
    image_size: tuple[int, int]
    focal_px: float
    render_size: int
    vis_size: int  # source-depth map side
    tex_size: tuple[int, int] | None  # texture resampled to (h, w) per picture; None: the picture's size
    fill_size: tuple[int, int] | None  # low-pass fill texture (h, w) of the whole atlas; None: the texture
    alpha_mask: bool  # the person mask is the texture alpha (background "remove" and a mask)
    support: bool  # the texture frame has a mask: the shell is fitted to it (and it is uploaded)
    reenact: bool  # geometry from a second observation
    geo_support: bool  # ... which has a mask


@dataclass
class BuildInputs:
    """One build's inputs, made on the host (numbers and pictures)."""

    plan: BuildPlan
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray | None  # float32 [H, W] person mask of the texture frame
    far: np.ndarray | None  # uint8 [H, W, 3], background "far"
    obs: np.ndarray  # float32 [_OBS_LEN], texture frame
    outline: np.ndarray | None  # float32 [h, w] (:func:`outline_map`)
    geo_obs: np.ndarray | None  # reenactment frame
    geo_mask: np.ndarray | None
    geo_outline: np.ndarray | None
    frame: np.ndarray  # float32 [_FRAME_LEN]
    host: HostCameras

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The inputs of models.avatar.build.build_on_device, uploaded."""
        def up(a):
            if a is None:
                return None
            a = np.ascontiguousarray(a)
            if not a.flags.writeable:  # e.g. a decoded video frame's buffer: torch wants memory it may write
                a = a.copy()
            return torch.from_numpy(a).to(device, non_blocking=True)
        names = ("image", "mask", "far", "obs", "outline", "geo_obs", "geo_mask", "geo_outline", "frame")
        return {n: up(getattr(self, n)) for n in names}


def texture_levels(crop_side: float, plan_size: tuple[int, int], max_side: float, texels: int, far: bool):
    """Texture and fill-texture sizes, in powers of two so that they change rarely as the
    framing follows the head: the crop spans at most 1.25 * max_side texture texels, and
    about ``texels`` (within a factor sqrt 2) fill texels."""
    H, W = plan_size
    k = 0
    while crop_side / 2**k > 1.25 * max_side:
        k += 1
    tex = None if k == 0 else (max(16, round(H / 2**k)), max(16, round(W / 2**k)))
    th, tw = tex or (H, W)
    tw = 2 * tw if far else tw
    fill = None
    if texels:
        j = round(math.log2(max(crop_side / 2**k / texels, 1.0)))
        if j > 0:
            fill = (max(2, round(th / 2**j)), max(2, round(tw / 2**j)))
    return tex, fill


def prepare_build(
    image: np.ndarray,
    obs: FaceObservation,
    config: AvatarConfig,
    geometry: FaceObservation | None,
    crop: tuple[float, float, float] | None,
    render_size: int,
) -> BuildInputs:
    """The host's share of a build: framing, camera constants, small CPU pictures."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {getattr(image, 'shape', None)}")
    if tuple(image.shape[:2]) != tuple(obs.image_size):
        raise ValueError(f"expected the image of the observation {obs.image_size}, got {image.shape[:2]}")
    if geometry is not None and tuple(geometry.image_size) != tuple(obs.image_size):
        raise ValueError(f"expected reenactment frames of one camera ({obs.image_size}), got {geometry.image_size}")
    crop = crop or crop_box(obs, config)
    cx, cy, side = crop
    H, W = obs.image_size
    f = obs.focal_px
    far = config.background == "far"
    # The source-depth map frames the head (extent crop sides), at about the render's resolution.
    vis_extent = min(config.card_extent, 1.35)
    vis_size = min(1024, max(config.visibility_size, round(render_size * vis_extent)))
    tex_size, fill_size = texture_levels(side, (H, W), config.texture_scale * render_size, config.fill_texels, far)
    alpha_mask = obs.mask is not None and not far
    plan = BuildPlan(config, (H, W), f, render_size, vis_size, tex_size, fill_size, alpha_mask, obs.mask is not None,
                     geometry is not None, geometry is not None and geometry.mask is not None)
    ext = side * vis_extent
    s = vis_size / ext
    A = np.array([[s, 0, -s * (cx - ext / 2)], [0, s, -s * (cy - ext / 2)], [0, 0, 1]])
    crop_K = np.array([[f / side, 0, (W / 2.0 - cx) / side + 0.5], [0, f / side, (H / 2.0 - cy) / side + 0.5], [0, 0, 1]])
    Kt = np.array([[f, 0, W / 2.0], [0, f, H / 2.0], [0, 0, 1]])
    radius = reach_radius((H, W), side, config.card_extent)
    frame = np.concatenate([[cx, cy, side], A.reshape(-1), crop_K.reshape(-1), Kt.reshape(-1), [radius]])
    frame = frame.astype(np.float32)
    pivot = _pivot_cam(geometry or obs)
    return BuildInputs(
        plan=plan,
        image=image,
        mask=None if obs.mask is None else np.asarray(obs.mask, np.float32),
        far=far_picture(image, obs.mask) if far else None,
        obs=pack_observation(obs),
        outline=outline_map(obs),
        geo_obs=None if geometry is None else pack_observation(geometry),
        geo_mask=None if geometry is None or geometry.mask is None else np.asarray(geometry.mask, np.float32),
        geo_outline=None if geometry is None else outline_map(geometry),
        frame=frame,
        host=HostCameras(crop_K=torch.from_numpy(crop_K.astype(np.float32)),
                         pivot=torch.from_numpy(pivot.astype(np.float32))),
    )
