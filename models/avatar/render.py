"""Rendering an avatar at orbit poses (render_views) or at any cameras (render_cameras):
raster, projective and fill texture, and the per-pixel shadow-map test."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from models.avatar.types import Avatar, RenderOutput
from models.avatar.visibility import occluded, sample_source_depth
from models.geometry.camera import OrbitPose, project
from models.geometry.raster import interpolate, rasterize

__all__ = ["render_cameras", "render_views"]


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small float32 constant on the device, uploaded once (CUDA-graph captures may
    not copy from the host)."""
    key = (tuple(values), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32).to(device)
    return _CONSTANTS[key]


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
    hidden = occluded(w, sample_source_depth(avatar.src_depth, avatar.src_depth_K, u, v, pooled=head < 0.5))
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
