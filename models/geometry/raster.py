"""A small triangle rasterizer in pure torch (CPU and CUDA, deterministic).

Visibility-buffer design: every triangle enumerates candidate pixels (one flat
list for all triangles of all views, so the launch count is fixed), an inside test
and a perspective-correct depth give one 64-bit key per covered pixel,
``(depth << 32) | face id``, and a ``scatter_reduce(amin)`` keeps the nearest face
per pixel. Attributes are then
interpolated once per pixel. ``amin`` is order-independent, so the result is
deterministic on every device.

Pixel (i, j) has its centre at (x, y) = (j + 0.5, i + 0.5); a pixel is covered
when its centre lies inside the triangle or on its edge.

Two modes. By default the candidates are, per row of a triangle's bounding box,
the columns its edge functions allow (widened past their rounding: the same
fragments as the whole box), the lists exactly as long as needed (two host syncs
to read their lengths), and only covered pixels are resolved. With
``capacity=C`` the candidates are every pixel of every triangle's bounding box
(the work is the sum of box areas), every shape is fixed (C candidates, every pixel resolved) and
nothing waits for the device, so the call can be captured in a CUDA graph;
``Fragments.needed`` then says how many candidates the frame had, and a frame
with more than C loses the excess (the caller checks and grows C).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Fragments", "rasterize", "interpolate", "interpolate_pixels", "weighted_rows"]

_DEPTH_SCALE = float(2**20)  # depth quantum ~1 micrometre
_MAX_DEPTH = 2000.0  # metres; keys stay below 2**63
_EMPTY = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """Per-pixel result of :func:`rasterize` for V views of H x W pixels."""

    face_id: torch.Tensor  # [V, H, W] int64, -1 where no triangle covers the pixel
    depth: torch.Tensor  # [V, H, W] camera depth z (0 where empty)
    pixels: torch.Tensor | None  # [P] flat indices (view, row, col) of the covered pixels; None: all (dense)
    winner: torch.Tensor  # [P] view * F + face of each covered pixel (0 where empty when dense)
    face_px: torch.Tensor  # [P] int64 face of each (winner mod F)
    bary_px: torch.Tensor  # [P, 3] their perspective-correct barycentrics (0 where empty when dense)
    needed: torch.Tensor | None = None  # 0-d int64 on the device: candidates this frame needed

    @property
    def mask(self) -> torch.Tensor:
        """[V, H, W] bool, covered pixels."""
        return self.face_id >= 0

    @property
    def bary(self) -> torch.Tensor:
        """[V, H, W, 3] perspective-correct barycentrics (0 where empty); laid out as pictures on
        each access where only the covered pixels were resolved (a render reads bary_px)."""
        shape = tuple(self.face_id.shape) + (3,)
        if self.pixels is None:
            return self.bary_px.reshape(shape)
        bary = torch.zeros((self.face_id.numel(), 3), dtype=self.bary_px.dtype, device=self.bary_px.device)
        bary[self.pixels] = self.bary_px
        return bary.reshape(shape)


def _divmod(a: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a // d, a % d) of non-negative integers below 2**52, as exact float64: vectorised
    float maths instead of integer division, which the CPU does one element at a time.
    The quotient is corrected by one where the division rounded across an integer
    (CUDA divides by a scalar as a multiplication by its reciprocal)."""
    af = a.to(torch.float64)
    q = torch.floor(af / d)
    r = af - q * d
    over, under = r >= d, r < 0
    q = q + over.to(q.dtype) - under.to(q.dtype)
    return q, af - q * d


def _edge(ax, ay, bx, by, px, py):
    """Twice the signed area of the triangle (a, b, p)."""
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _keys(planes: torch.Tensor, tri_of: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
          valid: torch.Tensor | None = None) -> torch.Tensor:
    """Depth-test keys [M] int64 of candidates (triangle tri_of [M], pixel centre (cx, cy) [M]):
    (quantised depth << 32) | triangle where the centre lies inside the triangle (and valid),
    empty elsewhere. planes [9, T] as in :func:`rasterize`."""
    pl = planes.index_select(1, tri_of)  # [9, M], rows contiguous
    w0 = torch.addcmul(pl[2], pl[0], cx).addcmul_(pl[1], cy)
    w1 = torch.addcmul(pl[5], pl[3], cx).addcmul_(pl[4], cy)
    inv_z = torch.addcmul(pl[8], pl[6], cx).addcmul_(pl[7], cy)
    inside = (w0 >= 0) & (w1 >= 0) & (w0 + w1 <= 1.0 + 1e-6)
    if valid is not None:
        inside &= valid
    qdepth = (inv_z.clamp_(min=1.0 / _MAX_DEPTH).reciprocal_().mul_(_DEPTH_SCALE)).to(torch.int64)
    return torch.where(inside, (qdepth << 32) | tri_of, torch.full_like(tri_of, _EMPTY))


def _row_spans(planes, rows, x0, x1, y0, row_base, width: int, height: int):
    """The exact raster's candidates: per triangle t (planes [9, T] as in :func:`rasterize`) and
    each of its ``rows[t]`` box rows from y0[t], the columns in [x0[t], x1[t]] whose centres may
    pass the inside test. Each edge constraint a x + b y + c >= 0 (w0, w1, and 1 + 1e-6 - w0 - w1)
    bounds x on one side at -(b y + c) / a, widened by far more than the float32 rounding of the
    test (1e-5 of |c| + |a| W + |b| H over |a|, the third constraint taking the first two's sum, plus
    1e-3 pixel; no bound where that is wide), so
    every pixel the whole box would find inside is a candidate: the same fragments from about half
    the candidates. Returns per candidate its triangle [M] int64, pixel centre (cx, cy) [M] float32
    and flat pixel id [M] int64 (row_base [T]: the pixel id of column 0 of row y0)."""
    device = planes.device
    ends = torch.cumsum(rows, 0)
    R = int(ends[-1])  # host sync
    tri_r = torch.repeat_interleave(torch.arange(rows.shape[0], device=device), rows, output_size=R)  # [R]
    r = torch.arange(R, device=device) - (ends - rows).index_select(0, tri_r)  # [R] row within the box
    cy = y0.index_select(0, tri_r) + r.to(torch.float32) + 0.5
    p = planes[:6].index_select(1, tri_r)  # [6, R]: w0 (a, b, c), w1 (a, b, c)
    scale0 = p[2].abs() + p[0].abs() * width + p[1].abs() * height
    scale1 = p[5].abs() + p[3].abs() * width + p[4].abs() * height
    a = torch.stack([p[0], p[3], -(p[0] + p[3])])  # [3, R]
    b = torch.stack([p[1], p[4], -(p[1] + p[4])])
    c = torch.stack([p[2], p[5], (1.0 + 1e-6) - (p[2] + p[5])])
    scale = torch.stack([scale0, scale1, scale0 + scale1 + 1.0])
    root = -(b * cy + c) / a  # a x + b y + c = 0
    slack = 1e-5 * scale / a.abs() + 1e-3
    lo = torch.where(a > 0, root - slack, torch.full_like(root, -float("inf"))).amax(0)
    hi = torch.where(a < 0, root + slack, torch.full_like(root, float("inf"))).amin(0)
    first = torch.maximum(x0.index_select(0, tri_r), torch.ceil(lo - 0.5))
    last = torch.minimum(x1.index_select(0, tri_r), torch.floor(hi - 0.5))
    n = (last - first + 1).clamp_(min=0).to(torch.int64)  # [R]
    cends = torch.cumsum(n, 0)
    M = int(cends[-1]) if R > 0 else 0  # host sync
    row_of = torch.repeat_interleave(torch.arange(R, device=device), n, output_size=M)  # [M]
    col = first.index_select(0, row_of) + (torch.arange(M, device=device) - (cends - n).index_select(0, row_of)).to(torch.float32)
    pixel_ids = (row_base.index_select(0, tri_r) + r * width).index_select(0, row_of) + col.to(torch.int64)
    return tri_r.index_select(0, row_of), col + 0.5, cy.index_select(0, row_of), pixel_ids


def rasterize(
    pix: torch.Tensor,  # [V, N, 3] (x_px, y_px, z_cam) from models.geometry.camera.project
    faces: torch.Tensor,  # [F, 3] int64 vertex indices
    height: int,
    width: int,
    near: float = 1e-3,
    cull: torch.Tensor | None = None,  # [F] bool: faces that may be culled when seen from behind
    skip: torch.Tensor | None = None,  # [F] bool: faces not to draw at all
    capacity: int | None = None,  # fixed candidate count (CUDA-graph safe); None: exact, one host sync
) -> Fragments:
    """Rasterize V projected copies of one mesh into V depth-tested fragment buffers.

    Triangles with a vertex closer than ``near`` are dropped (no clipping), as
    are degenerate ones. Faces flagged in ``cull`` are dropped when they face
    away: their normal (b - a) x (c - a) points away from the camera, i.e. their
    screen-space signed area (x right, y down) is positive. Use it for closed
    surfaces wound outward; the depth test alone would give the same picture.
    """
    if pix.ndim != 3 or pix.shape[-1] != 3:
        raise ValueError(f"expected pix [V, N, 3], got {tuple(pix.shape)}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"expected faces [F, 3], got {tuple(faces.shape)}")
    device = pix.device
    V, F = pix.shape[0], faces.shape[0]
    if V * F >= 2**31:
        raise ValueError(f"expected fewer than 2**31 view-faces, got {V} x {F}")
    tri = pix.index_select(1, faces.reshape(-1)).view(V, F, 3, 3).to(torch.float32)  # [V, F, 3 corners, 3]
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]  # [V, F, 3]
    area = _edge(x[..., 0], y[..., 0], x[..., 1], y[..., 1], x[..., 2], y[..., 2])  # [V, F]
    ok = (z > near).all(-1) & (area.abs() > 1e-9) & (z < _MAX_DEPTH).all(-1)
    if cull is not None:
        ok &= ~(cull[None, :] & (area > 0))
    if skip is not None:
        ok &= ~skip[None, :]
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
    planes = torch.stack([w0_a, w0_b, w0_c, w1_a, w1_b, w1_c, iz_a, iz_b, iz_c]).reshape(9, -1)  # [9, V*F]
    # Per triangle: first pixel id of its box (view, y0, x0) and the box width.
    view_of = torch.arange(V, device=device)[:, None].expand(V, F)
    base = ((view_of * height + y0.to(torch.int64)) * width + x0.to(torch.int64)).reshape(-1)  # [V*F]
    box_w = bw.reshape(-1)  # float32 [V*F]

    # Fixed shapes enumerate every pixel of every triangle's bounding box (needed counts them).
    n_pix = torch.where(ok, bw * bh, torch.zeros_like(bw)).reshape(-1).to(torch.int64)  # [V*F]
    ends = torch.cumsum(n_pix, 0)
    first = ends - n_pix
    needed = ends[-1]
    zbuf = torch.full((V * height * width,), _EMPTY, dtype=torch.int64, device=device)
    if capacity is None:
        # Exact: per box row, only the columns the edge functions allow (host syncs).
        rows = torch.where(ok, bh, torch.zeros_like(bh)).reshape(-1).to(torch.int64)  # [V*F]
        row_base = (view_of * height + y0.to(torch.int64)).reshape(-1) * width  # [V*F] pixel id of (view, y0, 0)
        tri_of, cx, cy, pixel_ids = _row_spans(planes, rows, x0.reshape(-1), x1.reshape(-1), y0.reshape(-1),
                                               row_base, width, height)
        if tri_of.numel() > 0:
            zbuf.scatter_reduce_(0, pixel_ids, _keys(planes, tri_of, cx, cy), reduce="amin", include_self=True)
    elif capacity > 0:
        # Candidate c belongs to triangle tri_of[c] and is its local-th box pixel (row-major within the box).
        cand = torch.arange(capacity, device=device)
        tri_of = torch.searchsorted(ends, cand, right=True).clamp_(max=V * F - 1)
        valid = cand < needed
        local = (cand - first.index_select(0, tri_of)).to(torch.float32)
        # Row and column inside the box; float32 division is exact here (box area < 2**24).
        w_c = box_w.index_select(0, tri_of)
        row = torch.floor((local + 0.5) / w_c)
        col = local - row * w_c
        x0c = x0.reshape(-1).index_select(0, tri_of)
        y0c = y0.reshape(-1).index_select(0, tri_of)
        cx = x0c.add_(col).add_(0.5)
        cy = y0c.add_(row).add_(0.5)
        keys = _keys(planes, tri_of, cx, cy, valid)
        pixel_ids = base.index_select(0, tri_of) + (row * width + col).to(torch.int64)
        # Spare candidates carry an empty key (a no-op), spread over all pixels: no atomic contention.
        pixel_ids = torch.where(valid, pixel_ids, cand % (V * height * width))
        zbuf.scatter_reduce_(0, pixel_ids, keys, reduce="amin", include_self=True)

    # Resolve: barycentrics from the winning face's planes; the covered pixels only, or
    # every pixel (fixed shapes) in capacity mode.
    n = V * height * width
    if capacity is None:
        # Each covered pixel's view, row and column as the search lists them (no division needed).
        view, row, col = (zbuf != _EMPTY).view(V, height, width).nonzero().unbind(1)  # [P] each
        pixels = (view * height + row) * width + col  # [P] flat (view, row, col)
        winner = zbuf.index_select(0, pixels) & 0xFFFFFFFF  # [P] view * F + face
        hit = None
    else:
        pixels = None
        hit = zbuf != _EMPTY
        winner = torch.where(hit, zbuf & 0xFFFFFFFF, torch.zeros_like(zbuf))
        row, col = _divmod(torch.arange(n, device=device), width)
        if V > 1:  # row is view * height + row
            row = row - torch.floor(row / height) * height
    col = col.to(torch.float32) + 0.5
    row = row.to(torch.float32) + 0.5
    pl = planes.index_select(1, winner)  # [9, P]
    b0 = torch.addcmul(pl[2], pl[0], col).addcmul_(pl[1], row).clamp_(0, 1)
    b1 = torch.addcmul(pl[5], pl[3], col).addcmul_(pl[4], row).clamp_(0, 1)
    b2 = (1.0 - b0 - b1).clamp_(min=0)
    # Perspective-correct: weight each screen barycentric by that corner's 1/z.
    persp = torch.stack([b0, b1, b2], -1) * iz.reshape(-1, 3).index_select(0, winner)  # [P, 3]
    inv_zp = persp.sum(-1, keepdim=True).clamp_(min=1e-12)
    bary_p = persp / inv_zp
    face_px = winner if V == 1 else _divmod(winner, F)[1].to(torch.int64)  # one view: the winner is the face
    if hit is None:
        face_id = torch.full((n,), -1, dtype=torch.int64, device=device).index_copy_(0, pixels, face_px)
        depth = torch.zeros((n,), dtype=torch.float32, device=device).index_copy_(0, pixels, 1.0 / inv_zp[:, 0])
    else:
        bary_p = bary_p * hit[:, None]
        face_id = torch.where(hit, face_px, torch.full_like(face_px, -1))
        depth = torch.where(hit, 1.0 / inv_zp[:, 0], torch.zeros_like(inv_zp[:, 0]))
    return Fragments(
        face_id=face_id.reshape(V, height, width),
        depth=depth.reshape(V, height, width),
        pixels=pixels,
        winner=winner,
        face_px=face_px,
        bary_px=bary_p,
        needed=needed,
    )


def interpolate(
    attrs: torch.Tensor,  # [V, N, C] per-view vertex attributes, or [N, C] shared by all views
    faces: torch.Tensor,  # [F, 3]
    frags: Fragments,
) -> torch.Tensor:
    """Perspective-correct interpolation of vertex attributes: returns [V, H, W, C] (0 where empty)."""
    V, H, W = frags.face_id.shape
    C = attrs.shape[-1]
    px = interpolate_pixels(attrs, faces, frags)
    if frags.pixels is None:  # dense: every pixel resolved, empty ones with zero weights
        return px.reshape(V, H, W, C)
    out = torch.zeros((V * H * W, C), dtype=attrs.dtype, device=attrs.device)
    out[frags.pixels] = px
    return out.reshape(V, H, W, C)


def interpolate_pixels(
    attrs: torch.Tensor,  # [V, N, C] per-view vertex attributes, or [N, C] shared by all views
    faces: torch.Tensor,  # [F, 3]
    frags: Fragments,
) -> torch.Tensor:
    """:func:`interpolate` at the resolved pixels only: [P, C], row p at ``frags.pixels[p]`` (every
    pixel in view, row, column order when ``frags.pixels`` is None)."""
    V = frags.face_id.shape[0]
    if attrs.ndim not in (2, 3) or (attrs.ndim == 3 and attrs.shape[0] != V):
        raise ValueError(f"expected attrs [V={V}, N, C] or [N, C], got {tuple(attrs.shape)}")
    N, C = attrs.shape[-2], attrs.shape[-1]
    # Each corner's row in the [N, C] table (or the flattened [V * N, C] one).
    corner = faces.index_select(0, frags.face_px)  # [P, 3]
    table = attrs
    if attrs.ndim == 3:
        view = _divmod(frags.winner, faces.shape[0])[0].to(torch.int64)
        corner = corner + (view * N)[:, None]
        table = attrs.reshape(V * N, C)
    return weighted_rows(table, corner, frags.bary_px.to(attrs.dtype))


def weighted_rows(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[P, C]: row p is sum over k of weights[p, k] * table[index[p, k]] (table [N, C], index [P, K] int64,
    weights [P, K]): barycentric interpolation of per-vertex or per-corner values.

    On the CPU one ``embedding_bag`` (3-5x faster than K gathers and fused multiply-adds: the gathered
    rows are never written out); elsewhere K gathers and fused multiply-adds (the kernels the CUDA graphs
    were measured with). Both sum the products in corner order."""
    if index.ndim != 2 or weights.shape != index.shape or table.ndim != 2:
        raise ValueError(f"expected table [N, C], index and weights [P, K], got {tuple(table.shape)}, "
                         f"{tuple(index.shape)}, {tuple(weights.shape)}")
    if table.device.type == "cpu":
        return torch.nn.functional.embedding_bag(index, table, per_sample_weights=weights.contiguous(), mode="sum")
    return _gathered_rows(table, index, weights)


def _gathered_rows(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`weighted_rows` as K gathers and fused multiply-adds (its path off the CPU)."""
    rows = table.index_select(0, index[:, 0]) * weights[:, 0:1]
    for k in range(1, index.shape[1]):
        rows = torch.addcmul(rows, table.index_select(0, index[:, k]), weights[:, k : k + 1])
    return rows
