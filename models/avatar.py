"""One-shot 3D head avatar from a single frame (the GP-Avatar stage of the method).

From one picture and its face analysis we build, in one feed-forward pass, a
textured mesh of fixed topology, made of four parts (all in the source camera
frame, metres; see telepresence.camera for the convention):

1. **face**: MediaPipe's 468-vertex face mesh, lifted to metric 3D
   (telepresence.face.metric_landmarks);
2. **shell**: rings of vertices swept from the face outline over a cranium
   ellipsoid to a pole at the back of the head (hair, cranium, ears, under the
   jaw); ring 0 *is* the face outline, so face and shell share vertices and a
   turned head cannot tear at the jaw line or the forehead;
3. **card**: a curved sheet behind the head spanning the framed picture:
   neck and shoulders below the chin, a backdrop for hair that sticks out of
   the ellipsoid above it; parts hidden by the head in the source are made
   transparent so no ghost of the face appears behind a turned head;
4. **far layer** (``background="far"``): a distant plane carrying the
   background with the person painted out; with ``background="remove"`` the
   person mask becomes the alpha and the background a flat colour.

Texture is projective: each vertex carries its homogeneous position in the
texture frame's camera, interpolated perspective-correctly per pixel, so a
render at the source camera reproduces the source picture. Vertex i means
the same point of the head in every frame, which gives **reenactment**:
geometry from frame t, texture from frame s (``build_avatar(..., geometry=obs_t)``).

Every view is rendered through a square **crop camera**: the source camera
with intrinsics framing the head (``crop_scale`` face heights wide). Orbit
views turn that camera about the head centre (the pivot).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.raster import interpolate, rasterize
from telepresence.camera import OrbitPose, orbit_viewmats, project
from telepresence.face import NUM_MESH_VERTICES, FaceObservation, face_model

log = logging.getLogger(__name__)

__all__ = ["AvatarConfig", "Avatar", "RenderOutput", "build_avatar", "render_views", "render_cameras", "crop_box"]

# Cranium ellipsoid in the head frame (x right, y down, z into the head; metres),
# sized for an adult head with some hair around the canonical face model.
_CRANIUM_CENTRE = (0.0, -0.02, 0.045)
_CRANIUM_RADII = (0.082, 0.112, 0.100)
# Landmark ids: forehead top and chin on the face outline.
_FOREHEAD, _CHIN = 10, 152


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
    cranium_scale: float = 1.0
    """Uniform scale of the cranium ellipsoid (bigger hair: > 1)."""

    def __post_init__(self) -> None:
        if self.background not in ("remove", "far"):
            raise ValueError(f"expected background 'remove' or 'far', got {self.background!r}")
        if len(self.bg_color) != 3 or not all(0.0 <= c <= 1.0 for c in self.bg_color):
            raise ValueError(f"expected bg_color as 3 values in [0, 1], got {self.bg_color}")
        if self.shell_rings < 2 or self.card_grid < 4:
            raise ValueError("expected shell_rings >= 2 and card_grid >= 4")
        if not 1.0 <= self.crop_scale <= 8.0:
            raise ValueError(f"expected crop_scale in [1, 8], got {self.crop_scale}")


@dataclass
class RenderOutput:
    """Renders of V views, S x S pixels each."""

    rgb: torch.Tensor  # [V, 3, S, S] in [0, 1], composited over the background
    alpha: torch.Tensor  # [V, 1, S, S] in [0, 1]
    depth: torch.Tensor  # [V, 1, S, S] camera depth in metres, 0 where empty
    seen: torch.Tensor  # [V, 1, S, S] in [0, 1]: 1 where the texture was visible in the source


@dataclass
class Avatar:
    """A textured head mesh in the source camera frame (tensors on one device)."""

    verts: torch.Tensor  # [N, 3] metres, source camera frame
    faces: torch.Tensor  # [F, 3] int64
    vattr: torch.Tensor  # [N, 10] per vertex: texture K X (3), fill texture (3), grazing, opacity, solid, head
    texture: torch.Tensor  # [1, 4, Ht, Wt] RGBA in [0, 1] (A = person mask, or 1)
    tex_span: tuple[float, float]  # (H, W) of the source picture space that vattr's texture coords address
    src_depth: torch.Tensor  # [1, 1, Sv, Sv] source-view depth (min-pooled), +inf where empty
    src_depth_K: torch.Tensor  # [3, 3] maps source pixels (u, v, 1) to src_depth pixels
    pivot: torch.Tensor  # [3] head centre: orbit cameras turn about it
    crop_K: torch.Tensor  # [3, 3] intrinsics of the crop camera for a crop of side 1
    source_image: torch.Tensor  # [3, H, W] texture frame picture in [0, 1]
    source_alpha: torch.Tensor  # [1, h, w] its person mask (any resolution), 1 where none
    source_focal_px: float  # focal length of the source camera, source pixels
    config: AvatarConfig

    @property
    def device(self) -> torch.device:
        return self.verts.device

    def intrinsics(self, size: int, fov_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Crop-camera intrinsics for an S x S picture: [3, 3], or [V, 3, 3] with fov_scale [V]."""
        K = self.crop_K.clone()
        K[:2] *= size
        if fov_scale is None:
            return K
        Ks = K[None].repeat(fov_scale.shape[0], 1, 1)
        Ks[:, 0, 0] = K[0, 0] / fov_scale
        Ks[:, 1, 1] = K[1, 1] / fov_scale
        return Ks

    def cameras(self, poses: Sequence[OrbitPose], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(viewmats [V, 4, 4], Ks [V, 3, 3]) of orbit views about the pivot."""
        if len(poses) == 0:
            raise ValueError("expected at least one pose, got none")
        dev, dt = self.device, self.verts.dtype
        t = lambda vals: torch.tensor(vals, device=dev, dtype=dt)  # noqa: E731
        viewmats = orbit_viewmats(
            self.pivot,
            t([p.yaw_deg for p in poses]),
            t([p.pitch_deg for p in poses]),
            t([p.roll_deg for p in poses]),
            t([p.dist_scale for p in poses]),
        )
        base_fov = 2.0 * math.atan(0.5 / float(self.crop_K[1, 1]))
        scale = [
            1.0 if p.fov_deg is None else math.tan(math.radians(p.fov_deg) / 2) / math.tan(base_fov / 2)
            for p in poses
        ]
        return viewmats, self.intrinsics(size, t(scale))

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
        return pts[..., :2]


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


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class _Topology:
    faces: np.ndarray  # [F, 3]
    n_face: int  # face-mesh vertices
    n_shell: int  # shell vertices (rings 1..K and the pole)
    n_card: int
    n_far: int
    ring_ids: np.ndarray  # [K + 1, J] vertex ids per ring (ring 0 = face outline)
    pole: int


_TOPOLOGY_CACHE: dict[tuple[int, int, bool], _Topology] = {}


def _grid_faces(rows: int, cols: int, base: int) -> np.ndarray:
    idx = np.arange(rows * cols).reshape(rows, cols) + base
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    return np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3), np.stack([b, c, d], -1).reshape(-1, 3)])


def _topology(rings: int, card: int, far: bool) -> _Topology:
    key = (rings, card, far)
    if key in _TOPOLOGY_CACHE:
        return _TOPOLOGY_CACHE[key]
    model = face_model()
    oval = model.face_oval  # [J]
    J = len(oval)
    n_face = NUM_MESH_VERTICES
    ring_ids = [oval]
    for k in range(1, rings + 1):
        ring_ids.append(n_face + (k - 1) * J + np.arange(J))
    ring_ids = np.stack(ring_ids)  # [K + 1, J]
    pole = n_face + rings * J
    faces = [model.triangles]
    for k in range(rings):
        a, b = ring_ids[k], ring_ids[k + 1]
        a2, b2 = np.roll(a, -1), np.roll(b, -1)
        faces += [np.stack([a, b, a2], -1), np.stack([a2, b, b2], -1)]
    last = ring_ids[-1]
    faces.append(np.stack([last, np.full(J, pole), np.roll(last, -1)], -1))
    n_shell = rings * J + 1
    base = n_face + n_shell
    faces.append(_grid_faces(card, card, base))
    n_card = card * card
    n_far = 0
    if far:
        faces.append(_grid_faces(4, 4, base + n_card))
        n_far = 16
    topo = _Topology(
        faces=np.concatenate(faces).astype(np.int64),
        n_face=n_face,
        n_shell=n_shell,
        n_card=n_card,
        n_far=n_far,
        ring_ids=ring_ids,
        pole=pole,
    )
    _TOPOLOGY_CACHE[key] = topo
    return topo


# --------------------------------------------------------------------------- geometry


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
    return R @ np.array(_CRANIUM_CENTRE) + t


def _geometry(
    obs: FaceObservation,
    topo: _Topology,
    config: AvatarConfig,
    crop: tuple[float, float, float],
    device,
) -> torch.Tensor:
    """Vertex positions [N, 3] in the camera frame for one observation."""
    dt = torch.float32
    R = torch.as_tensor(obs.pose.rotation, dtype=dt, device=device)
    t = torch.as_tensor(obs.pose.translation, dtype=dt, device=device)
    face = torch.as_tensor(obs.points_cam[:NUM_MESH_VERTICES], dtype=dt, device=device)  # [468, 3]
    # Shell: sweep each outline vertex over the ellipsoid to the back pole (head frame).
    face_head = (face - t) @ R  # R^T (X - t): [468, 3]
    c = torch.tensor(_CRANIUM_CENTRE, dtype=dt, device=device)
    radii = torch.tensor(_CRANIUM_RADII, dtype=dt, device=device) * config.cranium_scale
    oval = face_head[torch.as_tensor(topo.ring_ids[0], device=device)]  # [J, 3]
    d0 = oval - c
    r0 = d0.norm(dim=-1, keepdim=True)
    d0 = d0 / r0
    back = torch.tensor([0.0, 0.0, 1.0], dtype=dt, device=device)
    omega = torch.acos((d0 @ back).clamp(-0.999, 0.999))[:, None]  # [J, 1]
    K = config.shell_rings
    s = torch.arange(1, K + 1, dtype=dt, device=device)[None, :] / (K + 1)  # [1, K]
    # Spherical interpolation from the outline direction to the back direction.
    wa = torch.sin((1 - s) * omega) / torch.sin(omega)
    wb = torch.sin(s * omega) / torch.sin(omega)
    u = wa[..., None] * d0[:, None, :] + wb[..., None] * back  # [J, K, 3]
    u = u / u.norm(dim=-1, keepdim=True)
    r_ell = 1.0 / ((u / radii).pow(2).sum(-1)).sqrt()  # [J, K]
    blend = (s * (K + 1) / 2.5).clamp(max=1.0)  # reach the ellipsoid within ~2.5 rings
    blend = blend * blend * (3 - 2 * blend)
    r = r0 * (1 - blend) + r_ell * blend
    shell = c + u * r[..., None]  # [J, K, 3]
    shell = shell.transpose(0, 1).reshape(-1, 3)  # ring-major, matching _topology
    pole = c + back * (1.0 / (back / radii).pow(2).sum().sqrt())
    shell_cam = torch.cat([shell, pole[None]]) @ R.T + t  # [n_shell, 3]
    if obs.mask is not None:
        shell_cam = _fit_shell_to_silhouette(shell_cam, R @ c + t, obs, device)
    # Card: a curved sheet over the crop window, depth set by the head centre and the chin.
    pivot = torch.as_tensor(_pivot_cam(obs), dtype=dt, device=device)
    card = _card_vertices(obs, config, crop, pivot, device)
    parts = [face, shell_cam, card]
    if topo.n_far:
        parts.append(_far_vertices(obs, config, crop, pivot, device))
    return torch.cat(parts)


def _fit_shell_to_silhouette(shell: torch.Tensor, centre: torch.Tensor, obs: FaceObservation, device) -> torch.Tensor:
    """Shrink shell vertices towards the cranium centre until they project inside the
    person (or the face outline) in the source picture: the cranium never pokes out
    of the real silhouette, so short hair and narrow heads stay their own shape.

    shell [M, 3], centre [3] (camera frame); binary search of a per-vertex scale in [0.55, 1].
    """
    H, W = obs.image_size
    scale_px = min(1.0, 160.0 / max(H, W))
    size = (max(8, round(W * scale_px)), max(8, round(H * scale_px)))
    support = cv2.resize(obs.mask, size, interpolation=cv2.INTER_AREA)
    oval = obs.landmarks_px[face_model().face_oval, :2] * scale_px
    cv2.fillPoly(support, [np.round(oval * 4).astype(np.int32)], 1.0, shift=2)
    sup = torch.from_numpy(support).to(device)[None, None]
    f = obs.focal_px

    def inside(points: torch.Tensor) -> torch.Tensor:
        u = f * points[:, 0] / points[:, 2] + W / 2.0
        v = f * points[:, 1] / points[:, 2] + H / 2.0
        grid = torch.stack([2 * u / W - 1, 2 * v / H - 1], -1)[None, None]
        val = F.grid_sample(sup, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return val[0, 0, 0] >= 0.5

    off = shell - centre
    lo = torch.full((shell.shape[0],), 0.55, device=device)
    hi = torch.ones_like(lo)
    ok_full = inside(shell)
    for _ in range(7):
        mid = (lo + hi) / 2
        ok = inside(centre + off * mid[:, None])
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    scale = torch.where(ok_full, torch.ones_like(lo), lo)
    return centre + off * scale[:, None]


def _card_pixels(config: AvatarConfig, crop: tuple[float, float, float], n: int, extent: float, device):
    cx, cy, side = crop
    g = torch.linspace(-0.5, 0.5, n, device=device) * side * extent
    yy, xx = torch.meshgrid(cy + g, cx + g, indexing="ij")
    return xx.reshape(-1), yy.reshape(-1)


def _card_vertices(obs, config, crop, pivot, device) -> torch.Tensor:
    """Card vertices [G*G, 3]: depth = head-centre depth + delta(height below chin) + curvature."""
    H, W = obs.image_size
    f = obs.focal_px
    u, v = _card_pixels(config, crop, config.card_grid, config.card_extent, device)
    lm = obs.landmarks_px
    face_h = float(np.hypot(*(lm[_CHIN, :2] - lm[_FOREHEAD, :2])))
    chin_v = float(lm[_CHIN, 1])
    zc = float(pivot[2])
    rel = (v - chin_v) / face_h  # face heights below the chin
    # Backdrop well behind the head centre above the chin; neck and chest come forward below it.
    knots_x = torch.tensor([-0.3, 0.05, 0.35, 1.2], device=device)
    knots_y = torch.tensor([0.06, -0.015, -0.03, -0.05], device=device)
    delta = _interp(rel, knots_x, knots_y)
    lateral = (u - (f * float(pivot[0]) / zc + W / 2.0)) / f * zc  # metres from the head centre
    z = zc + delta + 1.2 * lateral.pow(2)
    X = (u - W / 2.0) / f * z
    Y = (v - H / 2.0) / f * z
    return torch.stack([X, Y, z], -1)


def _far_vertices(obs, config, crop, pivot, device) -> torch.Tensor:
    H, W = obs.image_size
    f = obs.focal_px
    u, v = _card_pixels(config, crop, 4, config.card_extent * 2.5, device)
    z = torch.full_like(u, 3.0 * float(pivot[2]))
    return torch.stack([(u - W / 2.0) / f * z, (v - H / 2.0) / f * z, z], -1)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation, clamped at the ends (numpy.interp for tensors)."""
    x = x.clamp(float(xp[0]), float(xp[-1]))
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def _vertex_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    tri = verts[faces]
    n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    vn = torch.zeros_like(verts).index_add_(0, faces.reshape(-1), n.repeat_interleave(3, 0))
    return vn / vn.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# --------------------------------------------------------------------------- build


def _prepare_texture(image: np.ndarray, mask: np.ndarray | None, crop, config: AvatarConfig, max_side: int):
    """Downsample the picture so the crop is at most ``max_side`` pixels; RGBA float [4, h, w]
    plus the far-layer colour picture (person painted out) when needed."""
    H, W = image.shape[:2]
    scale = min(1.0, max_side / max(crop[2], 1.0))
    if scale < 0.999:
        size = (max(16, round(W * scale)), max(16, round(H * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        if mask is not None:
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_AREA)
    if mask is None or config.background == "far":
        alpha = np.ones(image.shape[:2], np.float32)
    else:
        alpha = mask.astype(np.float32)
    rgba = np.concatenate([image.astype(np.float32) / 255.0, alpha[..., None]], -1)
    far = None
    if config.background == "far":
        if mask is not None:
            small = cv2.resize(image, (max(16, image.shape[1] // 4), max(16, image.shape[0] // 4)), interpolation=cv2.INTER_AREA)
            hole = cv2.resize((mask > 0.3).astype(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_NEAREST)
            hole = cv2.dilate(hole, np.ones((5, 5), np.uint8))
            filled = cv2.inpaint(small, hole, 5, cv2.INPAINT_TELEA)
            far = cv2.resize(filled, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        else:
            far = image
        far = np.concatenate([far.astype(np.float32) / 255.0, np.ones(image.shape[:2] + (1,), np.float32)], -1)
    return rgba, far


def build_avatar(
    image: np.ndarray,
    obs: FaceObservation,
    config: AvatarConfig = AvatarConfig(),
    device: str | torch.device = "cpu",
    geometry: FaceObservation | None = None,
    crop: tuple[float, float, float] | None = None,
    render_size: int = 512,
) -> Avatar:
    """Build the avatar of the face in ``image`` (RGB uint8 [H, W, 3]) in one pass.

    geometry: reenactment, another frame of the same camera (same picture size):
        its landmarks give the geometry, ``image``/``obs`` give the texture.
    crop: (centre x, centre y, side) in source pixels; default :func:`crop_box` of obs.
    render_size: the largest render size planned (sets the texture resolution).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {getattr(image, 'shape', None)}")
    if tuple(image.shape[:2]) != tuple(obs.image_size):
        raise ValueError(f"expected the image of the observation {obs.image_size}, got {image.shape[:2]}")
    if geometry is not None and tuple(geometry.image_size) != tuple(obs.image_size):
        raise ValueError(f"expected reenactment frames of one camera ({obs.image_size}), got {geometry.image_size}")
    device = torch.device(device)
    topo = _topology(config.shell_rings, config.card_grid, config.background == "far")
    crop = crop or crop_box(obs, config)
    H, W = obs.image_size
    f = obs.focal_px
    faces = torch.as_tensor(topo.faces, device=device)

    # Texture-frame geometry: projective texture coordinates and what the source saw.
    tex_verts = _geometry(obs, topo, config, crop, device)  # [N, 3]
    N = tex_verts.shape[0]
    Kt = torch.tensor([[f, 0, W / 2.0], [0, f, H / 2.0], [0, 0, 1]], device=device)
    tex_h = tex_verts @ Kt.T  # [N, 3]: (u w, v w, w) with w the source depth
    vis_size = min(1024, max(config.visibility_size, round(render_size * config.card_extent)))
    src_depth, src_depth_K = _source_depth(tex_verts, faces, Kt, crop, config.card_extent, vis_size, device)
    visible = _vertex_visible(tex_h, src_depth, src_depth_K)  # [N] bool
    grazing = _grazing(tex_verts, faces)  # [N] in [0, 1]

    # Fill texture for what the source did not see (used per pixel where hidden).
    fill = tex_h.clone()
    opacity = torch.ones(N, device=device)
    solid = torch.zeros(N, device=device)
    solid[: topo.n_face] = 1.0
    head = torch.zeros(N, device=device)
    head[: topo.n_face + topo.n_shell] = 1.0
    card = slice(topo.n_face + topo.n_shell, topo.n_face + topo.n_shell + topo.n_card)
    _fill_shell(fill, visible, topo, device)
    _fill_card(fill, opacity, visible, card, config.card_grid, device)

    verts = tex_verts if geometry is None else _geometry(geometry, topo, config, crop, device)

    rgba, far = _prepare_texture(image, obs.mask, crop, config, int(config.texture_scale * render_size))
    span_w = float(W)
    if far is not None:
        # Atlas [picture | far layer]: far-layer vertices address the right half.
        rgba = np.concatenate([rgba, far], axis=1)
        far_ids = slice(N - topo.n_far, N)
        for t in (tex_h, fill):
            t[far_ids, 0] += W * t[far_ids, 2]
        span_w = 2.0 * W
    texture = torch.from_numpy(rgba).permute(2, 0, 1)[None].to(device)
    alpha_src = obs.mask if (obs.mask is not None and config.background == "remove") else np.ones((H, W), np.float32)
    cx, cy, side = crop
    crop_K = torch.tensor(
        [[f / side, 0, (W / 2.0 - cx) / side + 0.5], [0, f / side, (H / 2.0 - cy) / side + 0.5], [0, 0, 1]],
        device=device,
    )
    vattr = torch.cat([tex_h, fill, torch.stack([grazing, opacity, solid, head], -1)], -1)
    return Avatar(
        verts=verts,
        faces=faces,
        vattr=vattr,
        texture=texture,
        tex_span=(float(H), span_w),
        src_depth=src_depth,
        src_depth_K=src_depth_K,
        pivot=torch.as_tensor(_pivot_cam(geometry or obs), dtype=torch.float32, device=device),
        crop_K=crop_K,
        source_image=torch.from_numpy(image).to(device).permute(2, 0, 1).float() / 255.0,
        source_alpha=torch.from_numpy(np.ascontiguousarray(alpha_src, np.float32)).to(device)[None],
        source_focal_px=f,
        config=config,
    )


def _source_depth(verts, faces, Kt, crop, extent: float, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth map [1, 1, S, S] of the texture-frame mesh seen from the source camera,
    framing the card (``extent`` crop sides), +inf where empty; and A [3, 3] taking
    source pixels (u, v, 1) to map pixels. At least as sharp as the renders, so that
    no visible surface is mistaken for a hidden one at a silhouette."""
    cx, cy, side = crop
    ext = side * extent
    s = S / ext
    A = torch.tensor([[s, 0, -s * (cx - ext / 2)], [0, s, -s * (cy - ext / 2)], [0, 0, 1]], device=device)
    pix = project(verts[None], torch.eye(4, device=device)[None], (A @ Kt)[None])
    frags = rasterize(pix, faces, S, S)
    depth = torch.where(frags.mask[0], frags.depth[0], torch.full_like(frags.depth[0], float("inf")))
    return depth[None, None], A


def _sample_depth(src_depth: torch.Tensor, A: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Nearest source-depth lookup at source pixels (u, v) (any shape); +inf outside the map."""
    S = src_depth.shape[-1]
    mx = (A[0, 0] * u + A[0, 2]).floor().long()
    my = (A[1, 1] * v + A[1, 2]).floor().long()
    inside = (mx >= 0) & (mx < S) & (my >= 0) & (my < S)
    d = src_depth[0, 0][my.clamp(0, S - 1), mx.clamp(0, S - 1)]
    return torch.where(inside, d, torch.full_like(d, float("inf")))


def _occluded(z_src: torch.Tensor, depth_at: torch.Tensor) -> torch.Tensor:
    """Something nearer covers this point in the source (tolerance 1.5 % of depth + 2 mm)."""
    return z_src > depth_at * 1.015 + 2e-3


def _vertex_visible(tex_h, src_depth, A) -> torch.Tensor:
    w = tex_h[:, 2].clamp(min=1e-6)
    return ~_occluded(w, _sample_depth(src_depth, A, tex_h[:, 0] / w, tex_h[:, 1] / w))


def _grazing(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Per vertex [N] in [0, 1]: 0 where the surface is seen edge-on from the source
    camera (texture stretched), 1 where it faces it (|cos| >= 0.25)."""
    normals = _vertex_normals(verts, faces)
    view = verts / verts.norm(dim=-1, keepdim=True)
    facing = (normals * view).sum(-1).abs()
    return ((facing - 0.08) / 0.17).clamp(0, 1)


def _fill_shell(fill, visible, topo: _Topology, device) -> None:
    """Hidden shell vertices take the texture of the last visible vertex of their
    sweep from the face outline (hair colour continues round the back of the head)."""
    ring_ids = torch.as_tensor(topo.ring_ids, device=device)  # [K + 1, J]
    k_idx = torch.arange(ring_ids.shape[0], device=device)[:, None].expand_as(ring_ids)
    last = torch.where(visible[ring_ids], k_idx, torch.zeros_like(k_idx)).cummax(0).values
    src = torch.gather(ring_ids, 0, last).reshape(-1)
    dst = ring_ids.reshape(-1)
    fill[dst] = fill[src] / fill[src, 2:3] * fill[dst, 2:3]
    fill[topo.pole] = fill[ring_ids[-1]].mean(0)


def _fill_card(fill, opacity, visible, card: slice, G: int, device) -> None:
    """Card vertices hidden by the head in the source would show a ghost of the face
    when the head turns; give each the texture of the nearest visible card vertex of
    its row, searching away from the head (hair or background continues behind the
    head). Rows with none become transparent there."""
    ids = torch.arange(card.start, card.stop, device=device).reshape(G, G)  # [row, col]
    vis = visible[ids]
    col = torch.arange(G, device=device)[None, :].expand(G, G)
    left = torch.where(vis, col, torch.full_like(col, -1)).cummax(1).values  # nearest at col' <= col
    right_flip = torch.where(vis.flip(1), col, torch.full_like(col, -1)).cummax(1).values
    right = torch.where(right_flip >= 0, G - 1 - right_flip, right_flip).flip(1)  # nearest at col' >= col
    centre_col = G // 2  # the crop is centred on the head
    src = torch.where(col < centre_col, left, right)
    src = torch.where(src < 0, torch.where(col < centre_col, right, left), src)
    has = src >= 0
    src_ids = torch.gather(ids, 1, src.clamp(min=0))
    move = ~vis & has
    s_ids, d_ids = src_ids[move], ids[move]
    fill[d_ids] = fill[s_ids] / fill[s_ids, 2:3] * fill[d_ids, 2:3]
    opacity[ids[~vis & ~has]] = 0.0


def render_views(avatar: Avatar, poses: Sequence[OrbitPose], size: int) -> RenderOutput:
    """Render the avatar at V orbit cameras, S x S pixels each (one batched raster call).

    Per pixel, a shadow-map test against the source-view depth decides whether the
    source saw this surface point: seen points take their projective texture, hidden
    ones the fill texture (and count as unseen in ``seen``).
    """
    viewmats, Ks = avatar.cameras(poses, size)
    return render_cameras(avatar, viewmats, Ks, size)


def render_cameras(
    avatar: Avatar,
    viewmats: torch.Tensor,  # [V, 4, 4] world (= source camera frame) -> camera
    Ks: torch.Tensor,  # [V, 3, 3] intrinsics for S x S pictures
    size: int,
) -> RenderOutput:
    """Render the avatar at arbitrary cameras (calibrated rigs, synthetic pairs)."""
    if not 16 <= size <= 4096:
        raise ValueError(f"expected size in [16, 4096], got {size}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4) or Ks.shape != (viewmats.shape[0], 3, 3):
        raise ValueError(f"expected viewmats [V, 4, 4] and Ks [V, 3, 3], got {tuple(viewmats.shape)}, {tuple(Ks.shape)}")
    viewmats = viewmats.to(avatar.device, torch.float32)
    Ks = Ks.to(avatar.device, torch.float32)
    V = viewmats.shape[0]
    pix = project(avatar.verts[None].expand(V, -1, -1), viewmats, Ks)  # [V, N, 3]
    frags = rasterize(pix, avatar.faces, size, size)
    vals = interpolate(avatar.vattr, avatar.faces, frags)  # [V, S, S, 10]
    covered = frags.mask
    w = vals[..., 2].clamp(min=1e-6)
    u, v = vals[..., 0] / w, vals[..., 1] / w
    hidden = _occluded(w, _sample_depth(avatar.src_depth, avatar.src_depth_K, u, v))
    fw = vals[..., 5].clamp(min=1e-6)
    u = torch.where(hidden, vals[..., 3] / fw, u)
    v = torch.where(hidden, vals[..., 4] / fw, v)
    Ht, Wt = avatar.tex_span
    grid = torch.stack([2 * u / Wt - 1, 2 * v / Ht - 1], -1)  # [V, S, S, 2]
    tex = F.grid_sample(
        avatar.texture.expand(V, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [V, 4, S, S]
    grazing, opacity, solid, head = vals[..., 6], vals[..., 7], vals[..., 8], vals[..., 9]
    in_pic = (grid.abs() <= 1).all(-1)
    # Hidden head surface is solid; seen surface takes the person mask as alpha.
    solid = torch.maximum(solid, hidden.float() * head)
    alpha = (torch.maximum(tex[:, 3], solid) * opacity * covered * in_pic)[:, None].clamp(0, 1)
    bg = torch.tensor(avatar.config.bg_color, device=avatar.device, dtype=torch.float32)[None, :, None, None]
    rgb = tex[:, :3] * alpha + bg * (1 - alpha)
    seen = ((~hidden & covered & in_pic).float() * grazing).clamp(0, 1)
    return RenderOutput(rgb=rgb.clamp(0, 1), alpha=alpha, depth=frags.depth[:, None], seen=seen[:, None])
