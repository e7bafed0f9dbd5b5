"""models.pictures: one quantisation rule for numpy and torch, and the RGB [H, W, 3] layout."""
import numpy as np
import pytest
import torch

from models.pictures import to_rgb_uint8, to_uint8


def test_to_uint8_rounds_ties_to_even_and_clips_the_same_for_numpy_and_torch():
    # In float32, x * 255 is exactly 0.5, 1.5, 126.5 and 127.5 for these x: ties go to the even neighbour.
    x = np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 126.5 / 255, 0.5, 1.0, 2.0], np.float32)
    assert (x[2:6] * np.float32(255) == np.array([0.5, 1.5, 126.5, 127.5], np.float32)).all()
    want = np.array([0, 0, 0, 2, 126, 128, 255, 255], np.uint8)
    np.testing.assert_array_equal(to_uint8(x), want)
    t = to_uint8(torch.from_numpy(x))
    assert t.dtype == torch.uint8 and isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), want)
    values = np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(to_uint8(torch.from_numpy(values)).numpy(), to_uint8(values))


def test_to_uint8_keeps_shape_and_passes_uint8_through():
    u = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert to_uint8(u) is u
    assert to_uint8(np.zeros((2, 5, 3, 4, 4))).shape == (2, 5, 3, 4, 4)
    tu = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert to_uint8(tu) is tu


def test_to_rgb_uint8_layouts():
    chw = torch.rand(3, 5, 7, requires_grad=True)
    out = to_rgb_uint8(chw)
    assert out.shape == (5, 7, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, to_uint8(chw.detach().permute(1, 2, 0).numpy()))
    grey = to_rgb_uint8(torch.full((1, 5, 7), 1.0))
    assert grey.shape == (5, 7, 3) and (grey == 255).all()
    assert to_rgb_uint8(np.full((5, 7), 0.5)).shape == (5, 7, 3)
    hwc = np.full((5, 7, 3), 9, np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(hwc), hwc)


@pytest.mark.parametrize("bad", [torch.zeros(4, 5, 5), torch.zeros(2, 3, 5, 5), np.zeros((5, 5, 4)), np.zeros(5)])
def test_to_rgb_uint8_names_the_wrong_shape(bad):
    with pytest.raises(ValueError, match="expected a picture"):
        to_rgb_uint8(bad)


def test_to_uint8_writes_into_a_channels_last_view_by_the_same_rule():
    """The pipeline writes its views' bytes channels-last in place (telepresence.pipeline.Pipeline.render): the
    same rounding as everywhere else, ties to even (it truncated x * 255 + 0.5 before: 0.5 / 255 became 1)."""
    x = torch.tensor([0.5 / 255, 1.5 / 255, 126.5 / 255, -1.0, 2.0], dtype=torch.float32)
    views = x.repeat(2, 3, 1, 1)  # [V, C, S, W] = [2, 3, 1, 5]
    pictures = torch.empty((2, 1, 5, 3), dtype=torch.uint8)  # [V, S, W, C]
    got = to_uint8(views, out=pictures.permute(0, 3, 1, 2))
    assert got.data_ptr() == pictures.data_ptr() and pictures.is_contiguous()
    np.testing.assert_array_equal(pictures[0, 0, :, 0].numpy(), [0, 2, 126, 0, 255])
    np.testing.assert_array_equal(pictures.permute(0, 3, 1, 2).numpy(), to_uint8(views.numpy()))
    with pytest.raises(ValueError, match="out"):
        to_uint8(views, out=torch.empty((2, 3, 1, 4), dtype=torch.uint8))
    with pytest.raises(ValueError, match="tensor"):
        to_uint8(views.numpy(), out=pictures)


def test_write_rgb_writes_the_colours_and_says_when_it_cannot(tmp_path):
    """cv2.imwrite returns False for a folder it cannot write and raises its own error for an unknown extension:
    both are one OSError naming the file (a docs figure said "wrote" for a file it had not written)."""
    import cv2

    from models.pictures import write_rgb

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    write_rgb(tmp_path / "red.png", rgb)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "red.png"))[..., ::-1], rgb)
    write_rgb(tmp_path / "red.jpg", rgb, jpeg_quality=95)
    assert abs(int(cv2.imread(str(tmp_path / "red.jpg"))[..., 2].mean()) - 200) <= 3
    for path in (tmp_path / "missing" / "x.png", tmp_path / "x.unknown"):
        with pytest.raises(OSError, match=f"cannot write {path}"):
            write_rgb(path, rgb)
