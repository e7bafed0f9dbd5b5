"""A stand-in for models.avatar (put in sys.modules by a test): build_avatar keeps the picture, crop
resizes it, render_views returns 0.9 x the source view. For the plumbing of evaluation and the CLI
without the cost of the real avatar."""
import numpy as np


class FakeAvatar:
    def __init__(self, image, geometry):
        self.image, self.geometry = image, geometry

    def crop(self, image, size):
        import cv2
        import torch

        arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        arr = cv2.resize(arr, (size, size), interpolation=cv2.INTER_AREA)
        arr = arr[..., None] if arr.ndim == 2 else arr
        return torch.from_numpy(arr).permute(2, 0, 1)

    def source_view(self, size):
        return self.crop(self.image, size)


def fake_avatar_module():
    import types

    import torch

    mod = types.ModuleType("models.avatar")
    mod.AvatarConfig = lambda: "config"
    mod.calls = []

    def build_avatar(image, obs, config, device="cpu", geometry=None, render_size=512):
        mod.calls.append((config, device, geometry is not None, render_size))
        return FakeAvatar(image, geometry)

    def render_views(avatar, poses, size):
        rgb = avatar.source_view(size)[None].repeat(len(poses), 1, 1, 1) * 0.9
        ones = torch.ones(len(poses), 1, size, size)
        return types.SimpleNamespace(rgb=rgb, alpha=ones, seen=ones, depth=ones)

    mod.build_avatar, mod.render_views = build_avatar, render_views
    return mod
