"""One-shot 3D head avatar from a single frame (the GP-Avatar stage of the method).

From one picture and its face analysis we build, in one feed-forward pass, a
textured mesh of fixed topology, made of four parts (all in the source camera
frame, metres; see models.geometry.camera for the convention):

1. **face**: MediaPipe's 468-vertex face mesh, lifted to metric 3D
   (models.face.analysis.metric_landmarks);
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

from models.geometry.raster import interpolate, rasterize
from models.geometry.camera import OrbitPose, orbit_viewmats, project
from models.face.analysis import NUM_MESH_VERTICES, FaceObservation, face_model

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
    needed: torch.Tensor | None = None  # 0-d: raster candidates this render needed


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
    needed: torch.Tensor | None = None  # 0-d: candidates the source-depth raster needed

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
        both = torch.cat([viewmats.reshape(-1), Ks.reshape(-1)])
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
    face_head = torch.from_numpy(model.vertices).double()
    const = {"centre": torch.tensor(_CRANIUM_CENTRE).double(), "radii": torch.tensor(_CRANIUM_RADII).double(),
             "back": torch.tensor([0.0, 0.0, 1.0]).double()}
    shell = _sweep_shell(face_head, torch.as_tensor(ring_ids[0]), rings, 1.0, const)
    verts = torch.cat([face_head, shell]).numpy().astype(np.float64)
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


# One observation on the device is a flat float32 vector: face points [468, 3], head
# rotation [3, 3] and translation [3], pivot [3], face height and chin row (pixels).
_OBS_POINTS = NUM_MESH_VERTICES * 3
_OBS_LEN = _OBS_POINTS + 9 + 3 + 3 + 2
# One frame's camera constants: crop (cx, cy, side), source-depth map A [3, 3],
# crop intrinsics [3, 3] (crop of side 1), source intrinsics Kt [3, 3], the card's
# reach radius (cells).
_FRAME_LEN = 3 + 9 + 9 + 9 + 1


@dataclass(frozen=True)
class _ObsT:
    """Views into one observation vector (tensors on the device)."""

    points: torch.Tensor  # [468, 3] camera frame
    R: torch.Tensor  # [3, 3] head -> camera rotation
    t: torch.Tensor  # [3]
    pivot: torch.Tensor  # [3]
    face_h: torch.Tensor  # 0-d, pixels
    chin_v: torch.Tensor  # 0-d, pixels

    @staticmethod
    def of(vec: torch.Tensor) -> "_ObsT":
        o = _OBS_POINTS
        return _ObsT(vec[:o].view(NUM_MESH_VERTICES, 3), vec[o : o + 9].view(3, 3), vec[o + 9 : o + 12],
                     vec[o + 12 : o + 15], vec[o + 15], vec[o + 16])


def _obs_vector(obs: FaceObservation) -> np.ndarray:
    lm = obs.landmarks_px
    face_h = float(np.hypot(*(lm[_CHIN, :2] - lm[_FOREHEAD, :2])))
    parts = [obs.points_cam[:NUM_MESH_VERTICES].reshape(-1), obs.pose.rotation.reshape(-1),
             obs.pose.translation.reshape(-1), _pivot_cam(obs), [face_h, float(lm[_CHIN, 1])]]
    return np.concatenate([np.asarray(p, np.float64) for p in parts]).astype(np.float32)


def _map_factor(image_size: tuple[int, int], side: int) -> int:
    """Integer reduction that brings a picture to at most ``side`` pixels on a side."""
    return max(1, -(-max(image_size) // side))


def _pool(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Area reduction of a mask [H, W] by an integer factor (partial edge cells averaged)."""
    if factor == 1:
        return mask
    return F.avg_pool2d(mask[None, None], factor, ceil_mode=True)[0, 0]


def _outline_map(obs: FaceObservation) -> np.ndarray | None:
    """The face outline filled, float32 at the size of the shell's support map (at most
    160 px on a side); None without a person mask (the shell is then not fitted)."""
    if obs.mask is None:
        return None
    H, W = obs.image_size
    f = _map_factor((H, W), 160)
    hs, ws = -(-H // f), -(-W // f)
    outline = np.zeros((hs, ws), np.float32)
    oval = obs.landmarks_px[face_model().face_oval, :2] * np.array([ws / W, hs / H])
    cv2.fillPoly(outline, [np.round(oval * 4).astype(np.int32)], 1.0, shift=2)
    return outline


def _support(mask: torch.Tensor, outline: torch.Tensor) -> torch.Tensor:
    """Where the shell may project in the source: the person mask (area-reduced to the
    outline's size) or the face outline."""
    return torch.maximum(_pool(mask, _map_factor(mask.shape, 160)), outline)


def _geometry(o: _ObsT, support: torch.Tensor | None, crop: torch.Tensor, plan: "_Plan", st: "_Statics") -> torch.Tensor:
    """Vertex positions [N, 3] in the camera frame for one observation (device maths only).
    support: :func:`_support` of the observation; None: the shell keeps the cranium's shape."""
    config = plan.config
    face_head = (o.points - o.t) @ o.R  # R^T (X - t): [468, 3]
    shell = _sweep_shell(face_head, st.ring0, config.shell_rings, config.cranium_scale, st.const)
    shell_cam = shell @ o.R.T + o.t  # [n_shell, 3]
    if support is not None:
        # The rim (first three rings) keeps its shape: it is solid and filled where the
        # source shows no person (see render_cameras); the rest fits the silhouette.
        J = st.ring0.shape[0]
        centre = o.R @ st.const["centre"] + o.t
        fitted = _fit_shell_to_silhouette(shell_cam[3 * J :], centre, support, plan)
        shell_cam = torch.cat([shell_cam[: 3 * J], fitted])
    # Card: a curved sheet over the crop window, depth set by the head centre and the chin.
    parts = [o.points, shell_cam, _card_vertices(o, crop, plan, st)]
    if config.background == "far":
        parts.append(_far_vertices(o, crop, plan))
    return torch.cat(parts)


def _sweep_shell(face_head: torch.Tensor, ring0: torch.Tensor, rings: int, cranium_scale: float,
                 const: dict[str, torch.Tensor]) -> torch.Tensor:
    """Shell vertices [rings * J + 1, 3] in the head frame: each face-outline vertex is
    swept along a great circle about the cranium centre to the back of the head, its
    radius blending from the outline's to the cranium ellipsoid's within ~2.5 rings."""
    dt, device = face_head.dtype, face_head.device
    c, back = const["centre"], const["back"]
    radii = const["radii"] * cranium_scale
    d0 = face_head.index_select(0, ring0) - c  # [J, 3]
    r0 = d0.norm(dim=-1, keepdim=True)
    d0 = d0 / r0
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


def _fit_shell_to_silhouette(shell: torch.Tensor, centre: torch.Tensor, support: torch.Tensor, plan: "_Plan") -> torch.Tensor:
    """Shrink shell vertices towards the cranium centre until they project inside the
    person (or the face outline) in the source picture: the cranium never pokes out
    of the real silhouette, so short hair and narrow heads stay their own shape.

    shell [M, 3], centre [3] (camera frame), support [h, w] (:func:`_support`);
    binary search of a per-vertex scale in [0.55, 1].
    """
    H, W = plan.image_size
    f = plan.focal_px
    sup = support[None, None]

    def inside(points: torch.Tensor) -> torch.Tensor:
        u = f * points[:, 0] / points[:, 2] + W / 2.0
        v = f * points[:, 1] / points[:, 2] + H / 2.0
        grid = torch.stack([2 * u / W - 1, 2 * v / H - 1], -1)[None, None]
        val = F.grid_sample(sup, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return val[0, 0, 0] >= 0.5

    off = shell - centre
    lo = torch.full((shell.shape[0],), 0.55, device=shell.device)
    hi = torch.ones_like(lo)
    ok_full = inside(shell)
    for _ in range(7):
        mid = (lo + hi) / 2
        ok = inside(centre + off * mid[:, None])
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    scale = torch.where(ok_full, torch.ones_like(lo), lo)
    return centre + off * scale[:, None]


def _card_pixels(crop: torch.Tensor, n: int, extent: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Source pixels (u, v) [n * n] of an n x n grid spanning ``extent`` crop sides."""
    g = torch.linspace(-0.5, 0.5, n, device=crop.device) * (crop[2] * extent)
    yy, xx = torch.meshgrid(crop[1] + g, crop[0] + g, indexing="ij")
    return xx.reshape(-1), yy.reshape(-1)


def _card_vertices(o: _ObsT, crop: torch.Tensor, plan: "_Plan", st: "_Statics") -> torch.Tensor:
    """Card vertices [G*G, 3]: depth = head-centre depth + delta(height below chin) + curvature."""
    H, W = plan.image_size
    f = plan.focal_px
    u, v = _card_pixels(crop, plan.config.card_grid, plan.config.card_extent)
    zc = o.pivot[2]
    rel = (v - o.chin_v) / o.face_h  # face heights below the chin
    # Backdrop well behind the head centre above the chin; neck and chest come forward below it.
    delta = _interp(rel, st.const["knots_x"], st.const["knots_y"], _CARD_KNOTS[0])
    lateral = (u - (f * o.pivot[0] / zc + W / 2.0)) / f * zc  # metres from the head centre
    z = zc + delta + 1.2 * lateral.pow(2)
    X = (u - W / 2.0) / f * z
    Y = (v - H / 2.0) / f * z
    return torch.stack([X, Y, z], -1)


# Card depth offset (metres) against height below the chin (face heights).
_CARD_KNOTS = ((-0.3, 0.05, 0.35, 1.2), (0.02, -0.015, -0.03, -0.05))


def _far_vertices(o: _ObsT, crop: torch.Tensor, plan: "_Plan") -> torch.Tensor:
    H, W = plan.image_size
    f = plan.focal_px
    u, v = _card_pixels(crop, 4, plan.config.card_extent * 2.5)
    z = (3.0 * o.pivot[2]).expand_as(u)
    return torch.stack([(u - W / 2.0) / f * z, (v - H / 2.0) / f * z, z], -1)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, xp_host: Sequence[float]) -> torch.Tensor:
    """Piecewise-linear interpolation, clamped at the ends (numpy.interp for tensors);
    xp_host: the knots xp as numbers (no device round trip for the clamp)."""
    x = x.clamp(xp_host[0], xp_host[-1])
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp_host) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def _vertex_normals(verts: torch.Tensor, faces: torch.Tensor, incident: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals [N, 3]; incident [N, D]: each vertex's faces, padded
    with F (a zero row). A gather and a sum, so the same bits on every device."""
    tri = verts[faces]
    n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    n = torch.cat([n, n.new_zeros(1, 3)])
    vn = n[incident].sum(1)
    return vn / vn.norm(dim=-1, keepdim=True).clamp(min=1e-12)


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class _Statics:
    """Per-topology constants, built once per device (outside any CUDA-graph capture)."""

    faces: torch.Tensor  # [F, 3] on the device
    cull: torch.Tensor  # [F] bool on the device
    not_head: torch.Tensor  # [F] bool on the device (source depth draws the head only)
    card_faces: torch.Tensor  # [F] bool on the device
    card_verts: torch.Tensor  # [N] bool on the device
    flags: torch.Tensor  # [N, 3] on the device: solid, head, rim
    ring_ids: torch.Tensor  # [K + 1, J] on the device
    ring0: torch.Tensor  # [J] face outline vertex ids on the device
    incident: torch.Tensor  # [N, D] faces of each vertex, padded with F
    const: dict[str, torch.Tensor]  # cranium centre, radii, back direction, card knots


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
    card_verts = torch.zeros(N, dtype=torch.bool)
    card_verts[card[0] : card[1]] = True
    flags = torch.zeros(N, 3)
    flags[: topo.n_face, 0] = 1.0  # solid: the face mesh always covers
    flags[: topo.n_face + topo.n_shell, 1] = 1.0  # head
    # The rim (shell rings 1-3: sides of the head, ears) is solid: where its source pixel is
    # not the person (the cranium is only a guess there), it takes the fill texture.
    flags[torch.as_tensor(topo.ring_ids[1:4]).reshape(-1), 2] = 1.0
    # Faces of each vertex, padded with the index F.
    per_vertex = [[] for _ in range(N)]
    for fi, tri in enumerate(topo.faces.tolist()):
        for vi in tri:
            per_vertex[vi].append(fi)
    D = max(len(p) for p in per_vertex)
    incident = torch.tensor([p + [len(faces)] * (D - len(p)) for p in per_vertex], dtype=torch.int64)
    const = {
        "centre": torch.tensor(_CRANIUM_CENTRE),
        "radii": torch.tensor(_CRANIUM_RADII),
        "back": torch.tensor([0.0, 0.0, 1.0]),
        "knots_x": torch.tensor(_CARD_KNOTS[0]),
        "knots_y": torch.tensor(_CARD_KNOTS[1]),
    }
    ring_ids = torch.as_tensor(topo.ring_ids)
    st = _Statics(
        faces.to(device), cull.to(device), not_head.to(device), card_faces.to(device), card_verts.to(device),
        flags.to(device), ring_ids.to(device), ring_ids[0].to(device), incident.to(device),
        {name: v.to(device) for name, v in const.items()},
    )
    _STATICS[k] = st
    return st


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small float32 constant on the device, uploaded once (CUDA-graph captures may
    not copy from the host)."""
    key = (tuple(values), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32).to(device)
    return _CONSTANTS[key]


def _far_picture(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The background with the person painted out (uint8 [H, W, 3]), for the far layer."""
    if mask is None:
        return image
    small = cv2.resize(image, (max(16, image.shape[1] // 4), max(16, image.shape[0] // 4)), interpolation=cv2.INTER_AREA)
    hole = cv2.resize((mask > 0.3).astype(np.uint8), small.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    hole = cv2.dilate(hole, np.ones((5, 5), np.uint8))
    filled = cv2.inpaint(small, hole, 5, cv2.INPAINT_TELEA)
    return cv2.resize(filled, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)


def _texture(image_t: torch.Tensor, alpha_t: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """RGBA texture [1, 4, h, w] in [0, 1] on the device: the picture and its alpha,
    downsampled (antialiased) to ``size`` (None: as is). image_t [3, H, W], alpha_t [1, H, W]."""
    rgba = torch.cat([image_t, alpha_t])[None]
    if size is not None:
        rgba = F.interpolate(rgba, size=size, mode="bilinear", antialias=True, align_corners=False)
    return rgba


def _fill_texture(texture: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Low-pass copy of an RGBA texture (antialiased downsampling to ``size``, None: the
    texture itself; sampled with normalised coordinates, so the layout is unchanged).
    Colour is averaged with alpha weights, so hair next to the background keeps its own colour."""
    if size is None:
        return texture
    rgb, alpha = texture[:, :3], texture[:, 3:]
    small = F.interpolate(torch.cat([rgb * alpha, alpha, rgb], 1), size=size, mode="bilinear", antialias=True,
                          align_corners=False)
    a = small[:, 3:4]
    colour = torch.where(a > 0.02, small[:, :3] / a.clamp(min=0.02), small[:, 4:])
    return torch.cat([colour.clamp(0, 1), a], 1)


def _reach_radius(image_size: tuple[int, int], crop_side: float, card_extent: float) -> int:
    """About a card cell, in cells of the reach map (:func:`_transparent_card_faces`)."""
    k = max(3, int(crop_side * card_extent / 8.0 / _map_factor(image_size, 96)) | 1)
    return k // 2


def _transparent_card_faces(mask: torch.Tensor | None, radius: torch.Tensor, tex_h, fill, opacity, st: _Statics,
                            plan: "_Plan") -> torch.Tensor:
    """[F] bool: card triangles whose three corners see no person (mask >= 0.02 on the
    mask area-reduced to at most 96 px) within ``radius`` cells, in either texture.
    Drawing them would only cost time: with the background removed they are fully
    transparent. The window test is a box sum on an integral image: fixed shapes for
    any radius."""
    if mask is None:
        return torch.zeros_like(st.card_faces)
    H, W = plan.image_size
    f = _map_factor((H, W), 96)
    hit = (_pool(mask, f) >= 0.02).float()
    hs, ws = hit.shape
    integral = F.pad(hit.cumsum(0).cumsum(1), (1, 0, 1, 0))  # [hs + 1, ws + 1]
    r = radius.long()

    def sample(h: torch.Tensor) -> torch.Tensor:
        w = h[:, 2].clamp(min=1e-6)
        u, v = h[:, 0] / w, h[:, 1] / w
        x = (u / f).floor().long().clamp(0, ws - 1)
        y = (v / f).floor().long().clamp(0, hs - 1)
        x0, x1 = (x - r).clamp(min=0), (x + r + 1).clamp(max=ws)
        y0, y1 = (y - r).clamp(min=0), (y + r + 1).clamp(max=hs)
        count = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        inside = (u >= 0) & (u < W) & (v >= 0) & (v < H)
        return ((count > 0.5) & inside).float()

    vertex = torch.maximum(sample(tex_h), sample(fill)) * opacity  # [N]
    empty = (vertex[st.faces] < 0.5).all(-1)
    return empty & st.card_faces


@dataclass(frozen=True)
class _Plan:
    """Everything that fixes the shapes and constants of one build (hashable: with the
    device it keys a captured CUDA graph). Made on the host by :func:`_prepare`."""

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
class _HostInputs:
    """One build's inputs, made on the host (numbers and pictures)."""

    plan: _Plan
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray | None  # float32 [H, W] person mask of the texture frame
    far: np.ndarray | None  # uint8 [H, W, 3], background "far"
    obs: np.ndarray  # float32 [_OBS_LEN], texture frame
    outline: np.ndarray | None  # float32 [h, w] (:func:`_outline_map`)
    geo_obs: np.ndarray | None  # reenactment frame
    geo_mask: np.ndarray | None
    geo_outline: np.ndarray | None
    frame: np.ndarray  # float32 [_FRAME_LEN]
    host: _Host

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor | None]:
        """The inputs of :func:`_build_on_device`, uploaded."""
        def up(a):
            return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
        names = ("image", "mask", "far", "obs", "outline", "geo_obs", "geo_mask", "geo_outline", "frame")
        return {n: up(getattr(self, n)) for n in names}


def _levels(crop_side: float, plan_size: tuple[int, int], max_side: float, texels: int, far: bool):
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


def _prepare(
    image: np.ndarray,
    obs: FaceObservation,
    config: AvatarConfig,
    geometry: FaceObservation | None,
    crop: tuple[float, float, float] | None,
    render_size: int,
) -> _HostInputs:
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
    tex_size, fill_size = _levels(side, (H, W), config.texture_scale * render_size, config.fill_texels, far)
    alpha_mask = obs.mask is not None and not far
    plan = _Plan(config, (H, W), f, render_size, vis_size, tex_size, fill_size, alpha_mask, obs.mask is not None,
                 geometry is not None, geometry is not None and geometry.mask is not None)
    ext = side * vis_extent
    s = vis_size / ext
    A = np.array([[s, 0, -s * (cx - ext / 2)], [0, s, -s * (cy - ext / 2)], [0, 0, 1]])
    crop_K = np.array([[f / side, 0, (W / 2.0 - cx) / side + 0.5], [0, f / side, (H / 2.0 - cy) / side + 0.5], [0, 0, 1]])
    Kt = np.array([[f, 0, W / 2.0], [0, f, H / 2.0], [0, 0, 1]])
    radius = _reach_radius((H, W), side, config.card_extent)
    frame = np.concatenate([[cx, cy, side], A.reshape(-1), crop_K.reshape(-1), Kt.reshape(-1), [radius]])
    frame = frame.astype(np.float32)
    pivot = _pivot_cam(geometry or obs)
    return _HostInputs(
        plan=plan,
        image=image,
        mask=None if obs.mask is None else np.asarray(obs.mask, np.float32),
        far=_far_picture(image, obs.mask) if far else None,
        obs=_obs_vector(obs),
        outline=_outline_map(obs),
        geo_obs=None if geometry is None else _obs_vector(geometry),
        geo_mask=None if geometry is None or geometry.mask is None else np.asarray(geometry.mask, np.float32),
        geo_outline=None if geometry is None else _outline_map(geometry),
        frame=frame,
        host=_Host(crop_K=torch.from_numpy(crop_K.astype(np.float32)), pivot=torch.from_numpy(pivot.astype(np.float32))),
    )


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

    The host frames the head and packs a few numbers (:func:`_prepare`); the device
    does the rest without waiting on the host except to size the source-depth raster
    (models.avatar.engine.AvatarEngine runs that part as a CUDA graph instead).
    """
    inputs = _prepare(image, obs, config, geometry, crop, render_size)
    device = torch.device(device)
    avatar = _build_on_device(inputs.plan, inputs.tensors(device), device)
    avatar.host = inputs.host
    return avatar


def _build_on_device(plan: _Plan, t: dict[str, torch.Tensor | None], device: torch.device,
                     capacity: int | None = None) -> Avatar:
    """The device's share of a build: tensor maths only, fixed shapes for a fixed plan.
    capacity: candidate count of the source-depth raster (fixed: CUDA-graph safe; None:
    exact, one host sync). The Avatar's ``host`` field is left for the caller."""
    config = plan.config
    key = (config.shell_rings, config.card_grid, config.background == "far")
    topo = _topology(*key)
    st = _statics(topo, key, device)
    H, W = plan.image_size
    frame = t["frame"]
    crop, A, crop_K, Kt = frame[:3], frame[3:12].view(3, 3), frame[12:21].view(3, 3), frame[21:30].view(3, 3)
    o = _ObsT.of(t["obs"])
    mask = t["mask"]
    support = None if mask is None else _support(mask, t["outline"])
    tex_verts = _geometry(o, support, crop, plan, st)  # [N, 3] texture frame
    N = tex_verts.shape[0]
    tex_h = tex_verts @ Kt.T  # [N, 3]: (u w, v w, w) with w the source depth

    # What the source camera saw: a depth map of the head, and per vertex.
    src_depth, frags = _source_depth(tex_verts, st, A @ Kt, plan.vis_size, capacity)
    visible = _vertex_visible(tex_h, src_depth, A, st.card_verts)  # [N] bool
    grazing = _grazing(tex_verts, st)  # [N] in [0, 1]

    # Fill texture for what the source did not see (used per pixel where hidden).
    fill = tex_h.clone()
    opacity = torch.ones(N, device=device)
    _fill_shell(fill, visible, st, topo.pole)
    card = slice(topo.n_face + topo.n_shell, topo.n_face + topo.n_shell + topo.n_card)
    opacity = _fill_card(fill, opacity, visible, card, config.card_grid)
    if topo.n_far:
        # Atlas [picture | far layer]: far-layer vertices address the right half.
        for h in (tex_h, fill):
            h[N - topo.n_far :, 0] += W * h[N - topo.n_far :, 2]
    skip = _transparent_card_faces(mask if plan.alpha_mask else None, frame[30], tex_h, fill, opacity, st, plan)
    vattr = torch.cat([tex_h, fill, grazing[:, None], opacity[:, None], st.flags], -1)  # [N, 11]
    if plan.reenact:
        geo_mask = t["geo_mask"]
        geo_support = None if geo_mask is None else _support(geo_mask, t["geo_outline"])
        verts = _geometry(_ObsT.of(t["geo_obs"]), geo_support, crop, plan, st)
        pivot = _ObsT.of(t["geo_obs"]).pivot
    else:
        verts, pivot = tex_verts, o.pivot

    # Texture on the device: the picture, its person mask as alpha (or 1), and the far layer.
    image_t = t["image"].permute(2, 0, 1).float().div_(255.0)
    alpha_t = mask[None] if plan.alpha_mask else torch.ones((1, H, W), device=device)
    texture = _texture(image_t, alpha_t, plan.tex_size)
    span_w = float(W)
    if topo.n_far:
        far = t["far"].permute(2, 0, 1).float().div_(255.0)
        texture = torch.cat([texture, _texture(far, torch.ones_like(alpha_t), plan.tex_size)], -1)
        span_w = 2.0 * W
    return Avatar(
        verts=verts,
        faces=st.faces,
        cull=st.cull,
        skip=skip,
        vattr=vattr,
        texture=texture,
        texture_fill=_fill_texture(texture, plan.fill_size),
        tex_span=(float(H), span_w),
        src_depth=src_depth,
        src_depth_K=A,
        pivot=pivot,
        crop_K=crop_K,
        source_image=image_t,
        source_alpha=alpha_t,
        source_focal_px=plan.focal_px,
        config=config,
        needed=frags.needed,
    )


def _source_depth(verts, st: _Statics, AK: torch.Tensor, S: int, capacity: int | None):
    """Depth map [1, 2, S, S] of the texture-frame head seen from the source camera,
    framing the head (AK = A @ Kt maps the camera frame to map pixels), +inf where
    empty, and the raster's fragments. As sharp as the renders."""
    eye = torch.eye(4, device=verts.device)
    pix = project(verts[None], eye[None], AK[None])
    # Only the head can hide anything: the card and far layer lie behind it.
    frags = rasterize(pix, st.faces, S, S, cull=st.cull, skip=st.not_head, capacity=capacity)
    depth = torch.where(frags.mask[0], frags.depth[0], torch.full_like(frags.depth[0], float("inf")))
    # Channel 1, max-pooled 3x3, is for the card: a card point just beside the head's
    # silhouette counts as seen (its own source pixel is right there), which keeps fill
    # texture out of what the source camera itself shows. The head keeps the sharp map
    # (channel 0): its rim folds under the face outline and must stay hidden there.
    depth = depth[None, None]
    return torch.cat([depth, _max3x3(depth)], 1), frags


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """3x3 max filter of [..., H, W] (max_pool2d, stride 1, padding 1) as two separable
    passes of element-wise maxima: the same numbers, about 18x faster on the CPU."""
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


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


def _vertex_visible(tex_h, src_depth, A, pooled: torch.Tensor) -> torch.Tensor:
    w = tex_h[:, 2].clamp(min=1e-6)
    return ~_occluded(w, _sample_depth(src_depth, A, tex_h[:, 0] / w, tex_h[:, 1] / w, pooled))


def _grazing(verts: torch.Tensor, st: _Statics) -> torch.Tensor:
    """Per vertex [N] in [0, 1]: 0 where the surface is seen edge-on from the source
    camera (texture stretched), 1 where it faces it (|cos| >= 0.25)."""
    normals = _vertex_normals(verts, st.faces, st.incident)
    view = verts / verts.norm(dim=-1, keepdim=True)
    facing = (normals * view).sum(-1).abs()
    return ((facing - 0.08) / 0.17).clamp(0, 1)


def _fill_shell(fill, visible, st: _Statics, pole: int) -> None:
    """Hidden shell vertices take the texture of the last visible vertex of their
    sweep from the face outline (hair colour continues round the back of the head)."""
    ring_ids = st.ring_ids  # [K + 1, J]
    k_idx = torch.arange(ring_ids.shape[0], device=fill.device)[:, None].expand_as(ring_ids)
    last = torch.where(visible[ring_ids], k_idx, torch.zeros_like(k_idx)).cummax(0).values
    src = torch.gather(ring_ids, 0, last).reshape(-1)
    dst = ring_ids.reshape(-1)
    fill[dst] = fill[src] / fill[src, 2:3] * fill[dst, 2:3]
    fill[pole] = fill[ring_ids[-1]].mean(0)


def _fill_card(fill, opacity, visible, card: slice, G: int) -> torch.Tensor:
    """Card vertices hidden by the head in the source would show a ghost of the face
    when the head turns; give each the texture of the nearest visible card vertex of
    its row, searching away from the head (hair or background continues behind the
    head). Rows with none become transparent there: returns the new opacity."""
    device = fill.device
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
    move = (~vis & has)[..., None]
    moved = fill[src_ids] / fill[src_ids][..., 2:3] * fill[ids][..., 2:3]
    fill[ids] = torch.where(move, moved, fill[ids])
    clear = torch.zeros(len(opacity), dtype=torch.bool, device=device)
    clear[ids] = ~vis & ~has
    return torch.where(clear, torch.zeros_like(opacity), opacity)


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
    capacity: int | None = None,
) -> RenderOutput:
    """Render the avatar at arbitrary cameras (calibrated rigs, synthetic pairs).
    capacity: fixed raster candidate count (no host sync: CUDA-graph safe; the output's
    ``needed`` tells whether it sufficed); None: exact."""
    if not 16 <= size <= 4096:
        raise ValueError(f"expected size in [16, 4096], got {size}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4) or Ks.shape != (viewmats.shape[0], 3, 3):
        raise ValueError(f"expected viewmats [V, 4, 4] and Ks [V, 3, 3], got {tuple(viewmats.shape)}, {tuple(Ks.shape)}")
    viewmats = viewmats.to(avatar.device, torch.float32)
    Ks = Ks.to(avatar.device, torch.float32)
    V = viewmats.shape[0]
    pix = project(avatar.verts[None].expand(V, -1, -1), viewmats, Ks)  # [V, N, 3]
    frags = rasterize(pix, avatar.faces, size, size, cull=avatar.cull, skip=avatar.skip, capacity=capacity)
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
    bg = _constant(avatar.config.bg_color, avatar.device)[None, :, None, None]
    rgb = tex[:, :3] * alpha + bg * (1 - alpha)
    seen = ((~hidden & covered & in_pic).float() * grazing).clamp(0, 1)
    # Where nothing opaque is drawn the picture shows the flat background: nothing was invented.
    seen = torch.where(alpha[:, 0] < 0.02, torch.ones_like(seen), seen)
    return RenderOutput(rgb=rgb.clamp(0, 1), alpha=alpha, depth=frags.depth[:, None], seen=seen[:, None],
                        needed=frags.needed)
