"""Head-tracked parallax: the window mapping's signs and slope, its clamping, the One-Euro filter."""

import math

import numpy as np
import pytest

from models.face.smoothing import OneEuroFilter
from telepresence.stream.headtrack import HeadTracker, HeadTrackingConfig, window_offset
from telepresence.stream.messages import PoseLimits

CONFIG = HeadTrackingConfig()
LIMITS = PoseLimits()


def offset(x_cm=0.0, y_cm=0.0, z_cm=60.0, config=CONFIG):
    return window_offset(np.array([x_cm, y_cm, z_cm]) / 100.0, config, LIMITS)


def test_eyes_on_the_camera_axis_at_rest_see_the_others_head_on():
    o = offset()
    assert (o.yaw_deg, o.pitch_deg, o.dist_scale, o.tracking) == (0.0, 0.0, 1.0, True)


def test_moving_to_ones_left_turns_the_camera_to_the_viewers_left_like_a_window():
    # The camera faces the participant: their left is +x in its (unmirrored) picture. The camera
    # moving to the viewer's left is yaw < 0 (models/geometry/camera.py): more of the other's right cheek.
    assert offset(x_cm=10).yaw_deg < 0 < offset(x_cm=-10).yaw_deg
    # head up (-y): the camera rises and looks down onto the other's head (pitch > 0)
    assert offset(y_cm=-8).pitch_deg > 0 > offset(y_cm=8).pitch_deg
    # leaning in brings the camera closer
    assert offset(z_cm=40).dist_scale < 1.0 < offset(z_cm=80).dist_scale


def test_the_slope_is_the_documented_degrees_per_cm():
    per_cm = CONFIG.degrees_per_cm()
    assert per_cm == pytest.approx(CONFIG.gain * math.degrees(0.01 / 1.2))
    assert 0.9 < per_cm < 1.0  # docs/call.md: about 0.95 degrees per cm at 60 cm
    assert -offset(x_cm=1).yaw_deg == pytest.approx(per_cm, rel=1e-3)
    assert offset(y_cm=-1).pitch_deg == pytest.approx(per_cm, rel=1e-3)
    # farther away, the same motion turns the camera less (the angle it subtends is smaller)
    assert -offset(x_cm=1, z_cm=100).yaw_deg < -offset(x_cm=1).yaw_deg
    assert offset(x_cm=10, config=HeadTrackingConfig(gain=0)).yaw_deg == 0.0


def test_the_offset_is_clamped_to_the_pose_limits():
    far = offset(x_cm=-300, y_cm=-300, z_cm=500)
    assert far.yaw_deg == LIMITS.yaw_deg and far.pitch_deg == LIMITS.pitch_deg and far.dist_scale == LIMITS.dist_max
    near = offset(x_cm=300, y_cm=300, z_cm=1)
    assert near.yaw_deg == -LIMITS.yaw_deg and near.pitch_deg == -LIMITS.pitch_deg and near.dist_scale == LIMITS.dist_min


def test_the_one_euro_filter_steadies_a_head_at_rest_and_follows_one_that_moves():
    rng = np.random.default_rng(0)
    f = OneEuroFilter(CONFIG.min_cutoff_hz, CONFIG.beta, CONFIG.d_cutoff_hz)
    t = np.arange(90) / 30.0  # 3 s at 30 fps
    noisy = 0.1 * rng.standard_normal(t.size)  # cm: iris jitter of a still head (0.5 px at 60 cm is 0.03 cm)
    out = np.array([f(ti, np.array([xi]))[0] for ti, xi in zip(t, noisy)])
    assert out[30:].std() < noisy[30:].std() / 2.5
    assert out[30:].std() * CONFIG.degrees_per_cm() < 0.05  # degrees: no visible shake

    # a 20 cm move at 40 cm/s: the filter is within 1 cm of the head 0.15 s after it stops
    f.reset()
    t = np.arange(60) / 30.0
    path = np.clip((t - 0.5) * 40.0, 0.0, 20.0)  # starts at 0.5 s, stops at 1.0 s
    out = np.array([f(ti, np.array([xi]))[0] for ti, xi in zip(t, path)])
    stop = int(round((1.0 + 0.15) * 30))
    assert abs(out[stop] - 20.0) < 1.0, out[stop]
    assert f(t[-1], np.array([99.0]))[0] == pytest.approx(out[-1])  # a repeated timestamp changes nothing


def test_the_tracker_holds_the_last_offset_while_the_face_is_lost():
    tracker = HeadTracker()
    for i in range(30):
        moved = tracker.update(i / 30, np.array([0.1, 0.0, 0.6]))
    assert moved.tracking and moved.yaw_deg < -5
    lost = tracker.update(1.0, None)
    assert not lost.tracking and lost.yaw_deg == moved.yaw_deg
    back = tracker.update(3.0, np.array([-0.1, 0.0, 0.6]))  # back after 2 s: no glide from the old place
    assert back.yaw_deg == pytest.approx(-offset(x_cm=10).yaw_deg)
