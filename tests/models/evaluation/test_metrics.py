"""Metrics against hand-computed numbers and scikit-image."""
import math

import cv2
import numpy as np
import pytest
import skimage.data
from skimage.metrics import structural_similarity

from models.evaluation.metrics import (
    PSNR_MAX_DB,
    gain_matched,
    landmark_error_pct,
    masked_psnr,
    masked_ssim,
    output_landmark_error,
    ssim_map,
    temporal_flicker,
    warp_error,
)
from models.face.identity import identity_distance


def const(value, shape=(32, 32, 3)):
    return np.full(shape, value, np.float64)


def test_psnr_constant_offset_is_20db():
    # MSE = 0.1^2 = 0.01 -> 10 log10(1 / 0.01) = 20 dB.
    assert masked_psnr(const(0.5), const(0.6)) == pytest.approx(20.0, abs=1e-9)


def test_psnr_counts_only_pixels_inside_the_mask():
    pred, target = const(0.5), const(0.5)
    pred[:, 16:] = 0.0  # wrong only on the right half
    mask = np.zeros((32, 32), np.float32)
    mask[:, :16] = 1.0
    assert masked_psnr(pred, target, mask) == PSNR_MAX_DB
    # Right half: MSE 0.25 -> 10 log10(4) = 6.0206 dB.
    assert masked_psnr(pred, target, 1.0 - mask) == pytest.approx(10 * math.log10(4.0), abs=1e-9)
    # Whole picture: MSE 0.125 -> 10 log10(8) = 9.0309 dB.
    assert masked_psnr(pred, target) == pytest.approx(10 * math.log10(8.0), abs=1e-9)


def test_psnr_soft_mask_weights_pixels():
    pred, target = const(0.0, (2, 2)), const(0.0, (2, 2))
    pred[0, 0] = 0.2  # squared error 0.04 at one pixel of weight 0.5
    mask = np.array([[0.5, 1.0], [1.0, 0.5]])
    # MSE = 0.5 * 0.04 / 3 = 0.00666..., PSNR = 10 log10(150) = 21.7609 dB
    assert masked_psnr(pred, target, mask) == pytest.approx(10 * math.log10(150.0), abs=1e-9)


def test_a_colour_balance_between_cameras_is_taken_out_and_detail_is_not():
    rng = np.random.default_rng(0)
    picture = rng.uniform(0.1, 0.8, (24, 24, 3))
    target = picture * np.array([1.2, 0.9, 1.0])  # another camera's colour balance
    assert masked_psnr(picture, target) < 25.0
    assert masked_psnr(gain_matched(picture, target), target) == pytest.approx(PSNR_MAX_DB)
    # a difference of detail (noise) stays: the gain cannot fit it
    noisy = np.clip(target + rng.normal(0.0, 0.05, target.shape), 0.0, 1.0)
    assert masked_psnr(gain_matched(picture, noisy), noisy) == pytest.approx(masked_psnr(target, noisy), abs=0.2)


def test_the_gain_is_fitted_inside_the_mask_only():
    picture = const(0.5)
    target = const(0.5)
    target[:16] = 0.6  # inside the mask the target is 1.2 times brighter; outside equal
    mask = np.zeros((32, 32))
    mask[:16] = 1.0
    matched = gain_matched(picture, target, mask)
    assert matched[:16] == pytest.approx(np.full((16, 32, 3), 0.6))
    assert masked_psnr(matched, target, mask) == pytest.approx(PSNR_MAX_DB)
    with pytest.raises(ValueError, match="colour"):
        gain_matched(picture[..., 0], target[..., 0])


def test_ssim_of_constant_pictures_is_the_luminance_term():
    # No variance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) = 0.6001 / 0.6101.
    assert masked_ssim(const(0.5), const(0.6)) == pytest.approx(0.6001 / 0.6101, abs=1e-9)
    assert masked_ssim(const(0.3), const(0.3)) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_a_picture_and_its_negative_in_a_flat_grey_region():
    # x = 0.5 + d * pattern, y = 0.5 - d * pattern: mu equal, s_xy = -s^2
    # -> SSIM = (C2 - 2 s^2) / (2 s^2 + C2) where the window variance is s^2.
    rng = np.random.default_rng(0)
    pattern = rng.choice([-1.0, 1.0], size=(64, 64))
    x, y = 0.5 + 0.1 * pattern, 0.5 - 0.1 * pattern
    value = masked_ssim(x, y)
    assert -1.0 <= value < -0.8


def test_ssim_map_equals_scikit_image():
    img = skimage.data.astronaut()[100:228, 150:278].astype(np.float64) / 255.0
    noisy = np.clip(img + np.random.default_rng(1).normal(0, 0.05, img.shape), 0, 1)
    mean, full = structural_similarity(
        img, noisy, channel_axis=2, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, data_range=1.0, full=True,
    )
    ours = ssim_map(img, noisy)
    np.testing.assert_allclose(ours, full.mean(axis=2), atol=1e-6)
    # scikit-image's mean leaves out a 5-pixel border; so does a mask that does.
    mask = np.zeros(img.shape[:2])
    mask[5:-5, 5:-5] = 1.0
    assert masked_ssim(img, noisy, mask) == pytest.approx(mean, abs=1e-6)


def test_metrics_reject_uint8_and_bad_masks():
    with pytest.raises(ValueError, match="floating dtype"):
        masked_psnr(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="empty mask"):
        masked_psnr(const(0.1), const(0.2), np.zeros((32, 32)))
    with pytest.raises(ValueError, match=r"expected mask \[H, W\]"):
        masked_ssim(const(0.1), const(0.2), np.ones((16, 16)))
    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        masked_psnr(const(0.1), const(2.0))


def test_landmark_error_in_percent_of_iod():
    target = np.zeros((468, 3))
    pred = target.copy()
    pred[:, 0] += 3.0
    pred[:, 1] += 4.0  # every point 5 px off
    assert landmark_error_pct(pred, target, iod_px=50.0) == pytest.approx(10.0)
    # 478-point arrays: the 10 iris points are left out.
    pred478 = np.concatenate([pred, np.full((10, 3), 1000.0)])
    target478 = np.concatenate([target, np.zeros((10, 3))])
    assert landmark_error_pct(pred478, target478, iod_px=50.0) == pytest.approx(10.0)


class _NoFaceAnalyzer:
    def landmarks(self, image):
        from models.face.analysis import NoFaceError
        raise NoFaceError("no face found in the picture")


def test_output_without_a_face_is_a_reported_failure():
    err, lms = output_landmark_error(_NoFaceAnalyzer(), np.zeros((64, 64, 3)), np.zeros((478, 3)), 30.0)
    assert err is None and lms is None


def textured(h=96, w=96, seed=0):
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.0)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    return np.repeat(noise[..., None], 3, axis=2).astype(np.float64)


def test_flicker_of_alternating_brightness_without_motion_compensation():
    # Frames alternate 0.4 / 0.5: every step differs by exactly 0.1.
    frames = np.stack([const(0.4 if t % 2 == 0 else 0.5, (24, 24, 3)) for t in range(5)])
    assert temporal_flicker(frames, compensate=False) == pytest.approx(0.1, abs=1e-6)
    static = np.stack([textured()] * 4)
    assert temporal_flicker(static) == pytest.approx(0.0, abs=1e-6)


def test_flicker_compensates_motion():
    base = textured(128, 160)
    frames = np.stack([np.roll(base, shift=2 * t, axis=1) for t in range(4)])[:, 16:-16, 24:-24]
    plain = temporal_flicker(frames, compensate=False)
    compensated = temporal_flicker(frames)
    assert plain > 0.02
    assert compensated < 0.1 * plain
    # Motion taken from another sequence (the raw renders): same answer here.
    assert temporal_flicker(frames, flow_frames=frames.copy()) == pytest.approx(compensated)


def test_warp_error_with_zero_flow_is_mean_abs_difference():
    a, b = const(0.2, (16, 16, 3)), const(0.5, (16, 16, 3))
    assert warp_error(a, b, flow=np.zeros((16, 16, 2), np.float32)) == pytest.approx(0.3)


def test_identity_distance_is_euclidean():
    assert identity_distance(np.zeros(128), np.full(128, 0.5)) == pytest.approx(0.5 * math.sqrt(128))


def test_identity_embedder_same_person_is_close():
    pytest.importorskip("dlib", reason="identity metrics need the eval extra")
    from models.face.analysis import FaceAnalyzer, FaceConfig
    from models.face.identity import IdentityEmbedder

    img = skimage.data.astronaut()
    crop = cv2.resize(img[0:320, 90:410], (200, 200), interpolation=cv2.INTER_AREA)
    with FaceAnalyzer(FaceConfig(segmentation=False)) as analyzer:
        lms_full, lms_crop = analyzer.landmarks(img), analyzer.landmarks(crop)
    embedder = IdentityEmbedder()
    full = embedder.embed(img, lms_full)
    assert full.shape == (128,) and full.dtype == np.float32
    assert identity_distance(full, embedder.embed(crop, lms_crop)) < 0.3
    # The landmark box and dlib's own detector box agree.
    assert identity_distance(full, embedder.embed(img)) < 0.1


def test_identity_embedder_names_the_eval_extra_when_missing(monkeypatch):
    import importlib.util

    from models.face import identity

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "face_recognition_models" else real(name, *a))
    pytest.importorskip("dlib")
    with pytest.raises(identity.MissingEvalExtraError, match=r"\[eval\]"):
        identity.IdentityEmbedder()
