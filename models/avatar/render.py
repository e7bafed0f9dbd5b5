"""Rendering an avatar at orbit poses (render_views) or at any cameras (render_cameras):
raster, projective and fill texture, and the per-pixel shadow-map test."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.avatar.texture import box_mean
from models.avatar.types import VATTR, Avatar, RenderOutput
from models.avatar.visibility import max_filter3x3, seen_fraction
from models.geometry.camera import OrbitPose, project
from models.geometry.raster import Fragments, interpolate_pixels, rasterize, weighted_rows

__all__ = ["face_detail_fade", "render_cameras", "render_views", "shell_detail_fade", "stretch_ratio", "texture_quality",
           "view_angle_deg"]


_CONSTANTS: dict[tuple, torch.Tensor] = {}
# The source's texture is worth its detail up to this stretch of one direction against the
# other (texture_quality), and nothing from the second (a streak of a few source pixels).
_STRETCH = (1.5, 3.0)
# Past that limit, up to this one, the source's texture still gives its low-pass colour (a box mean of _STRETCHED_POOL
# texels: no streak survives it) to views within _STRETCHED_DEG of the source's direction (all of it up to the first
# angle, none from the second), before the mirror side and the fill: the near side of a head turned up to 20-35 degrees shows
# the hair and skin the source saw at a grazing angle instead of the fill colour (on the validation clips identity
# distance 0.391 -> 0.387, landmark error 1.68 -> 1.59 % IOD; docs/results/eval_multiview.md, twenty-sixth session).
_STRETCHED = (3.0, 6.0)
_STRETCHED_POOL = 2
_STRETCHED_DEG = (20.0, 35.0)
# The shell's texture keeps its detail up to this angle between the source's and the view's
# directions from the head, degrees, and none from the second (shell_detail_fade).
_SHELL_DETAIL_DEG = (8.0, 24.0)
# The face's finest detail fades to a box mean of this many texels (about two render pixels) from the
# first angle to the second (face_detail_fade), as far as Avatar.face_detail says.
_FACE_DETAIL_DEG = (20.0, 45.0)
_FACE_DETAIL_POOL = 4
# Card the head hid in the source, revealed beside the turned shell, takes the colour of the shell's hair within a
# box of this many cells of 2 x 2 pixels a 512-px view (18 pixels; 5 cells, 10 pixels, a 256-px view), as far as the
# shell fills the box: none below the first share, all of it from the second (_continue_hair).
_REVEALED_BOX = 9
_REVEALED_SHARE = (0.05, 0.25)
# Where the source picture cuts the head (the top of the hair out of frame, a tile cut close round it), the shell
# fades out over this share of the crop's side past the cut: beyond it the camera saw nothing to continue.
_BEYOND_PICTURE_RAMP = 0.03
# The appearance memory's weights are eroded softly over a box of 2 r + 1 pixels, r this many a 256-px view (more at
# more pixels): where it takes over from the frame's own texture is a ramp, not an edge that outlines a patch and
# follows each frame's shadow map (docs/memory.md: flicker on the steady stretches 6.14 -> 6.04 x 1000, 6.15 for the
# single frame; head PSNR within 0.03 dB).
_MEMORY_BAND_PER_256 = 4


def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A small float32 constant on the device, uploaded once (CUDA-graph captures may
    not copy from the host)."""
    key = (tuple(values), str(device))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32).to(device)
    return _CONSTANTS[key]


def render_views(avatar: Avatar, poses: Sequence[OrbitPose], size: int) -> RenderOutput:
    """Render the avatar at V orbit cameras, S x S pixels each (one batched raster call).

    Per pixel, a soft shadow-map test against the source-view depth says how much the
    source saw this surface point, and the stretch of the source's texture in this view
    (:func:`texture_quality`) how much its detail is worth: seen, unstretched points take
    their projective texture; the rest blend to the mirror side's texture (face and head) or
    the fill colour, across a band rather than at a switch (and count as unseen in ``seen``);
    in views near the source's, seen points stretched a little more take its low-pass colour first.
    """
    viewmats, Ks = avatar.cameras(poses, size)
    return render_cameras(avatar, viewmats, Ks, size)


def stretch_ratio(pix: torch.Tensor, tex_h: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Per view and triangle [V, F], at least 1: how much the source's texture is stretched in one direction
    more than in the other (:func:`texture_quality` says what that is worth).

    pix [V, N, 3] screen positions (models.geometry.camera.project), tex_h [N, 3] homogeneous
    source pixels (u w, v w, w), faces [F, 3]. Each triangle maps screen to source affinely,
    J = [uv1 - uv0, uv2 - uv0] [x1 - x0, x2 - x0]^-1, whose singular values are
    sigma = sqrt((T -+ sqrt(T^2 - 4 D^2)) / 2), T = |J|_F^2, D = det J. Their ratio is the
    streak factor: a cheek the source saw edge-on and the view sees face-on is a few source
    pixels stretched across many in one direction only, while the source's own view (or a
    zoom) maps texels to pixels alike in every direction (ratio 1)."""
    corners = faces.reshape(-1)
    x = pix[..., :2].index_select(1, corners).view(pix.shape[0], -1, 3, 2)  # [V, F, 3, 2]
    uv = (tex_h[:, :2] / tex_h[:, 2:3].clamp(min=1e-6)).index_select(0, corners).view(-1, 3, 2)  # [F, 3, 2]
    e1, e2 = x[:, :, 1] - x[:, :, 0], x[:, :, 2] - x[:, :, 0]  # [V, F, 2]
    f1, f2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]  # [F, 2]
    det_e = e1[..., 0] * e2[..., 1] - e1[..., 1] * e2[..., 0]
    inv = 1.0 / torch.where(det_e.abs() > 1e-9, det_e, torch.ones_like(det_e))
    # J = F E^-1 with E^-1 = [[e2y, -e2x], [-e1y, e1x]] / det E.
    j00 = (f1[:, 0] * e2[..., 1] - f2[:, 0] * e1[..., 1]) * inv
    j01 = (f2[:, 0] * e1[..., 0] - f1[:, 0] * e2[..., 0]) * inv
    j10 = (f1[:, 1] * e2[..., 1] - f2[:, 1] * e1[..., 1]) * inv
    j11 = (f2[:, 1] * e1[..., 0] - f1[:, 1] * e2[..., 0]) * inv
    T = j00.square() + j01.square() + j10.square() + j11.square()
    D = j00 * j11 - j01 * j10
    root = (T.square() - 4 * D.square()).clamp(min=0).sqrt()
    return ((T + root) / (T - root).clamp(min=1e-12)).sqrt()  # sigma_max / sigma_min


def texture_quality(ratio: torch.Tensor, limits: tuple[float, float] | None = None) -> torch.Tensor:
    """How much the source's texture is worth, in [0, 1], at a :func:`stretch_ratio`: 1 up to limits[0], 0 from
    limits[1] (default _STRETCH)."""
    lo, hi = _STRETCH if limits is None else limits
    return ((hi - ratio) / (hi - lo)).clamp(0.0, 1.0)


def stretched_colour_weight(source_dir: torch.Tensor, pivot: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """Per view [V] in [0, 1]: how far surface stretched past _STRETCH (up to _STRETCHED) takes the source's low-pass
    colour. Streaks, and detail that lands off the turned face's own, grow with the view's angle; near the source's
    view the colour the source saw at a grazing angle (hair at the temple, the side of the cheek) is a better guess
    than the fill. 1 up to _STRETCHED_DEG[0], 0 from _STRETCHED_DEG[1]."""
    lo, hi = _STRETCHED_DEG
    return ((hi - view_angle_deg(source_dir, pivot, viewmats)) / (hi - lo)).clamp(0.0, 1.0)


def view_angle_deg(source_dir: torch.Tensor, pivot: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """Per view [V], degrees: the angle between the directions from the head (pivot [3]) to the
    texture's camera (source_dir [3], unit) and to the view's camera (from viewmats [V, 4, 4],
    world -> camera)."""
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    centre = -(R.transpose(1, 2) @ t[..., None])[..., 0]  # [V, 3] camera centres
    to_view = centre - pivot
    cos = (to_view * source_dir).sum(-1) / to_view.norm(dim=-1).clamp(min=1e-9)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def shell_detail_fade(source_dir: torch.Tensor, pivot: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """Per view [V] in [0, 1]: how far the shell's texture fades to its low-pass copy.

    The shell is a guess at where the hair is, within a centimetre or two of depth, and its
    detail (strands, curls) lands off the real strands by that error times sin(theta), theta the
    view's :func:`view_angle_deg`: a few pixels of a 256-px crop from about 20 degrees, where the
    detail no longer lines up and the low-pass colour is the better guess. The face mesh follows
    the landmarks: its detail fades later and less (:func:`face_detail_fade`).
    0 up to _SHELL_DETAIL_DEG[0], 1 from _SHELL_DETAIL_DEG[1]."""
    lo, hi = _SHELL_DETAIL_DEG
    return ((view_angle_deg(source_dir, pivot, viewmats) - lo) / (hi - lo)).clamp(0.0, 1.0)


def face_detail_fade(source_dir: torch.Tensor, pivot: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """Per view [V] in [0, 1]: how far the face's finest detail fades (times Avatar.face_detail).

    The face mesh follows each picture's landmarks, and two views' landmarks of one face agree to
    2-4 % of the eyes' distance up to 30 degrees apart and to 6-7 % beyond (the eval's landmark
    error): detail a few texels wide (pores, stubble, eyelid and lip edges, the nostrils) then lands
    beside where the turned face has it, each edge drawn twice in the error. A box mean of
    _FACE_DETAIL_POOL texels takes that detail out and keeps the shapes and colours; the expression
    regions keep half of it (models.avatar.topology.FACE_DETAIL_WEIGHTS).
    0 up to _FACE_DETAIL_DEG[0], 1 from _FACE_DETAIL_DEG[1]."""
    lo, hi = _FACE_DETAIL_DEG
    return ((view_angle_deg(source_dir, pivot, viewmats) - lo) / (hi - lo)).clamp(0.0, 1.0)


def _continue_hair(pictures: torch.Tensor, size: int) -> torch.Tensor:
    """The hair the turned head reveals behind its outline: the card there is what the head hid in the source, drawn
    from the low-pass fill of the nearest card the source saw (the hair's lighter fringe, or the background beside
    it), which beside the shell's own hair made a light line along the head's outline over the hair. Each such pixel
    takes the mean colour of the shell's pixels within a box of _REVEALED_BOX (a screen-space continuation of the hair), in
    proportion to the shell's share of that box (_REVEALED_SHARE) and to how little of the pixel the source saw. The
    box means are taken at half the resolution (a smooth colour; a quarter of the work) and read at each pixel's
    half-resolution cell. pictures [V, 7, S, S]: premultiplied RGB, alpha, seen, and the shell's and the
    card's coverage of each pixel; returns the premultiplied RGB [V, 3, S, S] (the face and the shell unchanged).
    On the CPU the card pixels the source did not fully see only (about a tenth of the picture); elsewhere every
    pixel (fixed shapes)."""
    k = max(int(_REVEALED_BOX * size / 512) // 2 * 2 + 1, 3)  # the box at half the resolution
    x = pictures[:, :4] * pictures[:, 5:6]  # the shell's premultiplied RGBA
    x = F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2))  # an odd side: one empty row or column more
    half = (x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]) * 0.25  # [V, 4, S/2, S/2]
    near = box_mean(half, k)
    return (_continue_hair_pixels if pictures.device.type == "cpu" else _continue_hair_everywhere)(pictures, near)


def _continue_hair_everywhere(pictures: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """:func:`_continue_hair` of whole pictures [V, 7, S, S], the shell's box means near [V, 4, S/2, S/2]."""
    rgb, alpha, seen, card = pictures[:, :3], pictures[:, 3:4], pictures[:, 4:5], pictures[:, 6:7]
    H, W = pictures.shape[2:]
    near = F.interpolate(near, scale_factor=2, mode="nearest")[:, :, :H, :W]  # each pixel's cell
    return torch.lerp(rgb, near[:, :3] / near[:, 3:].clamp(min=1e-4) * alpha, _hair_weight(near[:, 3:], seen, card))


def _continue_hair_pixels(pictures: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """:func:`_continue_hair_everywhere` gathered and written at the pixels that may change (card the source did not
    fully see), channel-major like the pictures: the same numbers."""
    rgb, alpha, seen, card = pictures[:, :3], pictures[:, 3:4], pictures[:, 4:5], pictures[:, 6:7]
    V, _, H, W = pictures.shape
    flat = ((card > 0) & (seen < 1)).view(-1).nonzero()[:, 0]  # [E]: (view, row, column) flattened
    v, y, x = flat // (H * W), flat // W % H, flat % W
    h, w = near.shape[2:]
    at = near.transpose(0, 1).reshape(4, -1).index_select(1, (v * h + y // 2) * w + x // 2)  # [4, E]
    a, s, c = (t.reshape(-1).index_select(0, flat) for t in (alpha, seen, card))
    hair = at[:3] / at[3:].clamp(min=1e-4) * a
    out = rgb.transpose(0, 1).reshape(3, -1).clone()  # [3, V H W]
    out.index_copy_(1, flat, torch.lerp(out.index_select(1, flat), hair, _hair_weight(at[3], s, c)))
    return out.view(3, V, H, W).transpose(0, 1)


def _hair_weight(share: torch.Tensor, seen: torch.Tensor, card: torch.Tensor) -> torch.Tensor:
    """How much of the shell's nearby hair a pixel takes (:func:`_continue_hair`)."""
    lo, hi = _REVEALED_SHARE
    return ((share - lo) / (hi - lo)).clamp(0.0, 1.0) * (1.0 - seen) * card


def _smooth_edges(both: torch.Tensor, covered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Anti-aliased silhouettes: where alpha jumps by more than 1/2 within a 3x3 neighbourhood
    (a mesh edge against the background; the person mask's own edges are soft), the
    premultiplied colour and the alpha become their 3x3 means; a pixel no triangle covers
    stays below 1/2 (its depth is empty). both [V, 4, S, S] premultiplied RGBA (on the CPU
    written in place), covered [V, S, S] bool; returns the colour [V, 3, S, S] and alpha [V, 1, S, S].
    On the CPU the edge pixels only (:func:`_smooth_edge_pixels`, a few percent of the picture);
    elsewhere every pixel (:func:`_smooth_every_pixel`: fixed shapes)."""
    edge = _silhouette_edges(both[:, 3:])
    both = _smooth_edge_pixels(both, edge, covered) if both.device.type == "cpu" else _smooth_every_pixel(both, edge, covered)
    return both[:, :3], both[:, 3:]


def _silhouette_edges(alpha: torch.Tensor) -> torch.Tensor:
    """[V, 1, S, S] bool: where alpha [V, 1, S, S] jumps by more than 1/2 within a 3x3 neighbourhood."""
    spans = max_filter3x3(torch.cat([alpha, -alpha], 1))  # [V, 2, S, S]: the 3x3 maximum and -minimum
    return (spans[:, :1] + spans[:, 1:]) > 0.5


def _edge_cap(mean: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """The factor [..., 1, ...] that keeps an uncovered pixel's alpha at most 1/2: mean [..., 4, ...]
    premultiplied RGBA (alpha last), covered bool broadcastable to its alpha."""
    a = mean[:, 3:]
    return torch.where(covered, torch.ones_like(a), (0.5 / a.clamp(min=1e-6)).clamp(max=1.0))


def _smooth_every_pixel(both: torch.Tensor, edge: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """:func:`_smooth_edges` of premultiplied RGBA both [V, 4, S, S] as whole pictures: the 3x3 mean
    everywhere, kept at the edge pixels edge [V, 1, S, S] (every pixel off them keeps its cap of 1)."""
    both = torch.where(edge, box_mean(both, 3), both)
    return both * _edge_cap(both, covered[:, None])


def _smooth_edge_pixels(both: torch.Tensor, edge: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """:func:`_smooth_every_pixel` at the edge pixels only, in place: each one's 3x3 mean summed
    directly (edge pixels averaged over what lies inside) instead of from the whole picture's running
    sums (:func:`models.avatar.texture.box_mean`), equal to float rounding. Off the edge the cap is 1:
    an uncovered pixel there has alpha 0."""
    V, C, H, W = both.shape
    v, y, x = edge[:, 0].nonzero().unbind(1)  # [E] each
    d = torch.arange(-1, 2, device=both.device)
    yy, xx = (y[:, None] + d)[:, :, None], (x[:, None] + d)[:, None, :]  # [E, 3, 1], [E, 1, 3]
    inside = ((yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)).view(-1, 9)  # [E, 9]
    flat = ((v[:, None, None] * H + yy.clamp(0, H - 1)) * W + xx.clamp(0, W - 1)).view(-1)  # [E 9] (view, row, col)
    pictures = both.transpose(0, 1).reshape(C, V * H * W)  # a view for one view
    nb = pictures.index_select(1, flat).view(C, -1, 9) * inside  # [C, E, 9], 0 outside the picture
    mean = (nb.sum(-1) / inside.sum(-1).to(both.dtype)).t()  # [E, C]
    both.view(V, C, H * W)[v, :, y * W + x] = mean * _edge_cap(mean, covered[v, y, x][:, None])
    return both


def _grid(h: torch.Tensor, span: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample positions [B, h, w, 2] of per-pixel homogeneous source pixels h [B, h, w, 3]
    (u w, v w, w) in a picture of ``span`` = (H, W) source pixels, and those pixels (u, v) [B, h, w, 2]."""
    w = h[..., 2:3].clamp(min=1e-6)
    uv = h[..., :2] / w
    return torch.stack([2 * uv[..., 0] / span[1] - 1, 2 * uv[..., 1] / span[0] - 1], -1), uv


def _lookup(texture: torch.Tensor, grid: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """Bilinear lookups [B, C, h, w] of texture [1, C, Ht, Wt] at grid [B, h, w, 2] (:func:`_grid`)."""
    return F.grid_sample(texture.expand(grid.shape[0], -1, -1, -1), grid, mode="bilinear", padding_mode=padding,
                         align_corners=False)


def _sample_memory(avatar: Avatar, frags: Fragments) -> torch.Tensor:
    """The appearance memory [V, 6, S, S] (RGB lit as now, alpha, weights under and over the frame's own texture) at each pixel's atlas
    position: its triangle's corner positions (avatar.memory_uv) weighted by its barycentrics. The colour is a mean over the
    texels the memory saw (premultiplied by their coverage, divided by it here); the weights fade where it saw nothing."""
    return _memory_at(avatar, frags.face_id.clamp(min=0), frags.bary)


def _memory_band(memory: torch.Tensor, px: "_Pixels") -> torch.Tensor:
    """The memory at the pixels [B, 6, h, w] (:func:`_memory_at`) with its two weights (under and over the frame's own
    texture) eroded softly: each the least of itself and its box mean over the band round it. Within what the memory
    saw, its weights ramp up from the edge instead of stepping; beyond it they stay 0 (no colour is there)."""
    r = max(1, round(_MEMORY_BAND_PER_256 * px.picture_face.shape[-1] / 256))
    band = px.from_pictures(box_mean(px.to_pictures(memory[:, 4:6]), 2 * r + 1))
    return torch.cat([memory[:, :4], torch.minimum(memory[:, 4:6], band)], 1)


def _memory_at(avatar: Avatar, face: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """:func:`_sample_memory` at pixels of any layout: face [B, h, w] (0 where empty), bary [B, h, w, 3];
    returns [B, 6, h, w]."""
    B, h, w = face.shape
    corner = face.reshape(-1, 1) * 3 + torch.arange(3, device=face.device)  # [B h w, 3]
    grid = weighted_rows(avatar.memory_uv.reshape(-1, 2), corner, bary.reshape(-1, 3)).reshape(B, h, w, 2)
    m = F.grid_sample(avatar.memory.expand(B, -1, -1, -1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.cat([(m[:, :4] / m[:, 6:7].clamp(min=1e-6)).clamp(0.0, 1.0), m[:, 4:6]], 1)


@dataclass
class _Pixels:
    """The pixels a render shades, laid out as pictures [B, h, w]: every pixel of the V views
    ([V, S, S]), or, where the raster listed the covered pixels (the CPU's exact mode), those only
    ([1, 1, P]: one picture one row of P pixels tall). The per-pixel maths is the same element by
    element in both; neighbourhood filters run on whole pictures (:meth:`from_pictures`,
    :meth:`to_pictures`)."""

    frags: Fragments
    face: torch.Tensor  # [B, h, w] int64, each pixel's face (0 where empty)
    bary: torch.Tensor  # [B, h, w, 3] its barycentrics (0 where empty)
    covered: torch.Tensor | None  # [B, h, w] bool; None: all (the covered pixels only)
    picture_face: torch.Tensor  # [V, S, S] int64, every pixel's face (0 where empty)
    view: torch.Tensor | None  # [B, h, w] int64 each pixel's view; None: its picture's (B = V, or one view)

    @staticmethod
    def of(frags: Fragments) -> "_Pixels":
        V, S, _ = frags.face_id.shape
        face = frags.face_id.clamp(min=0)
        if frags.pixels is None:
            return _Pixels(frags, face, frags.bary, frags.mask, face, None)
        P = frags.pixels.shape[0]
        view = None if V == 1 else (frags.pixels // (S * S)).view(1, 1, P)
        return _Pixels(frags, frags.face_px.view(1, 1, P), frags.bary_px.view(1, 1, P, 3), None, face, view)

    def interpolate(self, attrs: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """Vertex attributes [N, C] at the pixels: [B, h, w, C]. The covered pixels' are stored
        attribute-major (each attribute's values contiguous, as the maths reads them)."""
        rows = interpolate_pixels(attrs, faces, self.frags)  # [P, C]
        if self.covered is None:
            rows = _attribute_major(rows)
        return rows.view(*self.face.shape, -1)

    def per_view(self, x: torch.Tensor) -> torch.Tensor:
        """Per-view values x [V] at the pixels, broadcastable to [B, 1, h, w]."""
        return x[:, None, None, None] if self.view is None else x[self.view][:, None]

    def from_pictures(self, x: torch.Tensor) -> torch.Tensor:
        """Pictures x [V, C, S, S] at the pixels: [B, C, h, w]."""
        if self.covered is not None:
            return x
        V, C = x.shape[:2]
        return x.transpose(0, 1).reshape(C, -1).index_select(1, self.frags.pixels)[None, :, None]

    def to_pictures(self, x: torch.Tensor) -> torch.Tensor:
        """Values x [B, C, h, w] at the pixels as pictures [V, C, S, S], 0 where not covered."""
        if self.covered is not None:
            return x
        V, S, W = self.frags.face_id.shape
        C = x.shape[1]
        out = x.new_zeros((C, V * S * W)).index_copy_(1, self.frags.pixels, x.reshape(C, -1))
        return out.view(C, V, S, W).transpose(0, 1)


def _attribute_major(rows: torch.Tensor) -> torch.Tensor:
    """rows [P, C] stored attribute-major (strides (1, P)): the same values. On the CPU numpy's transposing
    copy (about twice as fast there as torch's strided copy; tensors that need no gradient), elsewhere torch's."""
    if rows.device.type == "cpu" and not rows.requires_grad:
        return torch.from_numpy(np.ascontiguousarray(rows.numpy().T)).t()
    return rows.t().contiguous().t()


def _unpremultiply(rgba: torch.Tensor) -> torch.Tensor:
    """Colour [V, 3, S, S] of premultiplied RGBA [V, 4, S, S] (black where the alpha is 0)."""
    return (rgba[:, :3] / rgba[:, 3:].clamp(min=1e-4)).clamp(0.0, 1.0)


def _picture_fade(uv: torch.Tensor, span: tuple[float, float], ramp: torch.Tensor) -> torch.Tensor:
    """[V, S, S]: 0 outside the source picture, rising to 1 at ``ramp`` pixels inside its border
    (the picture's edge cuts the torso: it fades out instead of ending in a straight line)."""
    H, W = span
    inside = torch.minimum(torch.minimum(uv[..., 0], W - uv[..., 0]), torch.minimum(uv[..., 1], H - uv[..., 1]))
    return (inside / ramp).clamp(0.0, 1.0)


def _beyond_picture_fade(uv: torch.Tensor, span: tuple[float, float], ramp: torch.Tensor) -> torch.Tensor:
    """[V, S, S]: 1 inside the source picture, falling to 0 at ``ramp`` pixels outside its border (a head cut by the
    frame: its shell fades out past the cut instead of closing in a flat dome the camera never saw). The fall starts
    a pixel inside the border, where the picture's last texels already blend with nothing."""
    H, W = span
    inside = torch.minimum(torch.minimum(uv[..., 0], W - uv[..., 0]), torch.minimum(uv[..., 1], H - uv[..., 1]))
    return (1.0 + (inside - 1.0) / ramp).clamp(0.0, 1.0)


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
    # Per pixel: [B, h, w] = [V, S, S] (every pixel), or [1, 1, P] (the covered ones: CPU).
    px = _Pixels.of(frags)
    vals = px.interpolate(avatar.vattr, avatar.faces)  # [B, h, w, VATTR.COUNT]
    span = avatar.tex_span
    own_grid, uv = _grid(vals[..., VATTR.TEX], span)
    tex_p = _lookup(avatar.texture, own_grid)  # [B, 4, h, w] projective texture
    # The fill texture continues past the picture's edge (a head cut by the frame stays whole).
    tex_f = _lookup(avatar.texture_fill, _grid(vals[..., VATTR.FILL], span)[0], "border")
    tex_m = _lookup(avatar.texture, _grid(vals[..., VATTR.MIRROR], span)[0])
    part = avatar.part.index_select(0, px.face.reshape(-1)).view(px.face.shape)  # [B, h, w]
    head = part <= 1
    seen = seen_fraction(vals[..., 2], avatar.src_depth, avatar.src_depth_K, uv[..., 0], uv[..., 1], pooled=~head)
    # The head is opaque: its own texture where seen, not stretched and on the person, else
    # the mirror side's (lit as this side: the low-frequency ratio), else the fill texture.
    on_person = ((tex_p[:, 3] - 0.45) / 0.4).clamp(0.0, 1.0)
    # Per pixel from its triangle, smoothed over 5x5 pixels (a band, not a switch at triangle edges).
    ratio = stretch_ratio(pix, avatar.vattr[:, VATTR.TEX], avatar.faces).reshape(-1)  # [V * F]
    F_ = avatar.faces.shape[0]
    view = torch.arange(V, device=pix.device)[:, None, None] * F_
    face_id = px.picture_face  # [V, S, S]
    # With the stretched texture's weight and the face's detail weight below: one 5x5 box mean of three pictures.
    table = torch.stack([texture_quality(ratio), texture_quality(ratio, _STRETCHED), avatar.face_detail.repeat(V)])
    painted = table.index_select(1, (view + face_id).reshape(-1)).view(3, *face_id.shape).transpose(0, 1)  # [V, 3, S, S]
    smooth = px.from_pictures(box_mean(painted, 5))
    quality = smooth[:, 0]  # [B, h, w]
    w_own = seen * quality * torch.where(head, on_person, torch.ones_like(on_person))
    w_mirror = vals[..., VATTR.MIRROR_Q] * ((tex_m[:, 3] - 0.3) / 0.4).clamp(0.0, 1.0)
    own = _unpremultiply(tex_p)
    # As the view turns from the source, the face's finest detail fades to a box mean of the texture
    # (per triangle as far as avatar.face_detail says, smoothed over 5x5 pixels) and the shell's detail
    # to the low-pass texture (tex_f: for surface the source saw, the fill texture at the same source pixel).
    coarse = _lookup(F.avg_pool2d(avatar.texture, _FACE_DETAIL_POOL, ceil_mode=True), own_grid)
    weight = smooth[:, 2:]  # [B, 1, h, w]
    fade = px.per_view(face_detail_fade(avatar.source_dir, avatar.pivot, viewmats)) * weight
    own = torch.lerp(own, _unpremultiply(coarse), fade)
    fade = px.per_view(shell_detail_fade(avatar.source_dir, avatar.pivot, viewmats)) * (part == 1)[:, None]
    own = torch.lerp(own, tex_f[:, :3], fade)
    mirrored = _unpremultiply(tex_m) * vals[..., VATTR.RATIO].permute(0, 3, 1, 2)
    fill_rgb = vals[..., VATTR.FILL_RGB].permute(0, 3, 1, 2)  # per-vertex colours: smooth, no streaks
    unseen = torch.lerp(fill_rgb, mirrored.clamp(0.0, 1.0), w_mirror[:, None])
    # Seen surface a little too stretched for its detail: near the source's view, its low-pass colour before the rest.
    w_stretched = seen * smooth[:, 1] * torch.where(head, on_person, torch.ones_like(on_person))  # [B, h, w]
    w_stretched = w_stretched[:, None] * px.per_view(stretched_colour_weight(avatar.source_dir, avatar.pivot, viewmats))
    stretched = _lookup(F.avg_pool2d(avatar.texture, _STRETCHED_POOL, ceil_mode=True), own_grid)
    unseen = torch.lerp(unseen, _unpremultiply(stretched), w_stretched)
    memory = None if avatar.memory is None else _memory_band(_memory_at(avatar, px.face, px.bary), px)  # [B, 6, h, w]
    if memory is not None:  # what earlier frames saw well, before the mirror side and the fill
        unseen = torch.lerp(unseen, memory[:, :3], memory[:, 4:5])
    head_rgb = torch.lerp(unseen, own, w_own[:, None])
    if memory is not None:  # and over the frame's own texture where they saw it better than this frame
        head_rgb = torch.lerp(head_rgb, memory[:, :3], memory[:, 5:6])
    # The card takes the person's matte as alpha and fades out at the picture's edge.
    ramp = 0.04 * avatar.source_focal_px / avatar.crop_K[0, 0]  # 4 % of the crop side, source pixels
    # Where the card point lies in the picture, whatever colours it. In front of the far layer
    # (one layer deep: a card that faded would show the flat background) both just end there.
    in_pic = (uv[..., 0] >= 0) & (uv[..., 0] <= span[1]) & (uv[..., 1] >= 0) & (uv[..., 1] <= span[0])
    fade = in_pic.float()
    if avatar.config.background == "remove":
        fade = torch.where(part == 2, _picture_fade(uv, span, ramp), fade)
    card = torch.cat([tex_f[:, :3] * tex_f[:, 3:], tex_f[:, 3:]], 1)
    if memory is not None:
        card = torch.lerp(card, torch.cat([memory[:, :3] * memory[:, 3:4], memory[:, 3:4]], 1), memory[:, 4:5])
    card = torch.lerp(card, tex_p, w_own[:, None])
    card = card * fade[:, None]  # [B, 4, h, w] premultiplied
    opacity = vals[..., VATTR.OPACITY]
    weight = (opacity if px.covered is None else opacity * px.covered)[:, None]
    # The face mesh is opaque; the shell too, up to a little past the picture's edge (_BEYOND_PICTURE_RAMP).
    beyond = _BEYOND_PICTURE_RAMP * avatar.source_focal_px / avatar.crop_K[0, 0]  # source pixels
    solid = torch.where(part == 1, _beyond_picture_fade(uv, span, beyond), 1.0)[:, None]  # [B, 1, h, w]
    premultiplied = torch.where(head[:, None], head_rgb * solid, card[:, :3]) * weight
    alpha = torch.where(head[:, None], solid, card[:, 3:]) * weight
    drawn = in_pic if px.covered is None else px.covered & in_pic
    seen = (seen * drawn.float() * vals[..., VATTR.GRAZING]).clamp(0, 1)[:, None]
    # Whole pictures again [V, 7, S, S] (0 where nothing is drawn): the premultiplied RGBA for the
    # silhouettes' 3x3 filters, seen, and the shell's and the card's coverage for the hair's continuation.
    parts = torch.stack([part == 1, part == 2], 1)  # the shell, the card
    pictures = px.to_pictures(torch.cat([premultiplied, alpha.clamp(0, 1), seen, parts.float() * weight], 1))
    pictures = torch.cat([_continue_hair(pictures, size), pictures[:, 3:]], 1)
    premultiplied, alpha = _smooth_edges(pictures[:, :4], frags.mask)
    seen = pictures[:, 4:5]
    bg = _constant(avatar.config.bg_color, avatar.device)[None, :, None, None]
    rgb = premultiplied + bg * (1 - alpha)
    # Where nothing opaque is drawn the picture shows the flat background: nothing was invented.
    seen = torch.where(alpha < 0.02, torch.ones_like(seen), seen)
    return RenderOutput(rgb=rgb.clamp(0, 1), alpha=alpha, depth=frags.depth[:, None], seen=seen,
                        needed=frags.needed)
