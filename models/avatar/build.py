"""Building an avatar: build_avatar (the host's share, then the device's) and
build_on_device, the device's share with fixed shapes for a fixed plan."""
from __future__ import annotations

import numpy as np
import torch

from models.avatar.geometry import mesh_vertices, shell_support, vertex_normals
from models.avatar.plan import BuildPlan, ObservationView, prepare_build
from models.avatar.texture import (decontaminate, diffuse_colours, fill_hidden_card, fill_hidden_shell, fill_texture,
                                   lighting_ratio, rgba_texture, sample_vertices, shading, transparent_card_faces)
from models.avatar.topology import mesh_constants, mesh_topology
from models.avatar.types import Avatar, AvatarConfig
from models.avatar.visibility import facing_source, source_depth_map, vertex_visible
from models.face.analysis import FaceObservation

__all__ = ["build_avatar", "build_on_device"]


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
    crop: (centre x, centre y, side) in source pixels; default :func:`models.avatar.plan.crop_box` of obs.
    render_size: the largest render size planned (sets the texture resolution).

    The host frames the head and packs a few numbers (:func:`prepare_build`); the device
    does the rest without waiting on the host except to size the source-depth raster
    (models.avatar.engine.AvatarEngine runs that part as a CUDA graph instead).
    """
    inputs = prepare_build(image, obs, config, geometry, crop, render_size)
    device = torch.device(device)
    avatar = build_on_device(inputs.plan, inputs.tensors(device), device)
    avatar.host = inputs.host
    return avatar


def build_on_device(plan: BuildPlan, t: dict[str, torch.Tensor | None], device: torch.device,
                    capacity: int | None = None) -> Avatar:
    """The device's share of a build: tensor maths only, fixed shapes for a fixed plan.
    capacity: candidate count of the source-depth raster (fixed: CUDA-graph safe; None:
    exact, one host sync). The Avatar's ``host`` field is left for the caller."""
    config = plan.config
    key = (config.shell_rings, config.card_grid, config.background == "far")
    topo = mesh_topology(*key)
    st = mesh_constants(topo, key, device)
    H, W = plan.image_size
    frame = t["frame"]
    crop, A, crop_K, Kt = frame[:3], frame[3:12].view(3, 3), frame[12:21].view(3, 3), frame[21:30].view(3, 3)
    o = ObservationView.of(t["obs"])
    mask = t["mask"]

    # Texture on the device: the picture, its person mask as alpha (or 1; the matte, see
    # decontaminate), and the far layer.
    image_t = t["image"].permute(2, 0, 1).float().div_(255.0)
    alpha_t = mask[None] if plan.alpha_mask else torch.ones((1, H, W), device=device)
    texture = rgba_texture(t["image"].permute(2, 0, 1), alpha_t, plan.tex_size)  # from the bytes: one pass
    if plan.alpha_mask:
        texture = decontaminate(texture, plan.fill_size or tuple(texture.shape[-2:]))
    # Premultiplied: bilinear lookups at the person's edge blend no background colour in. In place: the
    # texture is this build's own (rgba_texture's, decontaminate's), read nowhere else.
    texture[:, :3].mul_(texture[:, 3:])
    span_w = float(W)
    if topo.n_far:
        far = rgba_texture(t["far"].permute(2, 0, 1), torch.ones_like(alpha_t), plan.tex_size)
        texture = torch.cat([texture, far], -1)
        span_w = 2.0 * W
    texture_fill = fill_texture(texture, plan.fill_size)

    # Geometry: the shell fits the person's silhouette (the matte where there is one).
    support = None if mask is None else shell_support(texture[0, 3] if plan.alpha_mask else mask, t["outline"])
    tex_verts = mesh_vertices(o, support, crop, plan, st)  # [N, 3] texture frame
    N = tex_verts.shape[0]
    tex_h = tex_verts @ Kt.T  # [N, 3]: (u w, v w, w) with w the source depth

    # What the source camera saw: a depth map of the head, and per vertex.
    src_depth, frags = source_depth_map(tex_verts, st, A @ Kt, plan.vis_size, capacity)
    visible = vertex_visible(tex_h, src_depth, A, st.card_verts)  # [N] bool
    normals = vertex_normals(tex_verts, st.faces, st.incident, st.incident_bags)
    facing, grazing = facing_source(tex_verts, normals)  # [N] each

    # Fill texture for what the source did not see (used per pixel where hidden).
    fill = tex_h.clone()
    opacity = torch.ones(N, device=device)
    outline_uv = tex_h[st.ring0, :2] / tex_h[st.ring0, 2:3]  # [J, 2] source pixels
    centre_uv = (Kt @ o.pivot)[:2] / o.pivot[2]
    outward = outline_uv - centre_uv
    outward = outward / outward.norm(dim=-1, keepdim=True).clamp(min=1e-6) * (0.06 * o.face_h)
    fill_hidden_shell(fill, visible, st, topo.pole, outward)
    card = slice(topo.n_face + topo.n_shell, topo.n_face + topo.n_shell + topo.n_card)
    opacity = fill_hidden_card(fill, opacity, visible, card, st)
    if topo.n_far:
        # Atlas [picture | far layer]: far-layer vertices address the right half.
        for h in (tex_h, fill):
            h[N - topo.n_far :, 0] += W * h[N - topo.n_far :, 2]
    skip = transparent_card_faces(mask if plan.alpha_mask else None, frame[30], tex_h, fill, opacity, st, plan)

    # Symmetric completion: what the source saw badly may be seen well on the other side of the face.
    span = (float(H), span_w)
    head = st.flags[:, 1]
    on_person = visible.float() * sample_vertices(texture, tex_h, span)[:, 3]
    quality = on_person * ((facing - 0.15) / 0.35).clamp(0, 1)
    mirror_q = quality[st.mirror] * head
    low = sample_vertices(texture_fill, tex_h, span)[:, :3]
    ratio = lighting_ratio(low, quality, (tex_verts - o.t) @ o.R, st)
    # Per-vertex fill colours: the low-pass texture where the source saw the head well, spread
    # over the mesh to where it saw it badly (the underside of the chin, the edge-on sides), shaded
    # as the face shows the light falling off with the surface's angle to the source camera.
    fill_rgb = sample_vertices(texture_fill, fill, span, "border")[:, :3]  # past the picture's edge: its edge's colour
    n_head = topo.n_face + topo.n_shell
    toward = -(normals * tex_verts).sum(-1) / tex_verts.norm(dim=-1).clamp(min=1e-9)  # [N] signed cosine
    shade = shading(low, on_person * (facing > 0.05).float(), toward, st)[:n_head]
    fill_rgb = torch.cat([diffuse_colours(fill_rgb[:n_head], quality[:n_head], st, topo.n_head_faces, shade=shade),
                          fill_rgb[n_head:]])
    vattr = torch.cat([tex_h, fill, tex_h[st.mirror], ratio, fill_rgb, grazing[:, None], mirror_q[:, None],
                       opacity[:, None]], -1)  # [N, VATTR.COUNT]
    if plan.reenact:
        geo_mask = t["geo_mask"]
        geo_support = None if geo_mask is None else shell_support(geo_mask, t["geo_outline"])
        geo = ObservationView.of(t["geo_obs"])
        verts = mesh_vertices(geo, geo_support, crop, plan, st)
        pivot, R_geo = geo.pivot, geo.R
    else:
        verts, pivot, R_geo = tex_verts, o.pivot, o.R
    # The texture's camera seen from the head, turned with the head into the geometry's pose:
    # R_geo R_tex^T (-pivot / |pivot|).
    source_dir = R_geo @ (o.R.T @ (-o.pivot / o.pivot.norm()))
    return Avatar(
        verts=verts,
        faces=st.faces,
        cull=st.cull,
        skip=skip,
        part=st.part,
        face_detail=st.face_detail,
        vattr=vattr,
        # Texel-major on the CPU: a render's bilinear lookup reads a texel's 4 channels from one cache line.
        texture=texture.contiguous(memory_format=torch.channels_last) if device.type == "cpu" else texture,
        texture_fill=texture_fill,
        tex_span=span,
        src_depth=src_depth,
        src_depth_K=A,
        pivot=pivot,
        source_dir=source_dir,
        crop_K=crop_K,
        source_image=image_t,
        source_alpha=alpha_t,
        source_focal_px=plan.focal_px,
        config=config,
        needed=frags.needed,
    )
