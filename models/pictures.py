"""8-bit pictures from [0, 1] floats: the one quantisation rule (to_uint8), the one change
to the RGB [H, W, 3] layout that OpenCV, PyAV and PNG writers take (to_rgb_uint8), and writing one to a
file (write_rgb). Any layer may import it."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_uint8", "to_rgb_uint8", "write_rgb"]


def to_uint8(image: torch.Tensor | np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor | np.ndarray:
    """Quantise values in [0, 1] to 8 bits: round(clip(x, 0, 1) * 255), ties to even (np.round, torch.round).

    image: a numpy array or a torch tensor of any shape. Returns the same kind, shape and device,
    dtype uint8; a uint8 input comes back unchanged. A tensor is multiplied in float32 (x.float()),
    an array in its own float dtype.
    out: for a tensor, a uint8 tensor of its shape (any strides, e.g. a channels-last view) written and
    returned instead of a new one.
    """
    if isinstance(image, torch.Tensor):
        if out is not None:
            if out.dtype != torch.uint8 or out.shape != image.shape:
                raise ValueError(f"expected out as uint8 {tuple(image.shape)}, got {out.dtype} {tuple(out.shape)}")
            return out.copy_(image if image.dtype == torch.uint8 else image.detach().float().clamp(0, 1).mul(255).round_())
        if image.dtype == torch.uint8:
            return image
        return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    if out is not None:
        raise ValueError("expected out only with a tensor")
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def to_rgb_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A picture -> contiguous RGB uint8 numpy [H, W, 3], quantised by :func:`to_uint8`.

    image: a tensor [3, H, W], [1, H, W] or [H, W], or an array [H, W, 3], [H, W, 1] or [H, W];
    uint8, or float in [0, 1]. Grey pictures are repeated into the three channels.
    """
    if isinstance(image, torch.Tensor):
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[0] not in (1, 3)):
            raise ValueError(f"expected a picture tensor [3, H, W], [1, H, W] or [H, W], got {tuple(image.shape)}")
        arr = to_uint8(image).cpu()
        arr = (arr.permute(1, 2, 0) if arr.ndim == 3 else arr).numpy()
    else:
        arr = to_uint8(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected a picture array [H, W, 3], [H, W, 1] or [H, W], got {tuple(arr.shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def write_rgb(path, rgb: np.ndarray, jpeg_quality: int | None = None) -> None:
    """Write an RGB uint8 [H, W, 3] picture to ``path`` (the format from its extension). OSError where it
    cannot: cv2.imwrite only returns False for a folder it cannot write, and raises its own error for an
    extension it has no writer for."""
    import cv2

    params = [] if jpeg_quality is None else [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
    try:
        ok = cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]), params)
    except cv2.error:
        ok = False
    if not ok:
        raise OSError(f"cannot write {path}")
