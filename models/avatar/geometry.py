"""Where the vertices are, per frame (device maths only): the face, the shell fitted to the
person's silhouette, the card and the far layer, in the source camera frame."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from models.avatar.plan import BuildPlan, ObservationView, reduction_factor
from models.avatar.topology import CARD_KNOTS, INCIDENT_LANES, MeshConstants, sweep_shell

__all__ = ["area_pool", "incident_sum", "mesh_vertices", "shell_support", "vertex_normals"]


def area_pool(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Area reduction of a mask [H, W] by an integer factor (partial edge cells averaged)."""
    if factor == 1:
        return mask
    return F.avg_pool2d(mask[None, None], factor, ceil_mode=True)[0, 0]


def shell_support(mask: torch.Tensor, outline: torch.Tensor) -> torch.Tensor:
    """Where the shell may project in the source: the person mask [H, W] (area-reduced to the
    outline's size; a mask of another size, e.g. the texture's matte, is resampled to it) or the face outline."""
    f = reduction_factor(mask.shape, 160)
    if (-(-mask.shape[0] // f), -(-mask.shape[1] // f)) == tuple(outline.shape):
        small = area_pool(mask, f)
    else:
        small = F.interpolate(mask[None, None], size=tuple(outline.shape), mode="bilinear", antialias=True,
                              align_corners=False)[0, 0]
    return torch.maximum(small, outline)


def mesh_vertices(o: ObservationView, support: torch.Tensor | None, crop: torch.Tensor, plan: BuildPlan,
                  st: MeshConstants) -> torch.Tensor:
    """Vertex positions [N, 3] in the camera frame for one observation (device maths only).
    support: :func:`shell_support` of the observation; None: the shell keeps the cranium's shape."""
    config = plan.config
    face_head = (o.points - o.t) @ o.R  # R^T (X - t): [468, 3]
    shell = sweep_shell(face_head, st.ring0, config.shell_rings, config.cranium_scale, st.const)
    shell_cam = shell @ o.R.T + o.t  # [n_shell, 3]
    if support is not None:
        # Hair volume: the shell grows to the silhouette's top and sides. Then the rim (first
        # three rings: sides of the head, ears) keeps its shape, filled where the source shows
        # no person (see render_cameras); the rest shrinks to fit inside the silhouette.
        J = st.ring0.shape[0]
        centre = o.R @ st.const["centre"] + o.t
        shell_cam = _grow_shell_to_silhouette(shell_cam, centre, support, plan, J)
        fitted = _fit_shell_to_silhouette(shell_cam[3 * J :], centre, support, plan)
        shell_cam = torch.cat([shell_cam[: 3 * J], fitted])
    # Card: a curved sheet over the crop window, depth set by the head centre and the chin.
    parts = [o.points, shell_cam, _card_vertices(o, crop, plan, st)]
    if config.background == "far":
        parts.append(_far_vertices(o, crop, plan))
    return torch.cat(parts)


def _source_pixels(points: torch.Tensor, plan: BuildPlan) -> torch.Tensor:
    """Source pixels (u, v) [..., 2] of camera-frame points [..., 3]."""
    H, W = plan.image_size
    uv = plan.focal_px * points[..., :2] / points[..., 2:3]  # both axes at once, f x / z as per axis
    uv[..., 0] += W / 2.0
    uv[..., 1] += H / 2.0
    return uv


def _sample_support(support: torch.Tensor, uv: torch.Tensor, plan: BuildPlan) -> torch.Tensor:
    """Bilinear lookups of the support map [h, w] at source pixels uv [..., 2] (0 outside)."""
    H, W = plan.image_size
    grid = 2 * uv  # 2 u / W - 1, both axes at once
    grid[..., 0] /= W
    grid[..., 1] /= H
    grid = grid.sub_(1).reshape(1, 1, -1, 2)
    val = F.grid_sample(support[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return val.reshape(uv.shape[:-1])


# Hair volume: at most this growth of a sweep's reach, from the sweep's direction in the
# picture (image y of the unit direction: grows up to the sides, not down into the neck).
_MAX_GROWTH = 1.5
_GROW_Y = (0.45, 0.1)  # no growth at or below this direction's y, full growth at or above the second
_STEPS = 24
_GROW_LEVEL = 0.8  # support the grown outline reaches (inside the soft edge)
_FIT_LEVEL = 0.7  # support every shell vertex stays inside


def _grow_shell_to_silhouette(shell: torch.Tensor, centre: torch.Tensor, support: torch.Tensor, plan: BuildPlan,
                              J: int) -> torch.Tensor:
    """Shell [K * J + 1, 3] (camera frame, ring-major, the pole last) grown sweep by sweep so that
    its outline in the source reaches the person's silhouette above and beside the head:
    hair that stands out of the cranium ellipsoid gets volume instead of being painted on
    the card behind the head.

    Per sweep j, along the picture direction from the centre to the sweep's outermost
    projected vertex (reach r_j), the silhouette lies at r_sil (the last of _STEPS samples
    in [0.6, 1.8] r_j with support >= _GROW_LEVEL: inside the soft edge). The sweep's
    offsets from the cranium centre scale by g_j = clamp(r_sil / r_j, 1, _MAX_GROWTH) across
    the line of sight and by (1 + g_j) / 2 along it, ramped in over rings 1-3 (ring 0 is the
    face outline), g smoothed over neighbour sweeps; the pole stays.
    """
    K = (shell.shape[0] - 1) // J
    rings = shell[:-1].view(K, J, 3)
    c_uv = _source_pixels(centre, plan)  # [2]
    offset = _source_pixels(rings, plan) - c_uv  # [K, J, 2]
    reach = offset.norm(dim=-1)  # [K, J]
    r_max, k_max = reach.max(0)  # [J]
    direction = torch.gather(offset, 0, k_max[None, :, None].expand(1, J, 2))[0] / r_max[:, None].clamp(min=1e-6)
    steps = torch.linspace(0.6, 1.8, _STEPS, device=shell.device)  # [M]
    along = r_max[:, None] * steps[None]  # [J, M]
    inside = _sample_support(support, c_uv + direction[:, None] * along[..., None], plan) >= _GROW_LEVEL  # [J, M]
    run = inside.long().cumprod(1).sum(1)  # leading samples inside
    r_sil = r_max * steps[(run - 1).clamp(min=0)]
    growth = (r_sil / r_max.clamp(min=1e-6)).clamp(1.0, _MAX_GROWTH)
    allow = ((_GROW_Y[0] - direction[:, 1]) / (_GROW_Y[0] - _GROW_Y[1])).clamp(0.0, 1.0)
    growth = 1.0 + (growth - 1.0) * allow
    for _ in range(2):
        growth = (growth.roll(1) + growth + growth.roll(-1)) / 3.0
    ramp = (torch.arange(1, K + 1, device=shell.device, dtype=shell.dtype) / 3.0).clamp(max=1.0)  # [K]
    g = 1.0 + (growth[None] - 1.0) * ramp[:, None]  # [K, J]
    # Across the line of sight through the centre, and half as much along it.
    sight = centre / centre.norm()
    d = rings - centre
    d_along = (d * sight).sum(-1, keepdim=True) * sight
    grown = centre + (d - d_along) * g[..., None] + d_along * ((1.0 + g) / 2.0)[..., None]
    return torch.cat([grown.reshape(-1, 3), shell[-1:]])


def _fit_shell_to_silhouette(shell: torch.Tensor, centre: torch.Tensor, support: torch.Tensor,
                             plan: BuildPlan) -> torch.Tensor:
    """Shrink shell vertices towards the cranium centre until they project inside the
    person (or the face outline) in the source picture: the cranium never pokes out
    of the real silhouette, so short hair and narrow heads stay their own shape. Inside
    means support >= _FIT_LEVEL: the shell stays off the soft edge, which the card behind
    carries (a shell edge on it shows the edge's background-tinted texels as a line).

    shell [M, 3], centre [3] (camera frame), support [h, w] (:func:`shell_support`);
    binary search of a per-vertex scale in [0.55, 1].
    """
    def inside(points: torch.Tensor) -> torch.Tensor:
        return _sample_support(support, _source_pixels(points, plan), plan) >= _FIT_LEVEL

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


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor, incident: torch.Tensor,
                   bags: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Area-weighted vertex normals [N, 3]; incident [N, D]: each vertex's faces, padded
    with F, and bags the same lists ragged (:func:`incident_sum`: the same bits on every device)."""
    tri = verts.index_select(0, faces.reshape(-1)).view(-1, 3, 3)  # [F, 3 corners, 3]
    n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    vn = incident_sum(n, incident, bags)
    return vn / vn.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def incident_sum(table: torch.Tensor, incident: torch.Tensor, bags: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[N, C]: row i the sum of the rows of table [F, C] listed in incident[i] ([N, D], padded with F),
    as ``cat([table, zeros]) [incident].sum(1)`` gives it, bit for bit. On the CPU one embedding_bag over
    the real entries only (bags: models.avatar.topology.incident_bags; a vertex has about 6 faces of
    D = 36), its lanes added as torch's CPU sum adds them (tests guard the equality); elsewhere the
    padded gather and sum themselves."""
    N, C = incident.shape[0], table.shape[1]
    if table.device.type != "cpu":
        return torch.cat([table, table.new_zeros(1, C)])[incident].sum(1)
    indices, offsets = bags
    lanes = F.embedding_bag(indices, table, offsets, mode="sum").view(INCIDENT_LANES, N, C)
    total = lanes[0]
    for lane in range(1, INCIDENT_LANES):
        total = total + lanes[lane]
    return total
