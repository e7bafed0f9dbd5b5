"""A small triangle rasterizer in pure torch (CPU and CUDA, deterministic).

Visibility-buffer design: every triangle enumerates the pixels of its
screen-space bounding box (one flat list for all triangles of all views, so
the work is the sum of box areas and the launch count is fixed), an inside test and a perspective-correct depth
give one 64-bit key per covered pixel, ``(depth << 32) | face id``, and a
``scatter_reduce(amin)`` keeps the nearest face per pixel. Attributes are then
interpolated once per pixel. ``amin`` is order-independent, so the result is
deterministic on every device.

Pixel (i, j) has its centre at (x, y) = (j + 0.5, i + 0.5); a pixel is covered
when its centre lies inside the triangle or on its edge.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Fragments", "rasterize", "interpolate"]

_DEPTH_SCALE = float(2**20)  # depth quantum ~1 micrometre
_MAX_DEPTH = 2000.0  # metres; keys stay below 2**63
_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """Per-pixel result of :func:`rasterize` for V views of H x W pixels."""

    face_id: torch.Tensor  # [V, H, W] int64, -1 where no triangle covers the pixel
    bary: torch.Tensor  # [V, H, W, 3] perspective-correct barycentrics (0 where empty)
    depth: torch.Tensor  # [V, H, W] camera depth z (0 where empty)

    @property
    def mask(self) -> torch.Tensor:
        """[V, H, W] bool, covered pixels."""
        return self.face_id >= 0


def _edge(ax, ay, bx, by, px, py):
    """Twice the signed area of the triangle (a, b, p)."""
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def rasterize(
    pix: torch.Tensor,  # [V, N, 3] (x_px, y_px, z_cam) from telepresence.camera.project
    faces: torch.Tensor,  # [F, 3] int64 vertex indices
    height: int,
    width: int,
    near: float = 1e-3,
) -> Fragments:
    """Rasterize V projected copies of one mesh into V depth-tested fragment buffers.

    Triangles with a vertex closer than ``near`` are dropped (no clipping), as
    are degenerate ones. Both windings are drawn (no back-face culling): the
    depth test resolves closed surfaces.
    """
    if pix.ndim != 3 or pix.shape[-1] != 3:
        raise ValueError(f"expected pix [V, N, 3], got {tuple(pix.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"expected faces [F, 3], got {tuple(faces.shape)}")
    device = pix.device
    V, F = pix.shape[0], faces.shape[0]
    if V * F >= 2**31:
        raise ValueError(f"expected fewer than 2**31 view-faces, got {V} x {F}")
    tri = pix[:, faces].to(torch.float32)  # [V, F, 3 corners, 3]
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]  # [V, F, 3]
    area = _edge(x[..., 0], y[..., 0], x[..., 1], y[..., 1], x[..., 2], y[..., 2])  # [V, F]
    ok = (z > near).all(-1) & (area.abs() > 1e-9) & (z < _MAX_DEPTH).all(-1)
    # Pixel columns whose centre j + 0.5 lies in [min x, max x].
    x0 = torch.ceil(x.amin(-1) - 0.5).clamp(min=0)
    x1 = torch.floor(x.amax(-1) - 0.5).clamp(max=width - 1)
    y0 = torch.ceil(y.amin(-1) - 0.5).clamp(min=0)
    y1 = torch.floor(y.amax(-1) - 0.5).clamp(max=height - 1)
    bw, bh = x1 - x0 + 1, y1 - y0 + 1
    ok &= (bw > 0) & (bh > 0)
    # Per triangle, three screen-space planes evaluated at pixel centres (x, y):
    # barycentrics w0, w1 (edge functions / area) and 1/z, which is affine on screen.
    x0_, y0_, x1_, y1_, x2_, y2_ = x[..., 0], y[..., 0], x[..., 1], y[..., 1], x[..., 2], y[..., 2]
    inv_a = 1.0 / torch.where(area.abs() > 1e-9, area, torch.ones_like(area))
    # w0 = ((x2 - x1)(y - y1) - (y2 - y1)(x - x1)) / a, w1 likewise for edge 2 -> 0.
    w0_a, w0_b = -(y2_ - y1_) * inv_a, (x2_ - x1_) * inv_a
    w0_c = -(w0_a * x1_ + w0_b * y1_)
    w1_a, w1_b = -(y0_ - y2_) * inv_a, (x0_ - x2_) * inv_a
    w1_c = -(w1_a * x2_ + w1_b * y2_)
    iz = 1.0 / z.clamp(min=near)  # [V, F, 3]
    # 1/z = w0 iz0 + w1 iz1 + (1 - w0 - w1) iz2
    d0, d1 = iz[..., 0] - iz[..., 2], iz[..., 1] - iz[..., 2]
    iz_a, iz_b, iz_c = w0_a * d0 + w1_a * d1, w0_b * d0 + w1_b * d1, w0_c * d0 + w1_c * d1 + iz[..., 2]
    planes = torch.stack([w0_a, w0_b, w0_c, w1_a, w1_b, w1_c, iz_a, iz_b, iz_c], -1).reshape(-1, 9)
    boxes = torch.stack([x0, y0, bw], -1).reshape(-1, 3).to(torch.int64)

    # Enumerate every pixel of every triangle's bounding box: candidate c belongs to
    # triangle tri_of[c] and is its local-th box pixel (row-major within the box).
    n_pix = torch.where(ok, bw * bh, torch.zeros_like(bw)).reshape(-1).to(torch.int64)  # [V*F]
    total = int(n_pix.sum())  # the one host sync
    keys = pixel_ids = None
    if total > 0:
        ids_all = torch.arange(V * F, device=device)
        tri_of = torch.repeat_interleave(ids_all, n_pix, output_size=total)  # [M]
        first = torch.cumsum(n_pix, 0) - n_pix
        local = torch.arange(total, device=device) - first.index_select(0, tri_of)
        box = boxes.index_select(0, tri_of)  # [M, 3]
        row = torch.div(local, box[:, 2], rounding_mode="floor")
        px = box[:, 0] + (local - row * box[:, 2])
        py = box[:, 1] + row
        pl = planes.index_select(0, tri_of)  # [M, 9]
        cx, cy = px.to(torch.float32) + 0.5, py.to(torch.float32) + 0.5
        w0 = pl[:, 0] * cx + pl[:, 1] * cy + pl[:, 2]
        w1 = pl[:, 3] * cx + pl[:, 4] * cy + pl[:, 5]
        inv_z = pl[:, 6] * cx + pl[:, 7] * cy + pl[:, 8]
        inside = (w0 >= 0) & (w1 >= 0) & (w0 + w1 <= 1.0 + 1e-6)
        depth = 1.0 / inv_z.clamp(min=1.0 / _MAX_DEPTH)
        key = ((depth * _DEPTH_SCALE).to(torch.int64) << 32) | tri_of
        keys = torch.where(inside, key, torch.full_like(key, _EMPTY))
        view = torch.div(tri_of, F, rounding_mode="floor")
        pixel_ids = view * (height * width) + py * width + px

    zbuf = torch.full((V * height * width,), _EMPTY, dtype=torch.int64, device=device)
    if keys is not None:
        zbuf.scatter_reduce_(0, pixel_ids, keys, reduce="amin", include_self=True)
    covered = zbuf != _EMPTY
    flat_face = torch.where(covered, zbuf & 0xFFFFFFFF, torch.zeros_like(zbuf))  # view * F + face
    # Per-pixel barycentrics from the winning face's planes.
    H, W = height, width
    jj = torch.arange(W, device=device, dtype=torch.float32) + 0.5
    ii = torch.arange(H, device=device, dtype=torch.float32) + 0.5
    cx = jj[None, None, :].expand(V, H, W).reshape(-1)
    cy = ii[None, :, None].expand(V, H, W).reshape(-1)
    pl = planes.index_select(0, flat_face)  # [V*H*W, 9]
    izc = iz.reshape(-1, 3).index_select(0, flat_face)  # [V*H*W, 3]
    b0 = (pl[:, 0] * cx + pl[:, 1] * cy + pl[:, 2]).clamp(0, 1)
    b1 = (pl[:, 3] * cx + pl[:, 4] * cy + pl[:, 5]).clamp(0, 1)
    b2 = (1.0 - b0 - b1).clamp(min=0)
    # Perspective-correct: weight each screen barycentric by that corner's 1/z.
    persp = torch.stack([b0, b1, b2], -1) * izc
    inv_z = persp.sum(-1, keepdim=True).clamp(min=1e-12)
    bary = torch.where(covered[:, None], persp / inv_z, torch.zeros_like(persp))
    depth = torch.where(covered, 1.0 / inv_z[:, 0], torch.zeros_like(inv_z[:, 0]))
    face_id = torch.where(covered, flat_face % F, torch.full_like(flat_face, -1))
    return Fragments(
        face_id=face_id.reshape(V, H, W),
        bary=bary.reshape(V, H, W, 3),
        depth=depth.reshape(V, H, W),
    )


def interpolate(
    attrs: torch.Tensor,  # [V, N, C] per-view vertex attributes, or [N, C] shared by all views
    faces: torch.Tensor,  # [F, 3]
    frags: Fragments,
) -> torch.Tensor:
    """Perspective-correct interpolation of vertex attributes: returns [V, H, W, C] (0 where empty)."""
    V, H, W = frags.face_id.shape
    if attrs.ndim == 2:
        attrs = attrs[None].expand(V, -1, -1)
    if attrs.ndim != 3 or attrs.shape[0] != V:
        raise ValueError(f"expected attrs [V={V}, N, C] or [N, C], got {tuple(attrs.shape)}")
    fid = frags.face_id.clamp(min=0).reshape(V, -1)  # [V, P]
    corner = faces[fid]  # [V, P, 3]
    C = attrs.shape[-1]
    vals = torch.gather(attrs, 1, corner.reshape(V, -1, 1).expand(-1, -1, C)).reshape(V, -1, 3, C)
    out = (vals * frags.bary.reshape(V, -1, 3, 1)).sum(2)
    return out.reshape(V, H, W, C)
