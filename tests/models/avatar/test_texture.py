"""The avatar's textures: the low-pass fill copy keeps the person's colour and carries it
past the person's edge."""
import math

import pytest
import torch

from models.avatar.texture import fill_texture


def test_fill_texture_is_a_low_pass_copy_that_keeps_the_person_colour():
    # Left half: red person (alpha 1) with fine stripes; right half: background (alpha 0,
    # premultiplied: no colour).
    tex = torch.zeros(1, 4, 64, 128)
    tex[0, 0, :, :64] = 1.0
    tex[0, 2, :, :64:2] = 1.0  # one-texel stripes of blue on the person
    tex[0, 3, :, :64] = 1.0
    low = fill_texture(tex, (8, 16))
    assert low.shape == (1, 4, 8, 16)
    # The stripes average out to half blue: detail gone, colour kept.
    assert torch.allclose(low[0, 2, :, :6], torch.full((8, 6), 0.5), atol=0.05)
    # Past the person's edge, and far from it, texels take the person's colour (push-pull).
    assert torch.all(low[0, 0, :, 7:] > 0.95) and torch.all(low[0, 1] < 0.05)
    # The alpha is the low-pass mask dilated by two texels: 1 past the edge (texel 8), 0 from three texels on.
    assert torch.all(low[0, 3, :, :9] > 0.95) and torch.all(low[0, 3, :, 11:] < 0.05)
    # At the texture's own size: the same, no resampling.
    assert fill_texture(tex, None).shape == tex.shape


def _reference_box_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    import torch.nn.functional as F

    return F.avg_pool2d(x.double(), k, stride=1, padding=k // 2, count_include_pad=False).float()


def test_box_mean_is_the_box_filter_that_averages_edges_over_what_lies_inside():
    from models.avatar.texture import box_mean

    x = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(0))
    for k in (3, 5, 9):
        assert torch.allclose(box_mean(x, k), _reference_box_mean(x, k), atol=1e-5)


@pytest.mark.gpu
def test_box_mean_on_cuda_matches_the_cpu():
    from models.avatar.texture import box_mean

    x = torch.rand(1, 4, 64, 48, generator=torch.Generator().manual_seed(1))
    for k in (3, 5):
        assert torch.allclose(box_mean(x.cuda(), k).cpu(), box_mean(x, k), atol=1e-5)


def _head_constants():
    from models.avatar.topology import mesh_constants, mesh_topology

    key = (10, 28, False)
    topo = mesh_topology(*key)
    return topo, mesh_constants(topo, key, torch.device("cpu"))


def test_shading_is_the_light_falloff_the_face_shows_towards_its_edges():
    from models.avatar.texture import shading

    _, st = _head_constants()
    N = st.flags.shape[0]
    facing = torch.rand(N, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.2  # [-0.2, 1]
    c = facing.clamp(min=0.0)
    seen = torch.ones(N)
    # A face lit from the camera: log colour linear in the cosine, slope 0.4 (0.67 x as bright edge-on).
    low = (0.6 * (0.4 * (c - 1.0)).exp()[:, None] * torch.tensor([1.0, 0.8, 0.7]) - 0.03).clamp(min=0.0)
    shade = shading(low, seen, facing, st)
    assert shade.shape == (N, 3)
    assert torch.allclose(shade[facing > 0.99], torch.ones(1), atol=0.01)
    edge_on = shade[facing.abs() < 0.02]
    assert torch.allclose(edge_on, torch.full_like(edge_on, math.exp(-0.4)), atol=0.03)
    # Only seen face-mesh vertices count: the same slope from them alone, whatever the rest shows.
    noise = torch.rand(N, 3, generator=torch.Generator().manual_seed(1))
    mixed = torch.where(st.flags[:, :1] > 0.5, low, noise)
    assert torch.allclose(shading(mixed, seen, facing, st), shade, atol=1e-5)
    # A face brighter edge-on than in front (lit from the side, or dark features in front): nothing darkens.
    assert torch.all(shading(low.max() - low, seen, facing, st) == 1.0)


def test_diffused_fill_colour_is_relit_by_each_vertex_shade():
    from models.avatar.texture import diffuse_colours

    topo, st = _head_constants()
    H = topo.n_face + topo.n_shell
    seen = torch.zeros(H, dtype=torch.bool)
    seen[: H // 2] = True
    colour = torch.where(seen, 0.8, 0.2)[:, None].expand(H, 3)
    shade = torch.where(seen, 1.0, 0.5)[:, None].expand(H, 3)
    plain = diffuse_colours(colour, seen.float(), st, topo.n_head_faces)
    lit = diffuse_colours(colour, seen.float(), st, topo.n_head_faces, shade=shade)
    # Well-seen vertices keep their own colour; the rest take the spread colour at their own shade
    # (or keep their own where no well-seen colour reaches them).
    assert torch.equal(lit[seen], plain[seen])
    reached = ~seen & (plain[:, 0] > 0.5)
    assert reached.sum() > 20
    assert torch.allclose(lit[reached], plain[reached] * 0.5, atol=1e-5)
    assert torch.allclose(lit[~seen & ~reached], plain[~seen & ~reached], atol=1e-5)
