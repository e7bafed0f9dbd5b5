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


def test_edge_pixels_smooth_as_the_whole_picture():
    """The CPU smooths the silhouettes' pixels only; the whole-picture twin (the GPU's fixed shapes),
    in float64, gives the same pictures to float rounding, edges on the picture's border included."""
    from models.avatar.render import _silhouette_edges, _smooth_edge_pixels, _smooth_every_pixel

    g = torch.Generator().manual_seed(0)
    V, S = 2, 48
    blobs = torch.nn.functional.interpolate(torch.rand(V, 1, 6, 6, generator=g), size=(S, S), mode="bilinear")
    covered = blobs[:, 0] > 0.5  # blobs with ragged edges, some cut by the picture's border
    alpha = torch.where(covered, 0.4 + 0.6 * torch.rand(V, S, S, generator=g), torch.zeros(()))[:, None]
    both = torch.cat([torch.rand(V, 3, S, S, generator=g) * alpha, alpha], 1)
    edge = _silhouette_edges(alpha)
    assert 0.05 < float(edge.float().mean()) < 0.5
    assert bool(edge[:, 0, 0].any() and edge[:, 0, -1].any() and edge[:, 0, :, 0].any() and edge[:, 0, :, -1].any())
    fast = _smooth_edge_pixels(both.clone(), edge, covered)
    twin = _smooth_every_pixel(both.double(), edge, covered)
    assert (fast.double() - twin).abs().max() <= 1e-6
    assert torch.equal(fast[~edge.expand_as(fast)], both[~edge.expand_as(both)])
