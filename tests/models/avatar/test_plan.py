"""The build plan: texture sizes in powers of two of the picture."""
from models.avatar.plan import texture_levels


def test_texture_sizes_come_in_powers_of_two():
    # Sizes come in powers of two: a 64-px crop wants 8 fill texels across it -> 1/8 of the picture;
    # off (0), or a texture already coarser than asked: the texture itself.
    assert texture_levels(64.0, (64, 128), 512, 8, far=False) == (None, (8, 16))
    assert texture_levels(64.0, (64, 128), 512, 0, far=False) == (None, None)
    assert texture_levels(64.0, (64, 128), 512, 128, far=False) == (None, None)
    # A crop much larger than the render: the texture halves until the crop spans <= 1.25 * max_side.
    assert texture_levels(2000.0, (1000, 3000), 512, 0, far=False) == ((250, 750), None)
