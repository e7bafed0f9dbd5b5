"""The avatar's colours: the projective RGBA texture and its low-pass fill copy, the fill
texture coordinates of surface the source did not see, and the card cells left transparent."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.avatar.geometry import area_pool, incident_sum
from models.avatar.plan import BuildPlan, reduction_factor
from models.avatar.topology import MeshConstants

__all__ = ["box_mean", "decontaminate", "fill_hidden_card", "fill_hidden_shell", "fill_texture", "lighting_ratio", "rgba_texture", "shading",
           "sample_vertices", "diffuse_colours", "transparent_card_faces"]


def rgba_texture(image_t: torch.Tensor, alpha_t: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """RGBA texture [1, 4, h, w] in [0, 1] on the device: the picture and its alpha (not
    premultiplied), downsampled (antialiased) to ``size`` (None: as is). image_t [3, H, W]: float in
    [0, 1], or the picture's uint8 bytes (any strides: a permuted H x W x 3 picture), divided by 255 as
    they are copied in (the same numbers as ``image.float() / 255``, one pass); alpha_t [1, H, W]."""
    C, H, W = image_t.shape
    rgba = torch.empty((1, C + alpha_t.shape[0], H, W), dtype=alpha_t.dtype, device=alpha_t.device)
    if image_t.dtype == torch.uint8:
        torch.div(image_t, 255.0, out=rgba[0, :C])
    else:
        rgba[0, :C].copy_(image_t)
    rgba[0, C:].copy_(alpha_t)
    if size is not None:
        rgba = F.interpolate(rgba, size=size, mode="bilinear", antialias=True, align_corners=False)
    return rgba


_BOX_COUNTS: dict[tuple, torch.Tensor] = {}  # box_mean's window sizes on the CPU, by (picture size, k, dtype)


def box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k box mean of [B, C, H, W] (k odd), stride 1, edge pixels averaged over what lies
    inside (avg_pool2d with count_include_pad=False). On the CPU: running sums along each axis,
    a difference of two cumulative sums (about 2.5x faster than avg_pool2d there); elsewhere
    avg_pool2d itself (one kernel instead of about a dozen: the GPU's avatar is launch-bound)."""
    r = k // 2
    if x.device.type != "cpu":
        return F.avg_pool2d(x, k, stride=1, padding=r, count_include_pad=False)

    def window_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = t.shape[dim]
        pad = [0, 0] * (3 - dim) + [r + 1, r]  # F.pad lists the last dimension first
        c = F.pad(t, pad).cumsum(dim)
        return c.narrow(dim, k, n) - c.narrow(dim, 0, n)

    key = (tuple(x.shape[2:]), k, x.dtype)
    count = _BOX_COUNTS.get(key)
    if count is None:  # how many pixels each window holds: the same for every picture of this size
        count = _BOX_COUNTS[key] = window_sum(window_sum(x.new_ones((1, 1) + key[0]), 3), 2)
    return window_sum(window_sum(x, 3), 2) / count


def _max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k maximum of [B, C, H, W] (k odd), stride 1, separable. On the CPU the maxima of k shifted
    copies along each axis (the same numbers as max_pool2d, about 4x faster there); elsewhere two
    max-pool passes (two kernels)."""
    r = k // 2
    if x.device.type != "cpu":
        x = F.max_pool2d(x, (1, k), stride=1, padding=(0, r))
        return F.max_pool2d(x, (k, 1), stride=1, padding=(r, 0))
    for dim in (3, 2):
        n = x.shape[dim]
        padded = F.pad(x, (r, r, 0, 0) if dim == 3 else (0, 0, r, r), value=float("-inf"))
        x = padded.narrow(dim, 0, n)
        for i in range(1, k):
            x = torch.maximum(x, padded.narrow(dim, i, n))
    return x


def _half_mean(x: torch.Tensor) -> torch.Tensor:
    """2 x 2 mean of [B, C, H, W], stride 2 (avg_pool2d(x, 2, ceil_mode=True): an odd last row or column is
    averaged over what lies inside). On the CPU with even sides the sum of four strided views (about 3x faster
    there; equal to float rounding); elsewhere avg_pool2d."""
    if x.device.type != "cpu" or x.shape[-1] % 2 or x.shape[-2] % 2:
        return F.avg_pool2d(x, 2, ceil_mode=True)
    return (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2]) * 0.25


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Two 5x5 box passes (reach four cells), edge cells averaged over what lies inside."""
    return box_mean(box_mean(x, 5), 5)


def decontaminate(texture: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The person's colours and a matte alpha at the edge of the person mask, as keying does.

    texture [1, 4, h, w] RGBA in [0, 1] (A = the segmentation mask, soft and often a few
    texels loose); size: (h', w') of a statistics grid of a few texels a cell. Near the
    mask's edge the local background colour B and its spread s (RMS over RGB) come from
    the cells two cells outside the mask, and the local person colour F from the cells two
    cells inside it (normalised convolutions over about four cells). Where the background
    is plain (|F - B| > 3 s: a screen, a wall):

    - matte: a texel within the background's own spread of B is background, whatever the
      mask says: alpha = min(mask, clamp((|I - B| / (s + 0.02) - 1) / 1.5)), so a loose
      mask's rim of background leaves the person's edge (slightly eroded);
    - spill: light from a coloured background (a green screen) tints the person's edge
      along the background's chroma c = B - mean(B); the part of a texel's chroma along c
      beyond what F shows there is removed (a keyer's despill, for any background colour).

    Far from the edge, or in front of a busy background, the texture is unchanged. The
    corrections are worked out at half the texture's resolution and added back resampled
    (they vary smoothly; the CPU build spends a third of the time).
    """
    full = texture
    texture = _half_mean(full)
    rgb, m = texture[:, :3], texture[:, 3:]
    # RGB, mask, |RGB|^2 [1, 5, h', w'] (pooled apart: no copy of the texture to pool it with |RGB|^2)
    small = torch.cat([F.adaptive_avg_pool2d(texture, size), F.adaptive_avg_pool2d(rgb.square().sum(1, keepdim=True), size)], 1)
    inner = -_max_filter(-small[:, 3:4], 5)  # the mask eroded by two cells
    outer = 1.0 - _max_filter(small[:, 3:4], 5)  # the background eroded by two cells
    deep = -_max_filter(-small[:, 3:4], 9)  # the mask eroded by four cells
    wf, wb = inner.square(), outer.square()
    stats = _blur(torch.cat([small[:, :3] * wf, wf, small[:, :3] * wb, small[:, 4:5] * wb, wb], 1))  # [1, 9, h', w']
    fg = stats[:, 0:3] / stats[:, 3:4].clamp(min=1e-4)
    have = (stats[:, 3:4] / 0.01).clamp(max=1.0) * (stats[:, 8:9] / 0.01).clamp(max=1.0)
    # The background's mean and mean |I|^2, carried into the person (push-pull) so that every
    # cell has them to resample: B and its spread s (RMS over RGB).
    b = _push_pull(stats[:, 4:9])  # [1, 4, h', w']
    bg = b[:, :3]
    spread = (b[:, 3:4] - bg.square().sum(1, keepdim=True)).clamp(min=0).sqrt()
    plain = (((fg - bg).square().sum(1, keepdim=True).sqrt() / (spread + 0.02) - 3.0) / 3.0).clamp(0.0, 1.0)
    matte_weight = have * plain * ((1.0 - inner) * 3.0).clamp(max=1.0)
    # Despill along the background's chroma direction c (a unit vector; its components sum to 0).
    chroma = bg - bg.mean(1, keepdim=True)
    norm = chroma.square().sum(1, keepdim=True).sqrt()
    c = chroma / norm.clamp(min=1e-4)
    along_fg = (fg * c).sum(1, keepdim=True).clamp(min=0.0)
    screen = ((norm / (spread + 0.02) - 2.0) / 2.0).clamp(0.0, 1.0) * ((norm - 0.1) / 0.08).clamp(0.0, 1.0)
    spill_weight = have * screen * ((1.0 - deep) * 2.0).clamp(max=1.0)
    # Per texel, with the local statistics resampled to the texture.
    local = F.interpolate(torch.cat([bg, c, spread, along_fg, matte_weight, spill_weight], 1), size=texture.shape[-2:],
                          mode="bilinear", align_corners=False)  # [1, 10, h, w]
    bg, c, spread, along_fg, matte_weight, spill_weight = local.split([3, 3, 1, 1, 1, 1], 1)
    distance = (rgb - bg).square().sum(1, keepdim=True).sqrt() / (spread + 0.02)
    matte = ((distance - 1.0) / 1.5).clamp(0.0, 1.0)
    alpha = m - matte_weight * (m - torch.minimum(m, matte))
    along = (rgb * c).sum(1, keepdim=True)
    colour = (rgb - spill_weight * (along - along_fg).clamp(min=0.0) * c).clamp(0.0, 1.0)
    change = torch.empty_like(texture)  # [1, 4, h, w]
    torch.sub(colour, rgb, out=change[:, :3])
    torch.sub(alpha, m, out=change[:, 3:])
    correction = F.interpolate(change, size=full.shape[-2:], mode="bilinear", align_corners=False)
    return correction.add_(full).clamp_(0.0, 1.0)


def fill_texture(texture: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Low-pass copy [1, 4, h, w] (colour, alpha; not premultiplied) of an alpha-premultiplied RGBA
    texture (area downsampling to ``size``, None: the texture's own size; sampled with
    normalised coordinates, so the layout is unchanged). Colour is averaged with alpha
    weights, so hair next to the background keeps its own colour, and texels with little
    or no person take the colour of the nearest person (push-pull: a pyramid of
    alpha-weighted means, filled from the coarse levels down), so surface whose source
    pixel is background (the side of the head) gets the person's colour. The alpha is the
    low-pass mask dilated by two texels: the card behind the head, which takes it where
    the source did not see it, continues the hair at the head's edge instead of fading there."""
    small = texture if size is None else F.adaptive_avg_pool2d(texture, size)
    return torch.cat([_push_pull(small).clamp(0, 1), _max_filter(small[:, 3:4], 5)], 1)


def _push_pull(weighted: torch.Tensor) -> torch.Tensor:
    """Values [1, C, h, w] of a weighted picture [1, C + 1, h, w] (values times weight, then the
    weight in [0, 1], e.g. premultiplied RGBA), with texels of little weight filled from their
    neighbourhood: the weighted mean within four texels where there is weight there, else from
    coarser levels (a pyramid of 2x2 means, filled from the coarse levels down). Fixed shapes
    for a fixed size."""
    levels = [weighted]
    while max(levels[-1].shape[-2:]) > 1:
        levels.append(_half_mean(levels[-1]))
    top = levels[-1]  # [1, C + 1, 1, 1]: the mean value
    value = top[:, :-1] / top[:, -1:].clamp(min=1e-6)
    for level in reversed(levels[:-1]):
        a = level[:, -1:]
        coarse = F.interpolate(value, size=level.shape[-2:], mode="bilinear", align_corners=False)
        value = torch.lerp(coarse, level[:, :-1] / a.clamp(min=1e-6), (a / 0.5).clamp(max=1.0))
    near = _blur(weighted)
    local = near[:, :-1] / near[:, -1:].clamp(min=1e-6)
    a = weighted[:, -1:]
    filled = torch.lerp(value, local, (near[:, -1:] / 0.05).clamp(max=1.0))
    return torch.lerp(filled, weighted[:, :-1] / a.clamp(min=1e-6), (a / 0.5).clamp(max=1.0))


def sample_vertices(texture: torch.Tensor, tex_h: torch.Tensor, span: tuple[float, float],
                    padding: str = "zeros") -> torch.Tensor:
    """Bilinear texture lookups [N, C] at homogeneous source pixels tex_h [N, 3] (u w, v w, w);
    texture [1, C, h, w] spans ``span`` = (H, W) source pixels; outside it 0 (``padding`` "zeros") or the
    nearest edge texel ("border")."""
    w = tex_h[:, 2].clamp(min=1e-6)
    grid = torch.stack([2 * tex_h[:, 0] / w / span[1] - 1, 2 * tex_h[:, 1] / w / span[0] - 1], -1)
    out = F.grid_sample(texture, grid[None, None], mode="bilinear", padding_mode=padding, align_corners=False)
    return out[0, :, 0].t()


def lighting_ratio(low: torch.Tensor, quality: torch.Tensor, head_points: torch.Tensor,
                   st: MeshConstants) -> torch.Tensor:
    """Per vertex [N, 3]: the low-frequency lighting of its side of the face over its mirror side's,
    for colour carried across the face by symmetry.

    low [N, 3]: the low-pass colour at each vertex; quality [N]: how well the source saw it;
    head_points [N, 3]: positions in the head frame (x across the face). With the log
    colour linear across the face, log L(x) - log L(-x) = beta x; beta (per channel) is the
    least-squares fit over face vertex pairs both seen well (shrunk to 0 with few of them):
        beta = sum w x l / (sum w x^2 + prior),  ratio = exp(beta x) (clamped to [1/2, 2]).
    Off the face and shell (mirror = itself, x then meaningless) the ratio is not used."""
    x = head_points[:, 0]
    log_low = (low + 0.03).log()
    ell = log_low - log_low[st.mirror]  # [N, 3]
    w = quality * quality[st.mirror] * st.flags[:, 0]  # face-mesh vertices
    beta = ((w * x)[:, None] * ell).sum(0) / ((w * x.square()).sum() + 2e-3)  # [3]
    return (x[:, None] * beta[None]).clamp(-0.69, 0.69).exp()


def shading(low: torch.Tensor, weight: torch.Tensor, facing: torch.Tensor, st: MeshConstants) -> torch.Tensor:
    """Per vertex [N, 3] in [1/2, 1]: how much darker the source's light leaves surface that faces
    its camera less, for fill colour carried over the mesh from surface that faces it more.

    low [N, 3]: the low-pass colour at each vertex; weight [N]: 1 where the source saw it (at any
    angle: a low-pass colour is right even where the detail is stretched), 0 elsewhere; facing [N]:
    the cosine between the outward normal and the direction to the source camera (signed). With
    the log colour linear in c = max(facing, 0) (Lambert's cosine law with ambient light, for a light
    near the camera), log L(c) = a + gamma c; gamma (per channel) is the weighted least-squares
    slope over the face-mesh vertices, shrunk to 0 with few of them:
        gamma = sum w (c - c_w) (log L - l_w) / (sum w (c - c_w)^2 + prior),
    and the shading exp(gamma (c - 1)) (1 facing the camera). One-sided: a slope below 0 (a face
    lit from the side or behind, or whose darker features face the camera) darkens nothing."""
    c = facing.clamp(min=0.0)
    log_low = (low + 0.03).log()
    w = weight * st.flags[:, 0]
    total = w.sum().clamp(min=1e-6)
    dc = c - (w * c).sum() / total
    dl = log_low - (w[:, None] * log_low).sum(0) / total
    gamma = ((w * dc)[:, None] * dl).sum(0) / ((w * dc.square()).sum() + 2e-2)  # [3]
    return ((c[:, None] - 1.0) * gamma[None]).clamp(-0.69, 0.0).exp()


def fill_hidden_shell(fill, visible, st: MeshConstants, pole: int, outward: torch.Tensor) -> None:
    """Hidden shell vertices take the texture of the last visible vertex of their sweep
    from the face outline (hair colour continues round the back of the head), moved
    ``outward`` [J, 2] source pixels past it (the outline's own pixel is the edge itself, a
    highlight or a shadow line; past the jaw lies the neck, past the temples the hair),
    then the mean of their own and their neighbour sweeps' coordinates (twice), so the
    back of the head shows no streaks along the sweeps."""
    ring_ids = st.ring_ids  # [K + 1, J]
    k_idx = torch.arange(ring_ids.shape[0], device=fill.device)[:, None].expand_as(ring_ids)
    hidden = ~visible[ring_ids]
    last = torch.where(~hidden, k_idx, torch.zeros_like(k_idx)).cummax(0).values
    src = torch.gather(ring_ids, 0, last)  # [K + 1, J]
    w = fill[ring_ids, 2:3]  # [K + 1, J, 1]
    uv = fill[src, :2] / fill[src, 2:3]  # [K + 1, J, 2] source pixels
    uv = torch.where(hidden[..., None], uv + outward[None], uv)
    for _ in range(2):
        mean = (uv.roll(1, 1) + uv + uv.roll(-1, 1)) / 3.0
        uv = torch.where(hidden[..., None], mean, uv)
    fill[ring_ids.reshape(-1)] = torch.cat([uv * w, w], -1).reshape(-1, 3)
    fill[pole] = fill[ring_ids[-1]].mean(0)


def diffuse_colours(colour: torch.Tensor, quality: torch.Tensor, st: MeshConstants, n_head_faces: int,
                    steps: int = 3, shade: torch.Tensor | None = None) -> torch.Tensor:
    """Head vertex colours [H, C] (face mesh and shell, H = n_face + n_shell) where the source saw
    badly, taken from where it saw well: ``steps`` rounds of a quality-weighted mean over
    each vertex's triangles (a normalised diffusion over the mesh), then each vertex keeps
    its own colour by its quality. Face and shell apart: skin does not flow into the hair,
    nor hair onto the face (the outline, ring 0, is the face's).

    colour [H, C], quality [H] in [0, 1]; n_head_faces: the head's triangles (they come first);
    shade [H, C] (:func:`shading`): what is spread is colour / shade, relit by each vertex's own
    shade (an edge-on side is not as bright as the front it takes its colour from).
    A vertex no well-seen colour reaches keeps its own."""
    if shade is not None:
        return diffuse_colours(colour / shade, quality, st, n_head_faces, steps) * shade
    faces = st.faces[:n_head_faces]  # head triangles: face mesh, then shell
    q = quality[:, None]
    q_shell = q.clone()
    q_shell.index_fill_(0, st.ring0, 0.0)  # not `q_shell[idx] = 0.0`: that copies a host scalar (no CUDA-graph capture can)
    both = torch.cat([colour * q, q, colour * q_shell, q_shell], -1)  # [H, 2C + 2]
    C = colour.shape[-1]
    on_face = (st.part[:n_head_faces] == 0)[:, None]
    own = torch.cat([on_face.expand(-1, C + 1), ~on_face.expand(-1, C + 1)], -1)  # [Fh, 2C + 2]: the triangle's half
    for _ in range(steps):
        per_face = torch.where(own, _triangle_means(both, faces), 0.0)  # [Fh, 2C + 2]
        both = incident_sum(per_face, st.head_incident, st.head_incident_bags)
    face_num, face_den, shell_num, shell_den = both[:, :C], both[:, C : C + 1], both[:, C + 1 : -1], both[:, -1:]
    is_face = st.flags[: colour.shape[0], 0:1] > 0.5
    num, den = torch.where(is_face, face_num, shell_num), torch.where(is_face, face_den, shell_den)
    spread = torch.where(den > 1e-4, num / den.clamp(min=1e-4), colour)
    return torch.lerp(spread, colour, q)


def _triangle_means(values: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """[F, C]: the mean of values [N, C] over each triangle's corners (faces [F, 3]), ``values[faces].mean(1)``
    bit for bit: on the CPU one embedding_bag sum (in corner order, as that mean adds them) over 3, elsewhere
    the gather and mean themselves."""
    if values.device.type == "cpu":
        return F.embedding_bag(faces, values, mode="sum") / 3
    return values[faces].mean(1)


def fill_hidden_card(fill, opacity, visible, card: slice, st: MeshConstants) -> torch.Tensor:
    """Card vertices hidden by the head in the source would show a ghost of the face when
    the head turns; give each the texture of the nearest visible card vertex (in the card's
    grid: hair above the head continues behind its top, hair or background beside it
    behind its sides), up to about a cell away; further from any, the card fades out (a
    backdrop the source never showed is left out rather than smeared). Returns the new opacity."""
    ids = torch.arange(card.start, card.stop, device=fill.device)  # [G * G] row-major
    vis = visible[ids]
    # Hidden vertices' columns at +inf: d + 0 = d, d + inf = inf (one pass over the [G G, G G] table).
    d2 = st.card_d2 + torch.full_like(vis, float("inf"), dtype=st.card_d2.dtype).masked_fill_(vis, 0.0)[None]
    nearest, src = d2.min(1)
    src_ids = ids[src]
    move = (~vis & vis.any())[:, None]
    moved = fill[src_ids] / fill[src_ids][:, 2:3] * fill[ids][:, 2:3]
    fill[ids] = torch.where(move, moved, fill[ids])
    # Continued a cell or so; further from anything the source saw, the card fades out.
    reach = (2.0 - nearest.clamp(max=16.0).sqrt()).clamp(0.0, 1.0)  # 1 up to one cell, 0 from two
    card_opacity = opacity[ids] * torch.where(vis, torch.ones_like(reach), reach)
    return torch.cat([opacity[: card.start], card_opacity, opacity[card.stop :]])


def transparent_card_faces(mask: torch.Tensor | None, radius: torch.Tensor, tex_h, fill, opacity, st: MeshConstants,
                           plan: BuildPlan) -> torch.Tensor:
    """[F] bool: card triangles whose three corners see no person (mask >= 0.02 on the
    mask area-reduced to at most 96 px) within ``radius`` cells, in either texture.
    Drawing them would only cost time: with the background removed they are fully
    transparent. The window test is a box sum on an integral image: fixed shapes for
    any radius."""
    if mask is None:
        return torch.zeros_like(st.card_faces)
    H, W = plan.image_size
    f = reduction_factor((H, W), 96)
    hit = (area_pool(mask, f) >= 0.02).float()
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
