"""Small OpenCV figures: labelled tiles and contact sheets (evaluation reports, `telepresence render`,
the README figure) and scatter plots with per-bin means. No plotting library needed.

Pictures are RGB uint8 [H, W, 3]; inputs may be float [H, W, 3] in [0, 1].
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from models.pictures import to_rgb_uint8, to_uint8

__all__ = ["PALETTE", "label_tile", "contact_sheet", "Series", "scatter_plot", "save_png"]

PALETTE: dict[str, tuple[int, int, int]] = {
    "baseline": (128, 128, 128),
    "raw": (31, 119, 180),
    "refined": (214, 39, 40),
}
"""RGB colour of each method in plots; others cycle through _EXTRA_COLOURS."""
_EXTRA_COLOURS = [(44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194)]
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_WHITE, _BLACK, _GRID = (255, 255, 255), (0, 0, 0), (225, 225, 225)
_TITLE_BAR = 24
"""Height of a contact sheet's row-title bar, pixels."""


def colour_of(name: str, order: int = 0) -> tuple[int, int, int]:
    return PALETTE.get(name, _EXTRA_COLOURS[order % len(_EXTRA_COLOURS)])


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45, colour=_BLACK, thick: int = 1) -> None:
    cv2.putText(img, text, org, _FONT, scale, colour, thick, cv2.LINE_AA)


def label_tile(image: np.ndarray, title: str, lines: Sequence[str] = (), outline: np.ndarray | None = None) -> np.ndarray:
    """A tile with a title bar above (and optional text lines drawn on the picture).

    image [S, S, 3]; outline: [S, S] mask whose contour is drawn in green (e.g. the scored region).
    """
    tile = to_uint8(image).copy()
    if outline is not None:
        contours, _ = cv2.findContours((outline > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(tile, contours, -1, (0, 255, 0), 1, cv2.LINE_AA)
    for k, line in enumerate(lines):
        y = tile.shape[0] - 8 - 16 * (len(lines) - 1 - k)
        _text(tile, line, (5, y), 0.42, _BLACK, 3)
        _text(tile, line, (5, y), 0.42, _WHITE, 1)
    bar = np.full((22, tile.shape[1], 3), 255, np.uint8)
    _text(bar, title, (5, 16), 0.5)
    return np.concatenate([bar, tile], axis=0)


def contact_sheet(
    rows: Sequence[Sequence[np.ndarray]],
    labels: Sequence[Sequence[str]] | None = None,
    row_titles: Sequence[str] = (),
    gap: int = 4,
    background: int = 255,
) -> np.ndarray:
    """Grid of equally sized pictures with a gap around each, in rows.

    rows: R lists of up to C pictures [h, w, 3] (uint8, or float in [0, 1]; see models.pictures.to_rgb_uint8);
    labels: a caption above each picture, laid out like rows ("" for none), in a strip max(14, h // 14) px high;
    row_titles: a line of text in a 24 px bar above each row ("" for none).
    Returns RGB uint8 [gap + sum over rows (title + caption + h + gap), gap + C (w + gap), 3].
    """
    if not rows or not rows[0]:
        raise ValueError("expected at least one row of pictures, got none")
    h, w = to_rgb_uint8(rows[0][0]).shape[:2]
    cols = max(len(r) for r in rows)
    caption = max(14, h // 14) if labels else 0
    titled = [k < len(row_titles) and bool(row_titles[k]) for k in range(len(rows))]
    height = gap + sum(_TITLE_BAR * t + caption + h + gap for t in titled)
    sheet = np.full((height, cols * (w + gap) + gap, 3), background, np.uint8)
    y = gap
    for r, row in enumerate(rows):
        if titled[r]:
            _text(sheet, row_titles[r], (gap + 2, y + 17), 0.5, _BLACK, 1)
            y += _TITLE_BAR
        for c, tile in enumerate(row):
            pic = to_rgb_uint8(tile)
            if pic.shape[:2] != (h, w):
                raise ValueError(f"expected pictures of {h}x{w}, got {pic.shape[0]}x{pic.shape[1]}")
            x = gap + c * (w + gap)
            sheet[y + caption : y + caption + h, x : x + w] = pic
            text = labels[r][c] if labels and c < len(labels[r]) else ""
            if text:
                _text(sheet, text, (x + 2, y + int(caption * 0.8)), caption / 30.0, (30, 30, 30), 1)
        y += caption + h + gap
    return sheet


@dataclass(frozen=True)
class Series:
    """Points of one method: x, y [N] (NaN y values are left out)."""

    name: str
    x: np.ndarray
    y: np.ndarray


def _nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    span = max(hi - lo, 1e-9)
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=10 * mag)
    return np.arange(math.ceil(lo / step) * step, hi + 1e-9 * step, step)


def scatter_plot(
    series: Sequence[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    bins: Sequence[tuple[float, float]] = (),
    size: tuple[int, int] = (720, 460),
    xlim: tuple[float, float] | None = None,
) -> np.ndarray:
    """Scatter plot [H, W, 3] of each series, with the mean of each x bin drawn
    as a larger marker joined by lines (bins: [lo, hi) intervals on x)."""
    W, H = size
    left, right, top, bottom = 70, 20, 52, 60
    img = np.full((H, W, 3), 255, np.uint8)
    xs = np.concatenate([s.x for s in series]) if series else np.zeros(0)
    ys = np.concatenate([s.y for s in series]) if series else np.zeros(0)
    ok = np.isfinite(xs) & np.isfinite(ys)
    if xlim is None:
        xlim = (float(xs[ok].min()), float(xs[ok].max())) if ok.any() else (0.0, 1.0)
        if bins:
            xlim = (min(xlim[0], bins[0][0]), max(xlim[1], bins[-1][1]))
    if ok.any():
        ylo, yhi = float(ys[ok].min()), float(ys[ok].max())
    else:
        ylo, yhi = 0.0, 1.0
    pad = 0.08 * max(yhi - ylo, 1e-6)
    ylim = (ylo - pad, yhi + pad)
    if xlim[1] <= xlim[0]:
        xlim = (xlim[0] - 1.0, xlim[1] + 1.0)

    def px(x, y):
        u = left + (x - xlim[0]) / (xlim[1] - xlim[0]) * (W - left - right)
        v = H - bottom - (y - ylim[0]) / (ylim[1] - ylim[0]) * (H - top - bottom)
        return int(round(u)), int(round(v))

    for t in _nice_ticks(*ylim):
        u0, v = px(xlim[0], t)
        cv2.line(img, (left, v), (W - right, v), _GRID, 1)
        label = f"{t:g}" if abs(t) >= 1e-3 or t == 0 else f"{t:.1e}"
        _text(img, label, (5, v + 4), 0.4)
    for t in _nice_ticks(*xlim):
        u, v0 = px(t, ylim[0])
        cv2.line(img, (u, top), (u, H - bottom), _GRID, 1)
        _text(img, f"{t:g}", (u - 8, H - bottom + 18), 0.4)
    for lo, hi in bins:
        u, _ = px(lo, ylim[0])
        cv2.line(img, (u, top), (u, H - bottom), (190, 190, 190), 1)
    cv2.rectangle(img, (left, top), (W - right, H - bottom), _BLACK, 1)
    _text(img, title, (10, 22), 0.55, _BLACK, 1)
    _text(img, xlabel, (left + (W - left - right) // 2 - 60, H - 20), 0.45)
    _text(img, ylabel, (10, top - 10), 0.42)

    for k, s in enumerate(series):
        colour = colour_of(s.name, k)
        good = np.isfinite(s.x) & np.isfinite(s.y)
        for x, y in zip(s.x[good], s.y[good]):
            cv2.circle(img, px(x, y), 3, colour, -1, cv2.LINE_AA)
        means = []
        for lo, hi in bins:
            sel = good & (s.x >= lo) & (s.x < hi)
            if sel.any():
                means.append(px((lo + hi) / 2.0, float(s.y[sel].mean())))
        for a, b in zip(means, means[1:]):
            cv2.line(img, a, b, colour, 2, cv2.LINE_AA)
        for m in means:
            cv2.circle(img, m, 7, colour, 2, cv2.LINE_AA)
        # Legend, top right.
        lx, ly = W - right - 130, top + 18 + 18 * k
        cv2.circle(img, (lx, ly - 4), 5, colour, -1, cv2.LINE_AA)
        _text(img, s.name, (lx + 12, ly), 0.45)
    if bins:
        _text(img, "open circles: bin means", (left + 6, top + 16), 0.4, (90, 90, 90))
    return img


def save_png(path, image: np.ndarray, palette: bool = False) -> None:
    """Write an RGB picture as PNG. palette: in 256 colours (a plot's flat colours and their anti-aliased edges:
    about a fifth of the bytes, the same to the eye)."""
    if palette:
        from PIL import Image

        try:
            Image.fromarray(to_uint8(image)).quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
                str(path), "PNG", optimize=True)
        except (OSError, ValueError) as error:
            raise OSError(f"cannot write '{path}': {error}") from error
        return
    if not cv2.imwrite(str(path), cv2.cvtColor(to_uint8(image), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write '{path}'")


def series_from_records(
    records: Sequence[Mapping], methods: Sequence[str], metric: str, x_key: str = "abs_yaw_diff_deg"
) -> list[Series]:
    """One Series per method from evaluation pair records (see models.evaluation)."""
    out = []
    for m in methods:
        x = np.array([r[x_key] for r in records if m in r["methods"]], np.float64)
        y = np.array(
            [np.nan if r["methods"][m].get(metric) is None else r["methods"][m][metric] for r in records if m in r["methods"]],
            np.float64,
        )
        out.append(Series(m, x, y))
    return out
