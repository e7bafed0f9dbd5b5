"""The avatar's textures: the low-pass fill copy keeps the person's colour and carries it
past the person's edge."""
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
