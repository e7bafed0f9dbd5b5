"""Pictures for people: contact sheets with labels (README figures, CLI outputs, eval)."""
from __future__ import annotations

import cv2
import numpy as np
import torch

__all__ = ["to_uint8", "contact_sheet"]


def to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, H, W] tensor in [0, 1] or [H, W, 3] array (uint8 or float in [0, 1]) -> RGB uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().clamp(0, 1).cpu()
        if arr.ndim == 3 and arr.shape[0] in (1, 3):
            arr = arr.permute(1, 2, 0)
        arr = arr.numpy()
    else:
        arr = image
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def contact_sheet(
    rows: list[list[np.ndarray]],
    labels: list[list[str]] | None = None,
    gap: int = 4,
    background: int = 255,
) -> np.ndarray:
    """Tile RGB uint8 pictures (all the same size) in rows, each with a caption strip.

    rows: R lists of C pictures [H, W, 3]; labels: same layout, "" for none.
    Returns RGB uint8 [R * (H + caption + gap), C * (W + gap), 3].
    """
    if not rows or not rows[0]:
        raise ValueError("expected at least one picture")
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    caption = max(14, h // 14) if labels else 0
    sheet = np.full((len(rows) * (h + caption + gap) + gap, cols * (w + gap) + gap, 3), background, np.uint8)
    scale = caption / 30.0
    for r, row in enumerate(rows):
        for c, pic in enumerate(row):
            if pic.shape[:2] != (h, w):
                pic = cv2.resize(pic, (w, h), interpolation=cv2.INTER_AREA)
            y = gap + r * (h + caption + gap)
            x = gap + c * (w + gap)
            sheet[y + caption : y + caption + h, x : x + w] = pic
            text = labels[r][c] if labels and c < len(labels[r]) else ""
            if text:
                cv2.putText(sheet, text, (x + 2, y + int(caption * 0.8)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                            (30, 30, 30), 1, cv2.LINE_AA)
    return sheet
