"""The render's two layouts of its per-pixel maths: every pixel (fixed shapes, the CUDA graphs' path) and
the covered pixels only (the CPU's exact raster) give the same pictures."""
import pytest
import torch

from models.avatar import AvatarConfig, build_avatar
from models.avatar.memory import AppearanceMemory, MemoryConfig
from models.avatar.render import render_cameras
from models.geometry.camera import OrbitPose
from tests.models.avatar.synthetic_head import turning_head_frame


def _same_renders(avatar, poses, size):
    viewmats, Ks = avatar.cameras(poses, size)
    covered = render_cameras(avatar, viewmats, Ks, size)  # the raster lists the covered pixels
    dense = render_cameras(avatar, viewmats, Ks, size, capacity=8 * size * size * len(poses))
    assert int(dense.needed) <= 8 * size * size * len(poses)
    drawn = float((covered.alpha > 0.5).float().mean())
    assert 0.1 < drawn < 0.95, f"the head should cover part of the picture, covers {100 * drawn:.0f} %"
    for name in ("rgb", "alpha", "depth", "seen"):
        a, b = getattr(covered, name), getattr(dense, name)
        assert a.shape == b.shape == (len(poses), a.shape[1], size, size)
        assert (a - b).abs().max() <= 1e-5, f"{name}: max |diff| {float((a - b).abs().max())}"


@pytest.mark.parametrize("background", ["remove", "far"])
def test_covered_pixels_render_as_every_pixel(analyzer, astronaut, background):
    avatar = build_avatar(astronaut, analyzer.analyze(astronaut), AvatarConfig(background=background), render_size=128)
    _same_renders(avatar, [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in ((0, 0), (-35, 5), (25, -10))], 128)
    _same_renders(avatar, [OrbitPose(yaw_deg=20, dist_scale=1.6)], 96)


def test_covered_pixels_render_as_every_pixel_with_the_memory():
    memory = AppearanceMemory(MemoryConfig(texels=64))
    for i, yaw in enumerate((0, 30, 15)):
        image, obs, _ = turning_head_frame(yaw)
        avatar = memory.observe(build_avatar(image, obs, render_size=128), image, obs, t_s=i / 30)
    assert avatar.memory is not None
    _same_renders(avatar, [OrbitPose(yaw_deg=-20), OrbitPose(yaw_deg=40)], 128)
