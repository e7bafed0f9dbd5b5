"""Contact sheets: layout with captions and row titles, float or uint8 tiles, size errors."""
import cv2
import numpy as np
import pytest

from models.evaluation.figures import contact_sheet


def test_contact_sheet_layout_with_captions_and_titles():
    h, w, gap = 40, 30, 4
    a = np.full((h, w, 3), 0.0, np.float32)
    b = np.full((h, w, 3), 200, np.uint8)
    plain = contact_sheet([[a, b], [b]], gap=gap)
    assert plain.shape == (gap + 2 * (h + gap), gap + 2 * (w + gap), 3) and plain.dtype == np.uint8
    assert (plain[gap : gap + h, gap : gap + w] == 0).all() and (plain[gap : gap + h, 2 * gap + w : 2 * gap + 2 * w] == 200).all()
    assert (plain[2 * gap + h : 2 * gap + 2 * h, 2 * gap + w :] == 255).all()  # a short row leaves background
    caption = max(14, h // 14)
    sheet = contact_sheet([[a, b], [b, a]], labels=[["one", ""], ["", "two"]], row_titles=["first row"], gap=gap)
    assert sheet.shape == (gap + 24 + 2 * (caption + h + gap), gap + 2 * (w + gap), 3)
    assert (sheet[gap + 24 + caption : gap + 24 + caption + h, gap : gap + w] == 0).all()
    assert (sheet[gap : gap + 24] < 255).any()  # the title is drawn


def test_contact_sheet_rejects_mixed_sizes_and_empty_rows():
    with pytest.raises(ValueError, match="expected pictures of 8x8"):
        contact_sheet([[np.zeros((8, 8, 3)), np.zeros((9, 8, 3))]])
    with pytest.raises(ValueError, match="at least one row"):
        contact_sheet([])


def test_a_plot_saved_in_256_colours_keeps_its_colours_and_is_smaller(tmp_path):
    from models.evaluation.figures import Series, save_png, scatter_plot

    x = np.linspace(0, 10, 200)
    img = scatter_plot([Series("a", x, np.sin(x)), Series("b", x, np.cos(x))], "t", "x", "y", size=(600, 300))
    save_png(tmp_path / "full.png", img)
    save_png(tmp_path / "palette.png", img, palette=True)
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "palette.png")), cv2.COLOR_BGR2RGB)
    assert back.shape == img.shape and np.abs(back.astype(int) - img.astype(int)).mean() < 2.0
    assert (tmp_path / "palette.png").stat().st_size < (tmp_path / "full.png").stat().st_size
