import math

import numpy as np
import pytest
import torch

from models.geometry.camera import (
    OrbitPose,
    intrinsics_from_fov,
    orbit_viewmats,
    project,
    rotation_to_euler_deg,
    unproject,
)


def _orbit(pivot, yaw, pitch, roll=0.0, dist=1.0):
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    return orbit_viewmats(torch.tensor(pivot), t(yaw), t(pitch), t(roll), t(dist))[0]


def test_zero_orbit_is_the_source_camera():
    vm = _orbit([0.03, -0.02, 0.6], 0, 0)
    assert torch.allclose(vm, torch.eye(4), atol=1e-6)


def test_yaw_moves_camera_to_the_viewers_right_and_pitch_up():
    pivot = [0.0, 0.0, 0.5]
    vm = _orbit(pivot, 30, 0)
    centre = -(vm[:3, :3].T @ vm[:3, 3])
    assert centre[0] == pytest.approx(0.5 * math.sin(math.radians(30)), abs=1e-6)  # +x = picture right
    vm = _orbit(pivot, 0, 10)
    centre = -(vm[:3, :3].T @ vm[:3, 3])
    assert centre[1] < 0  # -y = up


def test_pivot_keeps_its_pixel_and_distance_scales():
    pivot = torch.tensor([0.05, -0.03, 0.7])
    K = intrinsics_from_fov(30.0, 256, 256)
    base = project(pivot[None], torch.eye(4), K)
    for yaw, pitch, dist in [(25, -10, 1.0), (-40, 15, 0.7)]:
        vm = _orbit(pivot.tolist(), yaw, pitch, 0.0, dist)
        px = project(pivot[None], vm, K)
        assert torch.allclose(px[..., :2], base[..., :2], atol=1e-3)
        assert px[0, 2] == pytest.approx(dist * 0.7, rel=1e-4)  # depth of the pivot scales with dist


def test_project_unproject_round_trip():
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(64, 3, generator=g) * torch.tensor([0.4, 0.4, 0.5]) + torch.tensor([-0.2, -0.2, 0.4])
    vm = _orbit([0.0, 0.0, 0.6], 17, -8, 5)
    K = intrinsics_from_fov(40.0, 300, 200)
    back = unproject(project(pts, vm, K), vm, K)
    assert torch.allclose(back, pts, atol=1e-5)


@pytest.mark.parametrize("yaw,pitch,roll", [(30, 0, 0), (0, 12, 0), (-35, 20, -10), (20, -15, 5)])
def test_euler_matches_orbit_angles(yaw, pitch, roll):
    vm = _orbit([0.0, 0.0, 0.5], yaw, pitch, roll)
    got = rotation_to_euler_deg(vm[:3, :3])
    assert torch.allclose(got, torch.tensor([yaw, pitch, roll], dtype=torch.float32), atol=1e-3)
    host = rotation_to_euler_deg(vm[:3, :3].double().numpy())  # the face analysis's form: numpy in, numpy out
    assert isinstance(host, np.ndarray) and np.allclose(host, [yaw, pitch, roll], atol=1e-4)


def test_orbit_pose_validates():
    with pytest.raises(ValueError, match="finite"):
        OrbitPose(yaw_deg=float("nan"))
    with pytest.raises(ValueError, match="pitch_deg"):
        OrbitPose(pitch_deg=95)
    with pytest.raises(ValueError, match="dist_scale"):
        OrbitPose(dist_scale=0.0)
