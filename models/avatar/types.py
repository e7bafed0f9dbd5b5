"""The avatar's value types: its settings (AvatarConfig), the built avatar with its crop
camera (Avatar) and the renders (RenderOutput)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.face.analysis import NUM_MESH_VERTICES
from models.geometry.camera import OrbitPose, orbit_viewmats_np, project

__all__ = ["Avatar", "AvatarConfig", "HostCameras", "RenderOutput", "VATTR"]


class VATTR:
    """Columns of ``Avatar.vattr``, the per-vertex attributes the render interpolates per pixel."""

    TEX = slice(0, 3)  # projective texture coordinates (u w, v w, w) in the source camera
    FILL = slice(3, 6)  # the same for the fill texture (hidden surface: a nearby seen point)
    MIRROR = slice(6, 9)  # the texture coordinates of the mirror vertex (face and shell)
    RATIO = slice(9, 12)  # low-frequency lighting ratio, this side over the mirror side (RGB)
    FILL_RGB = slice(12, 15)  # the fill texture's colour, spread from well-seen vertices (RGB)
    GRAZING = 15  # in [0, 1]: 0 where the source sees the surface edge-on (RenderOutput.seen)
    MIRROR_Q = 16  # in [0, 1]: how well the source saw the mirror vertex
    OPACITY = 17
    COUNT = 18


@dataclass(frozen=True)
class AvatarConfig:
    """Settings of the avatar builder and renderer."""

    background: str = "remove"
    """"remove": person mask as alpha over ``bg_color``; "far": keep the background as a distant layer."""
    bg_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Background colour (RGB in [0, 1]) where nothing opaque is drawn."""
    crop_scale: float = 2.6
    """Side of the square crop camera, in face heights (forehead-to-chin)."""
    crop_drop: float = 0.15
    """Crop centre below the head centre, in face heights (leaves room for the shoulders)."""
    shell_rings: int = 10
    """Rings between the face outline and the back pole of the head shell."""
    card_grid: int = 28
    """Vertices per side of the neck/shoulder/backdrop card."""
    card_extent: float = 1.6
    """Card side as a multiple of the crop side (margin revealed by orbiting)."""
    texture_scale: float = 2.0
    """Texture resolution: crop side is resampled to about texture_scale * render size, at most."""
    visibility_size: int = 256
    """Least resolution of the source-view depth map (grows with the render size)."""
    cranium_scale: float = 1.1
    """Uniform scale of the cranium ellipsoid (bigger hair: > 1)."""
    fill_texels: int = 64
    """Surface the source did not see takes its colour from a low-pass copy of the texture in
    which the crop spans about this many texels: smooth colour carried round the head instead
    of stretched streaks of detail. 0: the full-resolution texture."""

    def __post_init__(self) -> None:
        if self.background not in ("remove", "far"):
            raise ValueError(f"expected background 'remove' or 'far', got {self.background!r}")
        if len(self.bg_color) != 3 or not all(0.0 <= c <= 1.0 for c in self.bg_color):
            raise ValueError(f"expected bg_color as 3 values in [0, 1], got {self.bg_color}")
        if self.shell_rings < 2 or self.card_grid < 4:
            raise ValueError("expected shell_rings >= 2 and card_grid >= 4")
        if not 1.0 <= self.crop_scale <= 8.0:
            raise ValueError(f"expected crop_scale in [1, 8], got {self.crop_scale}")
        if self.fill_texels != 0 and self.fill_texels < 4:
            raise ValueError(f"expected fill_texels 0 (off) or >= 4, got {self.fill_texels}")


@dataclass
class RenderOutput:
    """Renders of V views, S x S pixels each."""

    rgb: torch.Tensor  # [V, 3, S, S] in [0, 1], composited over the background
    alpha: torch.Tensor  # [V, 1, S, S] in [0, 1]
    depth: torch.Tensor  # [V, 1, S, S] camera depth in metres, 0 where empty
    seen: torch.Tensor  # [V, 1, S, S] in [0, 1]: 1 where the texture was visible in the source
    needed: torch.Tensor | None = None  # 0-d: raster candidates this render needed


@dataclass(frozen=True)
class HostCameras:
    """CPU copies of an avatar's camera constants: cameras are made without device round trips."""

    crop_K: torch.Tensor  # [3, 3] CPU
    pivot: torch.Tensor  # [3] CPU


@dataclass
class Avatar:
    """A textured head mesh in the source camera frame (tensors on one device)."""

    verts: torch.Tensor  # [N, 3] metres, source camera frame
    faces: torch.Tensor  # [F, 3] int64
    cull: torch.Tensor  # [F] bool: the head's shell, culled when facing away (not the face mesh: it folds)
    skip: torch.Tensor  # [F] bool: card triangles with nothing opaque on them (not drawn)
    part: torch.Tensor  # [F] int64: 0 face mesh, 1 shell (the head: opaque), 2 card (matte alpha, fades at the picture's edge), 3 far layer
    face_detail: torch.Tensor  # [F] float: how far each triangle's detail fades at large angles (0 off the face)
    vattr: torch.Tensor  # [N, VATTR.COUNT] per-vertex attributes (columns: :class:`VATTR`)
    texture: torch.Tensor  # [1, 4, Ht, Wt] RGBA in [0, 1], premultiplied (A = the person's matte, or 1)
    texture_fill: torch.Tensor  # [1, 4, h, w] low-pass copy (same layout, not premultiplied) for unseen surface
    tex_span: tuple[float, float]  # (H, W) of the source picture space that vattr's texture coords address
    src_depth: torch.Tensor  # [1, 2, Sv, Sv] source-view depth of the head (sharp, max-pooled), +inf where empty
    src_depth_K: torch.Tensor  # [3, 3] maps source pixels (u, v, 1) to src_depth pixels
    pivot: torch.Tensor  # [3] head centre: orbit cameras turn about it
    source_dir: torch.Tensor  # [3] unit vector from the head towards the texture's camera, in the head's pose of verts
    crop_K: torch.Tensor  # [3, 3] intrinsics of the crop camera for a crop of side 1
    source_image: torch.Tensor  # [3, H, W] texture frame picture in [0, 1]
    source_alpha: torch.Tensor  # [1, h, w] its person mask (any resolution), 1 where none
    source_focal_px: float  # focal length of the source camera, source pixels
    config: AvatarConfig
    host: HostCameras | None = None  # CPU copies of the camera constants (no device round trips)
    needed: torch.Tensor | None = None  # 0-d: candidates the source-depth raster needed
    memory: torch.Tensor | None = None  # [1, 7, Ha, Wa] appearance memory (models.avatar.memory): RGB lit as now and alpha, both times k; weights under / over the own texture; k, the coverage
    memory_uv: torch.Tensor | None = None  # [F, 3, 2] atlas position of each triangle corner (grid_sample units)

    @property
    def device(self) -> torch.device:
        return self.verts.device

    def intrinsics(self, size: int, fov_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Crop-camera intrinsics for an S x S picture (CPU): [3, 3], or [V, 3, 3] with fov_scale [V]."""
        return torch.from_numpy(self._intrinsics_np(size, None if fov_scale is None else np.asarray(fov_scale)))

    def _intrinsics_np(self, size: int, fov_scale: np.ndarray | None = None) -> np.ndarray:
        base = (self.host.crop_K if self.host is not None else self.crop_K.cpu()).numpy()
        K = base.copy()
        K[:2] *= size
        if fov_scale is None:
            return K
        Ks = np.repeat(K[None], len(fov_scale), 0)
        Ks[:, 0, 0] = K[0, 0] / fov_scale
        Ks[:, 1, 1] = K[1, 1] / fov_scale
        return Ks

    def cameras(self, poses: Sequence[OrbitPose], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(viewmats [V, 4, 4], Ks [V, 3, 3]) of orbit views about the pivot, on the avatar's device.
        Worked out on the host in numpy (a handful of numbers: torch's cost per operation was most of the time)
        and uploaded in one go."""
        if len(poses) == 0:
            raise ValueError("expected at least one pose, got none")
        pivot = (self.host.pivot if self.host is not None else self.pivot.cpu()).numpy()
        angles = np.array([(p.yaw_deg, p.pitch_deg, p.roll_deg, p.dist_scale) for p in poses], dtype=np.float64)
        viewmats = orbit_viewmats_np(pivot, angles[:, 0], angles[:, 1], angles[:, 2], angles[:, 3])
        f1 = float(self._intrinsics_np(1)[1, 1])
        half_tan = 0.5 / f1  # tan(base fov / 2)
        scale = np.array([1.0 if p.fov_deg is None else math.tan(math.radians(p.fov_deg) / 2) / half_tan for p in poses])
        Ks = self._intrinsics_np(size, scale)
        both = torch.from_numpy(np.concatenate([viewmats.reshape(-1), Ks.reshape(-1)]).astype(np.float32))
        if self.device.type == "cuda":  # pinned: the upload need not wait for the device's queue
            both = both.pin_memory()
        both = both.to(self.device, non_blocking=True)
        V = len(poses)
        return both[: V * 16].reshape(V, 4, 4), both[V * 16 :].reshape(V, 3, 3)

    def crop(self, image: np.ndarray | torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
        """Warp a picture taken by the SOURCE camera (e.g. a target frame of the
        same clip, or a mask; any resolution of the same field of view) into the
        crop camera: [C, S, S] float (uint8 pictures come back in [0, 1])."""
        img = _to_chw(image, self.device)
        H, W = self.source_image.shape[-2:]
        K = self.intrinsics(size)
        # Crop pixel centre j + 0.5 shows source x = (j + 0.5 - cx) * f_src / f_crop + W / 2.
        s = self.source_focal_px / float(K[0, 0])
        jj = torch.arange(size, device=self.device, dtype=torch.float32) + 0.5
        xs = (jj - float(K[0, 2])) * s + W / 2.0
        ys = (jj - float(K[1, 2])) * s + H / 2.0
        gy, gx = torch.meshgrid(2 * ys / H - 1, 2 * xs / W - 1, indexing="ij")
        grid = torch.stack([gx, gy], -1)[None]
        out = F.grid_sample(img[None], grid, mode=interpolation, padding_mode="zeros", align_corners=False)
        return out[0]

    def source_view(self, size: int) -> torch.Tensor:
        """The texture frame's picture seen by the crop camera: [3, S, S] in [0, 1]
        (the refiner's reference image), background handled as in renders."""
        rgb = self.crop(self.source_image, size)
        if self.config.background == "remove":
            alpha = self.crop(self.source_alpha, size)
            bg = torch.tensor(self.config.bg_color, device=self.device)[:, None, None]
            rgb = rgb * alpha + bg * (1 - alpha)
        return rgb.clamp(0, 1)

    def project_landmarks(self, poses: Sequence[OrbitPose], size: int) -> torch.Tensor:
        """Pixel positions [V, 468, 2] of the face-mesh vertices in each view."""
        viewmats, Ks = self.cameras(poses, size)
        pts = project(self.verts[None, :NUM_MESH_VERTICES].expand(len(poses), -1, -1), viewmats, Ks)
        return pts[..., :2].cpu()


def _to_chw(image: np.ndarray | torch.Tensor, device) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(image))
        if t.ndim == 2:
            t = t[None]
        elif t.ndim == 3:
            t = t.permute(2, 0, 1)
        else:
            raise ValueError(f"expected an image [H, W] or [H, W, C], got {image.shape}")
        t = t.to(device)
        return t.float() / 255.0 if image.dtype == np.uint8 else t.float()
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"expected an image tensor [C, H, W], got {tuple(image.shape)}")
    return image.to(device).float()
