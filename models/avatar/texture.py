"""The avatar's colours: the projective RGBA texture and its low-pass fill copy, the fill
texture coordinates of surface the source did not see, and the card cells left transparent."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.avatar.geometry import area_pool
from models.avatar.plan import BuildPlan, reduction_factor
from models.avatar.topology import MeshConstants

__all__ = ["fill_hidden_card", "fill_hidden_shell", "fill_texture", "rgba_texture", "transparent_card_faces"]


def rgba_texture(image_t: torch.Tensor, alpha_t: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """RGBA texture [1, 4, h, w] in [0, 1] on the device: the picture and its alpha,
    downsampled (antialiased) to ``size`` (None: as is). image_t [3, H, W], alpha_t [1, H, W]."""
    rgba = torch.cat([image_t, alpha_t])[None]
    if size is not None:
        rgba = F.interpolate(rgba, size=size, mode="bilinear", antialias=True, align_corners=False)
    return rgba


def fill_texture(texture: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
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


def fill_hidden_shell(fill, visible, st: MeshConstants, pole: int) -> None:
    """Hidden shell vertices take the texture of the last visible vertex of their
    sweep from the face outline (hair colour continues round the back of the head)."""
    ring_ids = st.ring_ids  # [K + 1, J]
    k_idx = torch.arange(ring_ids.shape[0], device=fill.device)[:, None].expand_as(ring_ids)
    last = torch.where(visible[ring_ids], k_idx, torch.zeros_like(k_idx)).cummax(0).values
    src = torch.gather(ring_ids, 0, last).reshape(-1)
    dst = ring_ids.reshape(-1)
    fill[dst] = fill[src] / fill[src, 2:3] * fill[dst, 2:3]
    fill[pole] = fill[ring_ids[-1]].mean(0)


def fill_hidden_card(fill, opacity, visible, card: slice, G: int) -> torch.Tensor:
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
