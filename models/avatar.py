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
_CRANIUM_CENTRE = (0.0, -0.02, 0.025)
_CRANIUM_RADII = (0.088, 0.115, 0.120)
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


@dataclass(frozen=True)
class _Host:
    crop_K: torch.Tensor  # [3, 3] CPU
    pivot: torch.Tensor  # [3] CPU


@dataclass
class Avatar:
    """A textured head mesh in the source camera frame (tensors on one device)."""

    verts: torch.Tensor  # [N, 3] metres, source camera frame
    faces: torch.Tensor  # [F, 3] int64
    cull: torch.Tensor  # [F] bool: closed head surface, culled when facing away
    skip: torch.Tensor  # [F] bool: card triangles with nothing opaque on them (not drawn)
    vattr: torch.Tensor  # [N, 11] per vertex: texture K X (3), fill texture (3), grazing, opacity, solid, head, rim
    texture: torch.Tensor  # [1, 4, Ht, Wt] RGBA in [0, 1] (A = person mask, or 1)
    texture_fill: torch.Tensor  # [1, 4, h, w] low-pass copy (same layout) for unseen surface
    tex_span: tuple[float, float]  # (H, W) of the source picture space that vattr's texture coords address
    src_depth: torch.Tensor  # [1, 2, Sv, Sv] source-view depth of the head (sharp, max-pooled), +inf where empty
    src_depth_K: torch.Tensor  # [3, 3] maps source pixels (u, v, 1) to src_depth pixels
    pivot: torch.Tensor  # [3] head centre: orbit cameras turn about it
    crop_K: torch.Tensor  # [3, 3] intrinsics of the crop camera for a crop of side 1
    source_image: torch.Tensor  # [3, H, W] texture frame picture in [0, 1]
    source_alpha: torch.Tensor  # [1, h, w] its person mask (any resolution), 1 where none
    source_focal_px: float  # focal length of the source camera, source pixels
    config: AvatarConfig
    host: "_Host | None" = None  # CPU copies of the camera constants (no device round trips)

    @property
    def device(self) -> torch.device:
        return self.verts.device

    def intrinsics(self, size: int, fov_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Crop-camera intrinsics for an S x S picture (CPU): [3, 3], or [V, 3, 3] with fov_scale [V]."""
        base = self.host.crop_K if self.host is not None else self.crop_K.cpu()
        K = base.clone()
        K[:2] *= size
        if fov_scale is None:
            return K
        Ks = K[None].repeat(fov_scale.shape[0], 1, 1)
        Ks[:, 0, 0] = K[0, 0] / fov_scale
        Ks[:, 1, 1] = K[1, 1] / fov_scale
        return Ks

    def cameras(self, poses: Sequence[OrbitPose], size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(viewmats [V, 4, 4], Ks [V, 3, 3]) of orbit views about the pivot, on the avatar's device.
        Computed on the CPU (a handful of numbers) and uploaded in one go."""
        if len(poses) == 0:
            raise ValueError("expected at least one pose, got none")
        t = lambda vals: torch.tensor(vals, dtype=torch.float32)  # noqa: E731
        pivot = self.host.pivot if self.host is not None else self.pivot.cpu()
        viewmats = orbit_viewmats(
            pivot,
            t([p.yaw_deg for p in poses]),
            t([p.pitch_deg for p in poses]),
            t([p.roll_deg for p in poses]),
            t([p.dist_scale for p in poses]),
        )
        K = self.intrinsics(1)
        base_fov = 2.0 * math.atan(0.5 / float(K[1, 1]))
        scale = [
            1.0 if p.fov_deg is None else math.tan(math.radians(p.fov_deg) / 2) / math.tan(base_fov / 2)
            for p in poses
        ]
        Ks = self.intrinsics(size, t(scale))
        both = torch.cat([viewmats.reshape(-1), Ks.reshape(-1)]).to(self.device)
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


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True)
class _Topology:
    faces: np.ndarray  # [F, 3]; head triangles (the first n_head_faces) wound outward
    n_head_faces: int  # face-mesh and shell triangles: a closed surface, so back faces can be culled
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
    faces = np.concatenate(faces).astype(np.int64)
    n_head_faces = len(model.triangles) + 2 * rings * J + J
    faces[:n_head_faces] = _orient_outward(faces[:n_head_faces], n_face, ring_ids, pole, rings)
    topo = _Topology(
        faces=faces,
        n_head_faces=n_head_faces,
        n_face=n_face,
        n_shell=n_shell,
        n_card=n_card,
        n_far=n_far,
        ring_ids=ring_ids,
        pole=pole,
    )
    _TOPOLOGY_CACHE[key] = topo
    return topo


def _orient_outward(faces: np.ndarray, n_face: int, ring_ids: np.ndarray, pole: int, rings: int) -> np.ndarray:
    """Wind every head triangle so that its normal (b - a) x (c - a) points away from
    the cranium centre, judged on the canonical head (the winding is topological)."""
    model = face_model()
    face_head = torch.from_numpy(model.vertices)
    rings_only = _Topology(np.zeros((0, 3), np.int64), 0, n_face, rings * len(ring_ids[0]) + 1, 0, 0, ring_ids, pole)
    verts = torch.cat([face_head, _sweep_shell(face_head, rings_only, rings, 1.0)]).numpy().astype(np.float64)
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    outward = tri.mean(1) - np.array(_CRANIUM_CENTRE)
    flip = (normal * outward).sum(1) < 0
    out = faces.copy()
    out[flip] = out[flip][:, [0, 2, 1]]
    return out


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
    face_head = (face - t) @ R  # R^T (X - t): [468, 3]
    c = torch.tensor(_CRANIUM_CENTRE, dtype=dt, device=device)
    shell = _sweep_shell(face_head, topo, config.shell_rings, config.cranium_scale)
    shell_cam = shell @ R.T + t  # [n_shell, 3]
    if obs.mask is not None:
        # The rim (first three rings) keeps its shape: it is solid and filled where the
        # source shows no person (see render_cameras); the rest fits the silhouette.
        J = topo.ring_ids.shape[1]
        shell_cam = torch.cat([shell_cam[: 3 * J], _fit_shell_to_silhouette(shell_cam[3 * J :], R @ c + t, obs, device)])
    # Card: a curved sheet over the crop window, depth set by the head centre and the chin.
    pivot = torch.as_tensor(_pivot_cam(obs), dtype=dt, device=device)
    card = _card_vertices(obs, config, crop, pivot, device)
    parts = [face, shell_cam, card]
    if topo.n_far:
        parts.append(_far_vertices(obs, config, crop, pivot, device))
    return torch.cat(parts)


def _sweep_shell(face_head: torch.Tensor, topo: "_Topology", rings: int, cranium_scale: float) -> torch.Tensor:
    """Shell vertices [rings * J + 1, 3] in the head frame: each face-outline vertex is
    swept along a great circle about the cranium centre to the back of the head, its
    radius blending from the outline's to the cranium ellipsoid's within ~2.5 rings."""
    dt, device = face_head.dtype, face_head.device
    c = torch.tensor(_CRANIUM_CENTRE, dtype=dt, device=device)
    radii = torch.tensor(_CRANIUM_RADII, dtype=dt, device=device) * cranium_scale
    oval = face_head[torch.as_tensor(topo.ring_ids[0], device=device)]  # [J, 3]
    d0 = oval - c
    r0 = d0.norm(dim=-1, keepdim=True)
    d0 = d0 / r0
    back = torch.tensor([0.0, 0.0, 1.0], dtype=dt, device=device)
    omega = torch.acos((d0 @ back).clamp(-0.999, 0.999))[:, None]  # [J, 1]
    K = rings
    s = torch.arange(1, K + 1, dtype=dt, device=device)[None, :] / (K + 1)  # [1, K]
    # Spherical interpolation from the outline direction to the back direction.
    wa = torch.sin((1 - s) * omega) / torch.sin(omega)
    wb = torch.sin(s * omega) / torch.sin(omega)
    u = wa[..., None] * d0[:, None, :] + wb[..., None] * back  # [J, K, 3]
    u = u / u.norm(dim=-1, keepdim=True)
    r_ell = 1.0 / ((u / radii).pow(2).sum(-1)).sqrt()  # [J, K]
    blend = (s * (K + 1) / 2.5).clamp(max=1.0)
    blend = blend * blend * (3 - 2 * blend)
    r = r0 * (1 - blend) + r_ell * blend
    shell = (c + u * r[..., None]).transpose(0, 1).reshape(-1, 3)  # ring-major, matching _topology
    pole = c + back * (1.0 / (back / radii).pow(2).sum().sqrt())
    return torch.cat([shell, pole[None]])


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
    knots_y = torch.tensor([0.02, -0.015, -0.03, -0.05], device=device)
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


@dataclass(frozen=True)
class _Statics:
    """Per-topology constants, built once per device."""

    faces: torch.Tensor  # [F, 3] on the device
    faces_cpu: torch.Tensor  # [F, 3]
    cull: torch.Tensor  # [F] bool on the device
    not_head: torch.Tensor  # [F] bool on the device (source depth draws the head only)
    card_faces: torch.Tensor  # [F] bool, CPU
    flags: torch.Tensor  # [N, 3] CPU: solid, head, rim


_STATICS: dict[tuple, _Statics] = {}


def _statics(topo: _Topology, key: tuple, device: torch.device) -> _Statics:
    k = key + (str(device),)
    if k in _STATICS:
        return _STATICS[k]
    faces = torch.as_tensor(topo.faces)
    cull = torch.zeros(len(faces), dtype=torch.bool)
    cull[: topo.n_head_faces] = True
    # The first shell rings may fold under the face outline (the cranium is narrower than
    # the cheeks): draw them from both sides so a turned head shows no seam.
    n_tri = len(face_model().triangles)
    J = topo.ring_ids.shape[1]
    cull[n_tri : n_tri + 2 * 2 * J] = False
    not_head = torch.ones(len(faces), dtype=torch.bool)
    not_head[: topo.n_head_faces] = False
    card = (topo.n_face + topo.n_shell, topo.n_face + topo.n_shell + topo.n_card)
    card_faces = ((faces >= card[0]) & (faces < card[1])).all(-1)
    N = topo.n_face + topo.n_shell + topo.n_card + topo.n_far
    flags = torch.zeros(N, 3)
    flags[: topo.n_face, 0] = 1.0  # solid: the face mesh always covers
    flags[: topo.n_face + topo.n_shell, 1] = 1.0  # head
    # The rim (shell rings 1-3: sides of the head, ears) is solid: where its source pixel is
    # not the person (the cranium is only a guess there), it takes the fill texture.
    flags[torch.as_tensor(topo.ring_ids[1:4]).reshape(-1), 2] = 1.0
    st = _Statics(faces.to(device), faces, cull.to(device), not_head.to(device), card_faces, flags)
    _STATICS[k] = st
    return st


def _far_picture(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The background with the person painted out (uint8 [H, W, 3]), for the far layer."""
    if mask is None:
        return image
    small = cv2.resize(image, (max(16, image.shape[1] // 4), max(16, image.shape[0] // 4)), interpolation=cv2.INTER_AREA)
    hole = cv2.resize((mask > 0.3).astype(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    hole = cv2.dilate(hole, np.ones((5, 5), np.uint8))
    filled = cv2.inpaint(small, hole, 5, cv2.INPAINT_TELEA)
    return cv2.resize(filled, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)


def _texture(image_t: torch.Tensor, alpha_t: torch.Tensor, crop, max_side: int) -> torch.Tensor:
    """RGBA texture [1, 4, h, w] in [0, 1] on the device, downsampled (antialiased) so the
    crop spans at most ``max_side`` texels. image_t [3, H, W], alpha_t [1, H, W] floats."""
    rgba = torch.cat([image_t, alpha_t])[None]
    scale = min(1.0, max_side / max(crop[2], 1.0))
    if scale < 0.8:
        H, W = rgba.shape[-2:]
        size = (max(16, round(H * scale)), max(16, round(W * scale)))
        rgba = F.interpolate(rgba, size=size, mode="bilinear", antialias=True, align_corners=False)
    return rgba


def _fill_texture(texture: torch.Tensor, crop_texels: float, texels: int) -> torch.Tensor:
    """Low-pass copy of an RGBA texture in which the crop spans about ``texels`` texels (antialiased
    downsampling; sampled with normalised coordinates, so the layout is unchanged). Colour is
    averaged with alpha weights, so hair next to the background keeps its own colour."""
    factor = crop_texels / texels if texels else 1.0
    if factor <= 1.0:
        return texture
    h, w = texture.shape[-2:]
    size = (max(2, round(h / factor)), max(2, round(w / factor)))
    rgb, alpha = texture[:, :3], texture[:, 3:]
    small = F.interpolate(torch.cat([rgb * alpha, alpha, rgb], 1), size=size, mode="bilinear", antialias=True,
                          align_corners=False)
    a = small[:, 3:4]
    colour = torch.where(a > 0.02, small[:, :3] / a.clamp(min=0.02), small[:, 4:])
    return torch.cat([colour.clamp(0, 1), a], 1)


def _transparent_card_faces(mask: np.ndarray | None, tex_h, fill, opacity, st: _Statics, crop) -> torch.Tensor:
    """[F] bool (CPU): card triangles whose three corners see no person within a few card
    cells (person mask dilated) in either texture. Drawing them would only cost time:
    with the background removed they are fully transparent."""
    F_ = len(st.faces_cpu)
    if mask is None:
        return torch.zeros(F_, dtype=torch.bool)
    H, W = mask.shape
    s = 96.0 / max(H, W)
    small = cv2.resize(mask, (max(8, round(W * s)), max(8, round(H * s))), interpolation=cv2.INTER_AREA)
    k = max(3, int(crop[2] * AvatarConfig.card_extent / 8.0 * s) | 1)
    reach = cv2.dilate(small, np.ones((k, k), np.uint8))
    hs, ws = reach.shape

    def sample(h: torch.Tensor) -> np.ndarray:
        w = h[:, 2].clamp(min=1e-6)
        u, v = h[:, 0] / w, h[:, 1] / w
        x = (u * s).long().clamp(0, ws - 1).numpy()
        y = (v * s).long().clamp(0, hs - 1).numpy()
        inside = ((u >= 0) & (u < W) & (v >= 0) & (v < H)).numpy()
        return reach[y, x] * inside

    vertex = torch.from_numpy(np.maximum(sample(tex_h), sample(fill)).astype(np.float32)) * opacity  # [N]
    empty = (vertex[st.faces_cpu] < 0.02).all(-1)
    return empty & st.card_faces


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
    cpu = torch.device("cpu")
    key = (config.shell_rings, config.card_grid, config.background == "far")
    topo = _topology(*key)
    st = _statics(topo, key, device)
    crop = crop or crop_box(obs, config)
    H, W = obs.image_size
    f = obs.focal_px

    # Geometry is small (a few thousand vertices): it is made on the CPU and uploaded once;
    # the device does the rasterizing and texturing.
    tex_verts = _geometry(obs, topo, config, crop, cpu)  # [N, 3] texture frame
    N = tex_verts.shape[0]
    Kt = torch.tensor([[f, 0, W / 2.0], [0, f, H / 2.0], [0, 0, 1]])
    tex_h = tex_verts @ Kt.T  # [N, 3]: (u w, v w, w) with w the source depth
    tex_verts_dev = tex_verts.to(device, non_blocking=True)

    # What the source camera saw: a depth map of the head, and per vertex.
    vis_extent = min(config.card_extent, 1.35)
    vis_size = min(1024, max(config.visibility_size, round(render_size * vis_extent)))
    src_depth, src_depth_K = _source_depth(
        tex_verts_dev, st.faces, st.cull, st.not_head, Kt.to(device), crop, vis_extent, vis_size, device
    )
    card = slice(topo.n_face + topo.n_shell, topo.n_face + topo.n_shell + topo.n_card)
    visible = _vertex_visible(tex_h.to(device), src_depth, src_depth_K, card).cpu()  # [N] bool
    grazing = _grazing(tex_verts, st.faces_cpu)  # [N] in [0, 1]

    # Fill texture for what the source did not see (used per pixel where hidden).
    fill = tex_h.clone()
    opacity = torch.ones(N)
    _fill_shell(fill, visible, topo, cpu)
    _fill_card(fill, opacity, visible, card, config.card_grid, cpu)
    if topo.n_far:
        # Atlas [picture | far layer]: far-layer vertices address the right half.
        far_ids = slice(N - topo.n_far, N)
        for t in (tex_h, fill):
            t[far_ids, 0] += W * t[far_ids, 2]
    mask = obs.mask if (obs.mask is not None and config.background == "remove") else None
    skip = _transparent_card_faces(mask, tex_h, fill, opacity, st, crop)
    vattr = torch.cat([tex_h, fill, grazing[:, None], opacity[:, None], st.flags], -1)  # [N, 11]
    verts = tex_verts_dev if geometry is None else _geometry(geometry, topo, config, crop, cpu).to(device)

    # Texture on the device: the picture, its person mask as alpha (or 1), and the far layer.
    image_t = torch.from_numpy(image).to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0)
    if mask is not None:
        alpha_t = torch.from_numpy(np.ascontiguousarray(mask, np.float32)).to(device, non_blocking=True)[None]
    else:
        alpha_t = torch.ones((1, H, W), device=device)
    max_side = int(config.texture_scale * render_size)
    texture = _texture(image_t, alpha_t, crop, max_side)
    span_w = float(W)
    if topo.n_far:
        far = torch.from_numpy(_far_picture(image, obs.mask)).to(device).permute(2, 0, 1).float().div_(255.0)
        texture = torch.cat([texture, _texture(far, torch.ones_like(alpha_t), crop, max_side)], -1)
        span_w = 2.0 * W
    texture_fill = _fill_texture(texture, crop[2] * texture.shape[-1] / span_w, config.fill_texels)
    cx, cy, side = crop
    crop_K = torch.tensor(
        [[f / side, 0, (W / 2.0 - cx) / side + 0.5], [0, f / side, (H / 2.0 - cy) / side + 0.5], [0, 0, 1]]
    )
    pivot = torch.as_tensor(_pivot_cam(geometry or obs), dtype=torch.float32)
    return Avatar(
        verts=verts,
        faces=st.faces,
        cull=st.cull,
        skip=skip.to(device),
        vattr=vattr.to(device),
        texture=texture,
        texture_fill=texture_fill,
        tex_span=(float(H), span_w),
        src_depth=src_depth,
        src_depth_K=src_depth_K,
        pivot=pivot.to(device),
        crop_K=crop_K.to(device),
        source_image=image_t,
        source_alpha=alpha_t,
        source_focal_px=f,
        config=config,
        host=_Host(crop_K=crop_K, pivot=pivot),
    )


def _source_depth(verts, faces, cull, not_head, Kt, crop, extent: float, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth map [1, 2, S, S] of the texture-frame head seen from the source camera,
    framing the head (``extent`` crop sides), +inf where empty; and A [3, 3] taking
    source pixels (u, v, 1) to map pixels. As sharp as the renders."""
    cx, cy, side = crop
    ext = side * extent
    s = S / ext
    A = torch.tensor([[s, 0, -s * (cx - ext / 2)], [0, s, -s * (cy - ext / 2)], [0, 0, 1]], device=device)
    pix = project(verts[None], torch.eye(4, device=device)[None], (A @ Kt)[None])
    # Only the head can hide anything: the card and far layer lie behind it.
    frags = rasterize(pix, faces, S, S, cull=cull, skip=not_head)
    depth = torch.where(frags.mask[0], frags.depth[0], torch.full_like(frags.depth[0], float("inf")))
    # Channel 1, max-pooled 3x3, is for the card: a card point just beside the head's
    # silhouette counts as seen (its own source pixel is right there), which keeps fill
    # texture out of what the source camera itself shows. The head keeps the sharp map
    # (channel 0): its rim folds under the face outline and must stay hidden there.
    depth = depth[None, None]
    return torch.cat([depth, F.max_pool2d(depth, 3, stride=1, padding=1)], 1), A


def _sample_depth(
    src_depth: torch.Tensor, A: torch.Tensor, u: torch.Tensor, v: torch.Tensor, pooled: torch.Tensor | None = None
) -> torch.Tensor:
    """Nearest source-depth lookup at source pixels (u, v) (any shape); +inf outside the map.
    pooled: bool like u, True where the max-pooled map applies (card points)."""
    S = src_depth.shape[-1]
    mx = (A[0, 0] * u + A[0, 2]).floor().long().clamp(-1, S)
    my = (A[1, 1] * v + A[1, 2]).floor().long().clamp(-1, S)
    inside = (mx >= 0) & (mx < S) & (my >= 0) & (my < S)
    flat = my.clamp(0, S - 1) * S + mx.clamp(0, S - 1)
    if pooled is not None:
        flat = flat + pooled.long() * (S * S)
    d = src_depth.reshape(-1)[flat]
    return torch.where(inside, d, torch.full_like(d, float("inf")))


def _occluded(z_src: torch.Tensor, depth_at: torch.Tensor) -> torch.Tensor:
    """Something nearer covers this point in the source (tolerance 1.5 % of depth + 2 mm)."""
    return z_src > depth_at * 1.015 + 2e-3


def _vertex_visible(tex_h, src_depth, A, card: slice) -> torch.Tensor:
    w = tex_h[:, 2].clamp(min=1e-6)
    pooled = torch.zeros(len(tex_h), dtype=torch.bool, device=tex_h.device)
    pooled[card] = True
    return ~_occluded(w, _sample_depth(src_depth, A, tex_h[:, 0] / w, tex_h[:, 1] / w, pooled))


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
    frags = rasterize(pix, avatar.faces, size, size, cull=avatar.cull, skip=avatar.skip)
    vals = interpolate(avatar.vattr, avatar.faces, frags)  # [V, S, S, 10]
    covered = frags.mask
    w = vals[..., 2].clamp(min=1e-6)
    u, v = vals[..., 0] / w, vals[..., 1] / w
    head = vals[..., 9]
    hidden = _occluded(w, _sample_depth(avatar.src_depth, avatar.src_depth_K, u, v, pooled=head < 0.5))
    fw = vals[..., 5].clamp(min=1e-6)
    Ht, Wt = avatar.tex_span
    grid = torch.stack([2 * u / Wt - 1, 2 * v / Ht - 1], -1)  # [V, S, S, 2] projective texture
    grid_fill = torch.stack([2 * vals[..., 3] / fw / Wt - 1, 2 * vals[..., 4] / fw / Ht - 1], -1)
    texture = avatar.texture.expand(V, -1, -1, -1)
    tex_p = F.grid_sample(texture, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    tex_f = F.grid_sample(avatar.texture_fill.expand(V, -1, -1, -1), grid_fill, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    grazing, opacity, solid, rim = vals[..., 6], vals[..., 7], vals[..., 8], vals[..., 10]
    use_fill = hidden | ((rim > 0.5) & (tex_p[:, 3] < 0.5))
    tex = torch.where(use_fill[:, None], tex_f, tex_p)  # [V, 4, S, S]
    in_pic = (torch.where(use_fill[..., None], grid_fill, grid).abs() <= 1).all(-1)
    # Hidden head surface and a filled rim are solid; seen surface takes the person mask as alpha.
    solid = torch.maximum(solid, (use_fill & (head > 0.5)).float())
    alpha = (torch.maximum(tex[:, 3], solid) * opacity * covered * in_pic)[:, None].clamp(0, 1)
    bg = torch.tensor(avatar.config.bg_color, device=avatar.device, dtype=torch.float32)[None, :, None, None]
    rgb = tex[:, :3] * alpha + bg * (1 - alpha)
    seen = ((~hidden & covered & in_pic).float() * grazing).clamp(0, 1)
    # Where nothing opaque is drawn the picture shows the flat background: nothing was invented.
    seen = torch.where(alpha[:, 0] < 0.02, torch.ones_like(seen), seen)
    return RenderOutput(rgb=rgb.clamp(0, 1), alpha=alpha, depth=frags.depth[:, None], seen=seen[:, None])
