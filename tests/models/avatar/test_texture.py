"""The avatar's textures: the low-pass fill copy keeps the person's colour."""
import torch

from models.avatar.texture import fill_texture


def test_fill_texture_is_a_low_pass_copy_that_keeps_the_person_colour():
    # Left half: red person (alpha 1) with fine stripes; right half: green background (alpha 0).
    tex = torch.zeros(1, 4, 64, 128)
    tex[0, 0, :, :64] = 1.0
    tex[0, 1, :, 64:] = 1.0
    tex[0, 2, :, :64:2] = 1.0  # one-texel stripes of blue on the person
    tex[0, 3, :, :64] = 1.0
    low = fill_texture(tex, (8, 16))
    assert low.shape == (1, 4, 8, 16)
    # The person's colour right at the person/background edge has no green in it: alpha-weighted.
    edge = low[0, :3, :, 7]
    assert torch.all(edge[1] < 0.05) and torch.all(edge[0] > 0.95)
    # The stripes average out to half blue: detail gone, colour kept.
    assert torch.allclose(low[0, 2, :, :6], torch.full((8, 6), 0.5), atol=0.05)
    # Background far from the person keeps its own colour; alpha goes from 1 to 0 across the edge.
    assert torch.all(low[0, 1, :, -4:] > 0.95) and low[0, 3, 0, 0] > 0.95 and low[0, 3, 0, -1] < 0.05
    assert fill_texture(tex, None) is tex
