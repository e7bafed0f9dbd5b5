"""The appearance memory's atlas (models.avatar.memory): the avatar's fixed topology laid out in texture space,
and what one frame's avatar shows of each of its texels.

The atlas lays out the three textured parts of the mesh (models.avatar.topology) in texture space:

- **face**: the canonical face mesh unrolled on a vertical cylinder about the cranium centre
  (u = radius x angle, v = height), so the cheeks keep their share of texels;
- **shell**: one cell per (sweep j, ring k) quad of the head shell, ring 0 (the face outline)
  at the top, the back pole at the bottom;
- **card**: one cell per card grid quad.

Each corner of each triangle has its atlas position (``MemoryAtlas.corner_uv``: the face outline
belongs to the face and to the shell, the shell wraps round). Rasterizing that layout once gives
each covered texel its triangle and barycentrics, so a frame's update is gathers and
element-wise maths of fixed shape: no host sync, the same code on the CPU and in a CUDA graph.

:func:`observe_texels` is a frame's look at every covered texel: colour, alpha and the quality the memory
weighs it by (seen by the source, facing it, resolution).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.avatar.texture import sample_vertices
from models.avatar.topology import EXPRESSION_LANDMARKS, Topology, mesh_topology
from models.avatar.types import VATTR, Avatar
from models.avatar.visibility import seen_fraction
from models.face.analysis import face_model
from models.geometry.raster import rasterize, weighted_rows

__all__ = ["MemoryAtlas", "memory_atlas", "observe_texels"]


@dataclass(frozen=True)
class MemoryAtlas:
    """The atlas layout of one topology at one size, on one device (made once: :func:`memory_atlas`)."""

    size: tuple[int, int]  # (Ha, Wa) texels
    corner_uv: torch.Tensor  # [F, 3, 2] atlas position of each triangle corner, grid_sample units ([-1, 1], x first)
    texel_ids: torch.Tensor  # [T] int64 flat ids of the covered texels
    texel_face: torch.Tensor  # [T] int64 the triangle of each
    texel_vid: torch.Tensor  # [T, 3] int64 its corners' vertex ids
    texel_bary: torch.Tensor  # [T, 3] its barycentrics
    texel_card: torch.Tensor  # [T] bool: on the card (else on the head)
    texel_static: torch.Tensor  # [T] in [0, 1]: 0 on the expression regions (never from memory)
    atlas_area: torch.Tensor  # [F] triangle area in texels (0: not in the atlas)
    gutter: torch.Tensor  # [Ha * Wa] int64: the covered texel (index into T) each atlas texel shows, T: none
    cell: torch.Tensor  # [T] int64 the ratio-grid cell each texel lies in
    grid: tuple[int, int]  # (h, w) of the lighting ratio's grid
    n_head_texels: torch.Tensor  # 0-d float: covered head texels (for the fill fraction)


_ATLASES: dict[tuple, MemoryAtlas] = {}


def _layout(topo: Topology, texels: int, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Corner positions [F, 3, 2] in atlas texels (x, y) and the atlas size (Ha, Wa), a multiple of ``multiple``; triangles off
    the atlas (far layer) get all corners at 0 (degenerate: never drawn)."""
    model = face_model()
    n_tri = len(model.triangles)
    faces = topo.faces
    K, J = topo.ring_ids.shape[0] - 1, topo.ring_ids.shape[1]
    G = round(topo.n_card ** 0.5)
    cs, cc, gap = max(4, round(texels / 12)), max(2, round(texels / 24)), 2
    card_side = (G - 1) * cc
    shell_top = max(texels, card_side) + gap
    Wa = max(texels + gap + card_side, J * cs)
    Ha = shell_top + (K + 1) * cs
    Ha, Wa = -(-Ha // multiple) * multiple, -(-Wa // multiple) * multiple
    uv = np.zeros(faces.shape + (2,), np.float64)
    # Face: a cylinder about the cranium centre's vertical axis.
    v = model.vertices.astype(np.float64)
    centre = np.array([0.0, -0.02, 0.025])
    radius = np.hypot(v[:, 0] - centre[0], v[:, 2] - centre[2]).mean()
    cyl = np.stack([radius * np.arctan2(v[:, 0] - centre[0], centre[2] - v[:, 2]), v[:, 1]], -1)
    lo, hi = cyl.min(0), cyl.max(0)
    scale = (texels - 2.0) / (hi - lo).max()
    cyl = (cyl - (lo + hi) / 2) * scale + texels / 2.0
    uv[:n_tri] = cyl[faces[:n_tri]]
    # Shell: (sweep j, ring k) cells; the pole sits below the middle of its triangle's sweep.
    where = {}
    for k in range(K + 1):
        for j in range(J):
            where[int(topo.ring_ids[k, j])] = (j, k)
    for f in range(n_tri, topo.n_head_faces):
        corners = [where.get(int(i), (None, K + 1)) for i in faces[f]]
        js = [j for j, _ in corners if j is not None]
        if max(js) - min(js) > 1:  # the quad that closes the loop: sweep 0 comes after sweep J - 1
            js = [j + J if j == 0 else j for j in js]
        it = iter(js)
        jj = [next(it) if j is not None else None for j, _ in corners]
        mid = (min(js) + max(js)) / 2.0
        for c, ((_, k), j) in enumerate(zip(corners, jj)):
            uv[f, c] = (mid * cs if j is None else j * cs, shell_top + k * cs)
    # Card: grid cells, row-major like its vertices.
    base = topo.n_face + topo.n_shell
    card = (faces >= base).all(-1) & (faces < base + topo.n_card).all(-1)
    r, c = np.divmod(faces[card] - base, G)
    uv[card] = np.stack([texels + gap + c * cc, r * cc], -1)
    return uv, (Ha, Wa)


def memory_atlas(topo_key: tuple[int, int, bool], texels: int, ratio_cell: int,
                 device: torch.device | str) -> MemoryAtlas:
    """The atlas of the mesh ``mesh_topology(*topo_key)`` with a face region ``texels`` wide, on
    ``device`` (made once per key: the texels' triangles come from rasterizing the layout)."""
    device = torch.device(device)
    key = (topo_key, texels, ratio_cell, str(device))
    if key in _ATLASES:
        return _ATLASES[key]
    topo = mesh_topology(*topo_key)
    uv, (Ha, Wa) = _layout(topo, texels, ratio_cell)
    faces = torch.as_tensor(topo.faces)
    Fn = faces.shape[0]
    corners = torch.as_tensor(uv, dtype=torch.float32).reshape(1, Fn * 3, 2)
    pix = torch.cat([corners, torch.ones(1, Fn * 3, 1)], -1)
    frags = rasterize(pix, torch.arange(Fn * 3).reshape(Fn, 3), Ha, Wa)
    face_id = frags.face_id[0].reshape(-1)
    ids = torch.nonzero(face_id >= 0)[:, 0]
    tface = face_id[ids]
    bary = frags.bary[0].reshape(-1, 3)[ids]
    vid = faces[tface]
    # Expression regions: the landmark sets grown by two rings of face-mesh neighbours.
    n_tri = len(face_model().triangles)
    expr = torch.zeros(topo.faces.max() + 1)
    expr[list(EXPRESSION_LANDMARKS)] = 1.0
    tri = faces[:n_tri]
    for _ in range(2):
        hit = expr[tri].amax(-1)  # [n_tri]
        grown = torch.zeros_like(expr)
        grown.scatter_reduce_(0, tri.reshape(-1), hit[:, None].expand(-1, 3).reshape(-1), "amax")
        expr = torch.maximum(expr, grown)
    on_face = tface < n_tri
    e = torch.where(on_face, (bary * expr[vid]).sum(-1), torch.zeros(len(ids)))
    static = torch.where(e > 1.0 - 1e-4, torch.zeros_like(e), 1.0 - e)
    # Grown by a texel in the atlas too: bilinear lookups inside the regions read no memory.
    image = torch.ones(Ha * Wa)
    image[ids] = static
    image = -F.max_pool2d(-image.reshape(1, 1, Ha, Wa), 3, stride=1, padding=1)
    static = torch.where(on_face, image.reshape(-1)[ids], static)
    card = tface >= topo.n_head_faces
    e1, e2 = corners[0, 1::3] - corners[0, 0::3], corners[0, 2::3] - corners[0, 0::3]
    area = 0.5 * (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs()
    # Gutter: every texel next to a covered one shows that one (bilinear lookups at a region's edge).
    gutter = torch.full((Ha * Wa,), len(ids), dtype=torch.int64)
    gutter[ids] = torch.arange(len(ids))
    grid = gutter.reshape(Ha, Wa)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        shifted = torch.roll(grid, (dy, dx), (0, 1))
        gutter = torch.where((gutter == len(ids)) & (shifted.reshape(-1) < len(ids)), shifted.reshape(-1), gutter)
    # The lighting ratio's grid: cells of ratio_cell texels (the atlas is a whole number of them).
    gh, gw = Ha // ratio_cell, Wa // ratio_cell
    cell = (ids // Wa) // ratio_cell * gw + (ids % Wa) // ratio_cell
    norm = torch.as_tensor(uv, dtype=torch.float32) / torch.tensor([Wa, Ha], dtype=torch.float32) * 2.0 - 1.0
    atlas = MemoryAtlas(
        size=(Ha, Wa), corner_uv=norm.to(device), texel_ids=ids.to(device), texel_face=tface.to(device),
        texel_vid=vid.to(device), texel_bary=bary.float().to(device), texel_card=card.to(device),
        texel_static=static.float().to(device), atlas_area=area.to(device), gutter=gutter.to(device),
        cell=cell.to(device), grid=(gh, gw),
        n_head_texels=(~card).sum().float().to(device),
    )
    _ATLASES[key] = atlas
    return atlas


def observe_texels(atlas: MemoryAtlas, avatar: Avatar) -> tuple[torch.Tensor, torch.Tensor]:
    """What the avatar's frame shows of each covered texel: colour and alpha [T, 4] (straight,
    not premultiplied) and its quality q [T] in [0, 1]. Device maths, fixed shapes."""
    verts, tex_h = avatar.verts, avatar.vattr[:, VATTR.TEX]  # [N, 3] each
    faces = avatar.faces
    table = torch.cat([verts, tex_h], -1)  # [N, 6]
    both = weighted_rows(table, atlas.texel_vid, atlas.texel_bary)  # [T, 6]
    P, th = both[:, :3], both[:, 3:]  # camera frame; (u w, v w, w): linear in position
    # Gathers as index_select (the same values; advanced indexing costs the CPU several times more).
    corners = faces.reshape(-1)
    tri = verts.index_select(0, corners).view(-1, 3, 3)  # [F, 3, 3]
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cos = (normal.index_select(0, atlas.texel_face) * P).sum(-1).abs() / P.norm(dim=-1).clamp(min=1e-6)
    # Resolution: source pixels per texel (area ratio of each triangle), at most 1.
    uv = (tex_h[:, :2] / tex_h[:, 2:3].clamp(min=1e-6)).index_select(0, corners).view(-1, 3, 2)  # [F, 3, 2]
    s1, s2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    src_area = 0.5 * (s1[:, 0] * s2[:, 1] - s1[:, 1] * s2[:, 0]).abs()
    res = (src_area / atlas.atlas_area.clamp(min=1e-6)).sqrt().clamp(max=1.0).index_select(0, atlas.texel_face)
    w = th[:, 2].clamp(min=1e-6)
    u, v = th[:, 0] / w, th[:, 1] / w
    card = atlas.texel_card
    seen = seen_fraction(th[:, 2], avatar.src_depth, avatar.src_depth_K, u, v, pooled=card)
    rgba = sample_vertices(avatar.texture, th, avatar.tex_span)  # [T, 4] premultiplied
    alpha = rgba[:, 3:]
    colour = torch.cat([(rgba[:, :3] / alpha.clamp(min=1e-4)).clamp(0.0, 1.0), alpha], -1)
    H, W = avatar.source_image.shape[-2:]
    in_pic = ((u >= 0) & (u <= W) & (v >= 0) & (v <= H)).float()
    on_person = ((alpha[:, 0] - 0.45) / 0.4).clamp(0.0, 1.0)
    q = seen * ((cos - 0.15) / 0.5).clamp(0.0, 1.0) * res * torch.where(card, in_pic, on_person)
    return colour, q
