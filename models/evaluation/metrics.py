"""Image-quality, landmark and temporal metrics for novel-view evaluation (identity: models.face.identity).

Conventions (all functions): pictures are numpy arrays [H, W, C] of floating
dtype with values in [0, 1] (data range 1); masks are [H, W] weights in [0, 1]
(soft masks weight pixels, binary masks select them). Identity and landmark
metrics take RGB uint8 pictures [H, W, 3], like :mod:`models.face.analysis`;
the identity descriptor and distance are :mod:`models.face.identity`'s.

The PSNR/SSIM pair follows Wang, Bovik, Sheikh, Simoncelli, "Image quality
assessment: from error visibility to structural similarity", IEEE TIP 2004
(11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03). Flicker follows the
warping error of Lai et al., "Learning Blind Video Temporal Consistency",
ECCV 2018, with an L1 norm.
"""
from __future__ import annotations

import logging
import math

import cv2
import numpy as np

from models.face.analysis import NUM_MESH_VERTICES, FaceAnalyzer, NoFaceError
from models.face.identity import MissingEvalExtraError  # raised by the harness's identity metric; the eval CLI catches it from here
from models.pictures import to_uint8

log = logging.getLogger(__name__)

__all__ = [
    "PSNR_MAX_DB",
    "masked_psnr",
    "ssim_map",
    "masked_ssim",
    "MissingEvalExtraError",
    "landmark_error_pct",
    "output_landmark_error",
    "optical_flow",
    "warp_error",
    "temporal_flicker",
]

PSNR_MAX_DB = 100.0
"""PSNR of identical pictures: MSE is floored at 10^-10 so the value stays finite (and valid JSON)."""

_SSIM_SIGMA = 1.5
_SSIM_KSIZE = 11  # 2 * int(3.5 * sigma + 0.5) + 1, as scikit-image and Wang et al.


def _check_pictures(pred: np.ndarray, target: np.ndarray) -> None:
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, np.ndarray) or x.ndim not in (2, 3):
            raise ValueError(f"expected {name} as a numpy array [H, W] or [H, W, C], got {getattr(x, 'shape', type(x))}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"expected {name} of floating dtype with values in [0, 1], got {x.dtype} (divide uint8 by 255)")
    if pred.shape != target.shape:
        raise ValueError(f"expected pred and target of the same shape, got {pred.shape} and {target.shape}")
    lo = min(float(pred.min()), float(target.min()))
    hi = max(float(pred.max()), float(target.max()))
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"expected values in [0, 1], got min {lo:.4g} max {hi:.4g}")


def _weights(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """Mask [H, W] -> float64 weights [H, W]; all ones when mask is None."""
    if mask is None:
        return np.ones(shape[:2], np.float64)
    if mask.shape != shape[:2]:
        raise ValueError(f"expected mask [H, W] = {shape[:2]}, got {mask.shape}")
    w = mask.astype(np.float64)
    if w.min() < 0.0 or w.max() > 1.0 + 1e-6:
        raise ValueError(f"expected mask values in [0, 1], got min {w.min():.4g} max {w.max():.4g}")
    if w.sum() <= 0.0:
        raise ValueError("expected a mask with at least one pixel > 0, got an empty mask")
    return w


def masked_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB inside a mask, data range 1.

    MSE = sum_p m_p * mean_c (x_pc - y_pc)^2 / sum_p m_p;  PSNR = 10 log10(1 / max(MSE, 1e-10)).
    pred, target: [H, W] or [H, W, C] float in [0, 1]; mask [H, W] in [0, 1] or None (whole picture).
    Identical pictures give :data:`PSNR_MAX_DB`.
    """
    _check_pictures(pred, target)
    w = _weights(mask, pred.shape)
    diff2 = (pred.astype(np.float64) - target.astype(np.float64)) ** 2
    if diff2.ndim == 3:
        diff2 = diff2.mean(axis=2)
    mse = float((w * diff2).sum() / w.sum())
    return float(10.0 * math.log10(1.0 / max(mse, 1e-10)))


def gain_matched(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """pred [H, W, C] with each channel scaled by the gain that matches target best inside the mask (least
    squares: g_c = sum_p m_p x_pc y_pc / sum_p m_p x_pc^2), clipped to [0, 1]. Two cameras of one moment differ by
    about such a gain (their colour balance and exposure), which no avatar built from one of them can know: the
    PSNR of this picture is the error left without it (a diagnostic beside the plain score, never instead of it)."""
    _check_pictures(pred, target)
    if pred.ndim != 3:
        raise ValueError(f"expected colour pictures [H, W, C], got {pred.shape}")
    w = _weights(mask, pred.shape)[..., None]
    x, y = pred.astype(np.float64), target.astype(np.float64)
    gain = (w * x * y).sum(axis=(0, 1)) / np.maximum((w * x * x).sum(axis=(0, 1)), 1e-12)
    return np.clip(x * gain, 0.0, 1.0)


def ssim_map(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM [H, W] (mean over channels), data range 1.

    With Gaussian-weighted local means mu, variances s^2 and covariance s_xy
    (11x11 window, sigma 1.5, reflected borders, population statistics):
    SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),
    C1 = (0.01)^2, C2 = (0.03)^2. Equals scikit-image's structural_similarity(...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, full=True) map.
    """
    _check_pictures(pred, target)
    x = pred.astype(np.float64)
    y = target.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = 0.01**2, 0.03**2

    def blur(a: np.ndarray) -> np.ndarray:
        out = cv2.GaussianBlur(a, (_SSIM_KSIZE, _SSIM_KSIZE), _SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)
        return out.reshape(a.shape)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).mean(axis=2)


def masked_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM map (see :func:`ssim_map`) averaged inside the mask with the mask as weights.

    The windows near the mask's edge still see a few pixels outside it; the
    map is computed on the whole picture and only the average is masked.
    pred, target: [H, W] or [H, W, C] float in [0, 1]; mask [H, W] in [0, 1] or None.
    """
    smap = ssim_map(pred, target)
    w = _weights(mask, pred.shape)
    return float((w * smap).sum() / w.sum())


# ----------------------------------------------------------------------------- landmarks


def landmark_error_pct(pred_px: np.ndarray, target_px: np.ndarray, iod_px: float) -> float:
    """Mean 2D landmark distance in % of the inter-ocular distance.

    pred_px, target_px: [N, 2+] pixel positions (only x, y are used; the first
    468 MediaPipe mesh vertices when more are given); iod_px > 0: the target's
    inter-ocular distance (outer eye corners). error = 100 * mean_i ||p_i - t_i|| / iod.
    """
    pred = np.asarray(pred_px, np.float64)[:NUM_MESH_VERTICES, :2]
    tgt = np.asarray(target_px, np.float64)[:NUM_MESH_VERTICES, :2]
    if pred.shape != tgt.shape:
        raise ValueError(f"expected landmark arrays of one shape, got {pred.shape} and {tgt.shape}")
    if not iod_px > 0.0:
        raise ValueError(f"expected iod_px > 0, got {iod_px}")
    return float(100.0 * np.linalg.norm(pred - tgt, axis=1).mean() / iod_px)


def output_landmark_error(
    analyzer: FaceAnalyzer, output: np.ndarray, target_px: np.ndarray, iod_px: float
) -> tuple[float | None, np.ndarray | None]:
    """Landmark reprojection error of a method's output against the target.

    Runs the face mesh on ``output`` (RGB uint8 [H, W, 3], or float in [0, 1])
    and compares with the target's landmarks ``target_px`` [478, 3] (same
    picture frame). Returns (error in % of iod_px, the output's landmarks
    [478, 3]); (None, None) when no face is found in the output: a failure the
    caller counts and reports.
    """
    try:
        lms = analyzer.landmarks(to_uint8(output))
    except NoFaceError:
        return None, None
    return landmark_error_pct(lms, target_px, iod_px), lms


# ----------------------------------------------------------------------------- flicker


def optical_flow(prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """Dense flow [H, W, 2] (dx, dy px) from ``prev`` to ``nxt`` (DIS, OpenCV), so that
    prev(p) ~ nxt(p + flow(p)). Pictures [H, W, 3] float in [0, 1] or uint8."""
    g0 = cv2.cvtColor(to_uint8(prev), cv2.COLOR_RGB2GRAY)
    g1 = cv2.cvtColor(to_uint8(nxt), cv2.COLOR_RGB2GRAY)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return dis.calc(g0, g1, None)


def _warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: out(p) = image(p + flow(p)), bilinear, [H, W, C]."""
    H, W = flow.shape[:2]
    gx, gy = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    out = cv2.remap(image.astype(np.float32), gx + flow[..., 0], gy + flow[..., 1],
                    cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(image.shape)


def _consistent_flow(flow: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Forward-backward check (Sundaram et al. 2010): [H, W] float32, 1 where
    |f(p) + b(p + f(p))| <= 0.5 + 0.05 (|f|^2 + |b|^2)^0.5, 0 at occlusions and flow errors."""
    back_at = _warp(back, flow)
    err = np.linalg.norm(flow + back_at, axis=2)
    tol = 0.5 + 0.05 * np.sqrt((flow**2).sum(2) + (back_at**2).sum(2))
    return (err <= tol).astype(np.float32)


def warp_error(
    prev: np.ndarray,
    nxt: np.ndarray,
    flow: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    occlusion_check: bool = True,
) -> float:
    """Mean absolute difference between ``prev`` and ``nxt`` warped back onto it.

    prev, nxt: [H, W, 3] float in [0, 1]; flow [H, W, 2] from prev to nxt
    (estimated from the two pictures when None; zeros = no motion compensation);
    mask [H, W] in [0, 1]: pixels of prev to score. With ``occlusion_check``
    (and a non-zero flow), pixels failing the forward-backward test are left out.
    Returns sum_p m_p mean_c |prev - warp(nxt)| / sum_p m_p in [0, 1] units
    (NaN when no pixel is left).
    """
    _check_pictures(prev, nxt)
    if flow is None:
        flow = optical_flow(prev, nxt)
    w = np.ones(prev.shape[:2], np.float64) if mask is None else mask.astype(np.float64)
    if w.shape != prev.shape[:2]:
        raise ValueError(f"expected mask [H, W] = {prev.shape[:2]}, got {w.shape}")
    if occlusion_check and np.any(flow != 0):
        w = w * _consistent_flow(flow, optical_flow(nxt, prev))
    if w.sum() <= 0:
        return float("nan")
    diff = np.abs(prev.astype(np.float64) - _warp(nxt, flow)).reshape(prev.shape[0], prev.shape[1], -1).mean(2)
    return float((w * diff).sum() / w.sum())


def temporal_flicker(
    frames: np.ndarray,
    masks: np.ndarray | None = None,
    flow_frames: np.ndarray | None = None,
    compensate: bool = True,
) -> float:
    """Flicker of a frame sequence: mean warping error of consecutive frames.

    frames: [T, H, W, 3] float in [0, 1] (T >= 2), e.g. the refined views of a
    slow orbit; masks [T, H, W] in [0, 1] (pixels of frame t scored:
    masks[t] * warp(masks[t+1]), less occlusions); flow_frames [T, H, W, 3]:
    the sequence the motion is estimated on (default: ``frames``). For a
    refiner, estimate the motion on the RAW renders, whose geometry is
    consistent by construction, so that the refined sequence's extra error is
    the refiner's flicker. compensate=False scores the plain |f_t - f_{t+1}|.
    Returns the mean over the T-1 steps in [0, 1] units (NaN if none could be scored).
    """
    if frames.ndim != 4 or frames.shape[0] < 2:
        raise ValueError(f"expected frames [T >= 2, H, W, 3], got {frames.shape}")
    motion = frames if flow_frames is None else flow_frames
    if motion.shape != frames.shape:
        raise ValueError(f"expected flow_frames of shape {frames.shape}, got {motion.shape}")
    if masks is not None and masks.shape != frames.shape[:3]:
        raise ValueError(f"expected masks [T, H, W] = {frames.shape[:3]}, got {masks.shape}")
    errors = []
    for t in range(frames.shape[0] - 1):
        if compensate:
            flow = optical_flow(motion[t], motion[t + 1])
            m = _consistent_flow(flow, optical_flow(motion[t + 1], motion[t]))
        else:
            flow = np.zeros(frames.shape[1:3] + (2,), np.float32)
            m = np.ones(frames.shape[1:3], np.float32)
        if masks is not None:
            m = m * masks[t] * np.clip(_warp(masks[t + 1].astype(np.float32)[..., None], flow)[..., 0], 0.0, 1.0)
        e = warp_error(frames[t], frames[t + 1], flow=flow, mask=m, occlusion_check=False)
        if math.isfinite(e):
            errors.append(e)
    return float(np.mean(errors)) if errors else float("nan")
