"""Where the vertices are, per frame (device maths only): the face, the shell fitted to the
person's silhouette, the card and the far layer, in the source camera frame."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from models.avatar.plan import BuildPlan, ObservationView, reduction_factor
from models.avatar.topology import CARD_KNOTS, MeshConstants, sweep_shell

__all__ = ["area_pool", "mesh_vertices", "shell_support", "vertex_normals"]


def area_pool(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Area reduction of a mask [H, W] by an integer factor (partial edge cells averaged)."""
    if factor == 1:
        return mask
    return F.avg_pool2d(mask[None, None], factor, ceil_mode=True)[0, 0]


def shell_support(mask: torch.Tensor, outline: torch.Tensor) -> torch.Tensor:
    """Where the shell may project in the source: the person mask (area-reduced to the
    outline's size) or the face outline."""
    return torch.maximum(area_pool(mask, reduction_factor(mask.shape, 160)), outline)


def mesh_vertices(o: ObservationView, support: torch.Tensor | None, crop: torch.Tensor, plan: BuildPlan,
                  st: MeshConstants) -> torch.Tensor:
    """Vertex positions [N, 3] in the camera frame for one observation (device maths only).
    support: :func:`shell_support` of the observation; None: the shell keeps the cranium's shape."""
    config = plan.config
    face_head = (o.points - o.t) @ o.R  # R^T (X - t): [468, 3]
    shell = sweep_shell(face_head, st.ring0, config.shell_rings, config.cranium_scale, st.const)
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


def _fit_shell_to_silhouette(shell: torch.Tensor, centre: torch.Tensor, support: torch.Tensor,
                             plan: BuildPlan) -> torch.Tensor:
    """Shrink shell vertices towards the cranium centre until they project inside the
    person (or the face outline) in the source picture: the cranium never pokes out
    of the real silhouette, so short hair and narrow heads stay their own shape.

    shell [M, 3], centre [3] (camera frame), support [h, w] (:func:`shell_support`);
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


def _card_vertices(o: ObservationView, crop: torch.Tensor, plan: BuildPlan, st: MeshConstants) -> torch.Tensor:
    """Card vertices [G*G, 3]: depth = head-centre depth + delta(height below chin) + curvature."""
    H, W = plan.image_size
    f = plan.focal_px
    u, v = _card_pixels(crop, plan.config.card_grid, plan.config.card_extent)
    zc = o.pivot[2]
    rel = (v - o.chin_v) / o.face_h  # face heights below the chin
    # Backdrop well behind the head centre above the chin; neck and chest come forward below it.
    delta = _interp(rel, st.const["knots_x"], st.const["knots_y"], CARD_KNOTS[0])
    lateral = (u - (f * o.pivot[0] / zc + W / 2.0)) / f * zc  # metres from the head centre
    z = zc + delta + 1.2 * lateral.pow(2)
    X = (u - W / 2.0) / f * z
    Y = (v - H / 2.0) / f * z
    return torch.stack([X, Y, z], -1)


def _far_vertices(o: ObservationView, crop: torch.Tensor, plan: BuildPlan) -> torch.Tensor:
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


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor, incident: torch.Tensor) -> torch.Tensor:
    """Area-weighted vertex normals [N, 3]; incident [N, D]: each vertex's faces, padded
    with F (a zero row). A gather and a sum, so the same bits on every device."""
    tri = verts[faces]
    n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    n = torch.cat([n, n.new_zeros(1, 3)])
    vn = n[incident].sum(1)
    return vn / vn.norm(dim=-1, keepdim=True).clamp(min=1e-12)
