"""The source-view depth map: its separable max filter is max_pool2d's numbers."""
import torch
import torch.nn.functional as F

from models.avatar.visibility import max_filter3x3


def test_separable_max_filter_equals_max_pool():
    torch.manual_seed(0)
    depth = torch.rand(1, 1, 37, 51)
    depth[depth > 0.7] = float("inf")
    assert torch.equal(max_filter3x3(depth), F.max_pool2d(depth, 3, stride=1, padding=1))
