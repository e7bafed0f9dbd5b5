"""Landmarks smoothed over frames (models.face.smoothing): a face at rest stops jittering, a moving one is
followed, a face back after a gap starts afresh."""

from pathlib import Path

import numpy as np
import pytest

from models.face.analysis import LEFT_EYE_OUTER, RIGHT_EYE_OUTER, observation_from_landmarks
from models.face.smoothing import LandmarkSmoother, OneEuroFilter

STORED = np.load(Path(__file__).resolve().parents[3] / "benchmarks" / "astronaut_face.npz")
FPS = 30.0


def observation(shift_px=(0.0, 0.0), noise_px=0.0, rng=None):
    lm = STORED["landmarks"].astype(np.float32).copy()
    lm[:, :2] += np.asarray(shift_px, np.float32)
    if noise_px:
        lm[:, :2] += rng.normal(0.0, noise_px, lm[:, :2].shape).astype(np.float32)
    return observation_from_landmarks(lm, (512, 512), float(STORED["fov_deg"]), None)


def motion(observations):
    """Median frame-to-frame landmark motion, pixels."""
    lm = np.stack([o.landmarks_px[:, :2] for o in observations])
    return float(np.median(np.linalg.norm(np.diff(lm, axis=0), axis=-1)))


def test_a_face_at_rest_stops_jittering():
    rng = np.random.default_rng(0)
    raw = [observation(noise_px=0.5, rng=rng) for _ in range(60)]
    smoother = LandmarkSmoother()
    smoothed = [smoother(i / FPS, o) for i, o in enumerate(raw)]
    # A first-order low-pass at 1 Hz on 30 fps white noise keeps about a sixth of the frame-to-frame motion;
    # the speed-adaptive cutoff (noise reads as speed) lets up to twice that through
    assert motion(smoothed[10:]) < 0.35 * motion(raw[10:])
    still = observation()
    assert np.abs(smoothed[-1].landmarks_px[:, :2] - still.landmarks_px[:, :2]).mean() < 0.5  # around the true face


def test_a_moving_face_is_followed_and_caught_up_with():
    raw = [observation((10.0 * min(i, 20), 0.0)) for i in range(30)]  # 300 px/s for 20 frames, then at rest
    smoother = LandmarkSmoother()
    smoothed = [smoother(i / FPS, o) for i, o in enumerate(raw)]
    lag = [float((r.landmarks_px[:, 0] - s.landmarks_px[:, 0]).mean()) for r, s in zip(raw, smoothed)]
    assert 0.0 <= lag[19] < 5.0  # behind by less than half a frame's motion while moving fast
    assert abs(lag[23]) < 0.5  # and caught up within 3 frames of stopping
    eyes = lambda o: o.landmarks_px[[LEFT_EYE_OUTER, RIGHT_EYE_OUTER], :2]  # noqa: E731
    assert np.allclose(np.diff(eyes(smoothed[-1]), axis=0), np.diff(eyes(raw[-1]), axis=0), atol=0.5)  # the shape


def test_a_face_back_after_a_gap_starts_afresh():
    smoother = LandmarkSmoother(reset_after_s=0.5)
    for i in range(10):
        smoother(i / FPS, observation())
    far = observation((80.0, 40.0))
    back = smoother(10 / FPS + 1.0, far)
    np.testing.assert_array_equal(back.landmarks_px, far.landmarks_px)
    assert back.pose.yaw_deg == pytest.approx(far.pose.yaw_deg)


def test_a_frame_stamped_before_the_last_starts_afresh():
    """A clip that loops (its frames' times start again) is not held at the last output until time catches up."""
    smoother = LandmarkSmoother()
    for i in range(10):
        smoother(5.0 + i / FPS, observation())
    again = observation((30.0, 0.0))
    np.testing.assert_array_equal(smoother(0.0, again).landmarks_px, again.landmarks_px)


def test_the_smoothed_observation_is_a_whole_one():
    """Metric points and pose are worked out from the smoothed landmarks; size, field of view and mask kept."""
    lm = STORED["landmarks"].astype(np.float32)
    mask = np.ones((512, 512), np.float32)
    obs = observation_from_landmarks(lm, (512, 512), 30.0, mask)
    smoother = LandmarkSmoother()
    smoother(0.0, obs)
    shifted = observation_from_landmarks(lm + np.float32([3.0, 0.0, 0.0]), (512, 512), 30.0, mask)
    out = smoother(1 / FPS, shifted)
    again = observation_from_landmarks(out.landmarks_px, (512, 512), 30.0, mask)
    np.testing.assert_allclose(out.points_cam, again.points_cam)
    assert out.mask is mask and out.fov_deg == 30.0 and out.image_size == (512, 512)
    assert 0.0 < float((out.landmarks_px - lm)[:, 0].mean()) < 3.0  # part of the way


def test_the_one_euro_filter_passes_a_first_sample_and_ignores_old_ones():
    f = OneEuroFilter(1.0, 0.0, 1.0)
    np.testing.assert_array_equal(f(0.0, np.array([1.0, 2.0])), [1.0, 2.0])
    np.testing.assert_array_equal(f(0.0, np.array([5.0, 5.0])), [1.0, 2.0])  # not newer
    assert f.last_t == 0.0
