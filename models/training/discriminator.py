"""Multi-scale PatchGAN discriminator (pix2pix / pix2pixHD, Isola et al. 2017, Wang et al. 2018).

Each scale is a fully convolutional patch classifier; scale k sees the image
average-pooled k times (factor 2 each), so together they judge texture and
layout. Spectral normalisation (Miyato et al. 2018) on every conv, no batch
norm (small per-GPU batches, DDP), LeakyReLU 0.2, trained with the hinge loss
(models.training.losses).

    image [N, 3, H, W] in [0, 1] -> per scale: logits [N, 1, h_k, w_k] and
    the activations of every hidden layer (for feature matching)

With ``channels=64, layers=3``, 2 scales: about 5.5 M parameters; a 256 x 256
input gives 30 x 30 (scale 0) and 14 x 14 (scale 1) patch maps, receptive field
70 pixels of each scale's input.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Architecture of the multi-scale PatchGAN."""

    scales: int = 2
    """Number of image scales judged (each halves the previous)."""
    channels: int = 64
    """Channels of the first conv; doubled per stride-2 layer, capped at 8x."""
    layers: int = 3
    """Stride-2 convs per scale after the first one (3: 70-pixel receptive field)."""
    spectral_norm: bool = True
    """Spectral normalisation on every conv."""

    def __post_init__(self):
        if self.scales < 1 or self.channels < 1 or self.layers < 1:
            raise ValueError(f"expected scales, channels, layers >= 1, got {self.scales}, {self.channels}, {self.layers}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class PatchDiscriminator(nn.Module):
    """One scale: conv4 s2 -> (conv4 s2) x (layers - 1) -> conv4 s1 -> conv4 s1 to one logit per patch."""

    def __init__(self, config: DiscriminatorConfig, in_channels: int = 3):
        super().__init__()
        sn = spectral_norm if config.spectral_norm else (lambda m: m)
        c = config.channels
        blocks = [nn.Sequential(sn(nn.Conv2d(in_channels, c, 4, 2, 1)), nn.LeakyReLU(0.2))]
        for i in range(1, config.layers + 1):
            c_in, c = c, min(config.channels * 2**i, config.channels * 8)
            stride = 2 if i < config.layers else 1
            blocks.append(nn.Sequential(sn(nn.Conv2d(c_in, c, 4, stride, 1)), nn.LeakyReLU(0.2)))
        self.blocks = nn.ModuleList(blocks)
        self.head = sn(nn.Conv2d(c, 1, 4, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.head(x), features


class MultiScaleDiscriminator(nn.Module):
    """Patch discriminators on an image pyramid. forward(x [N, 3, H, W] in [0, 1]) ->
    (logits: list of [N, 1, h_k, w_k], features: list of per-layer activation lists)."""

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        self.config = config
        self.scales = nn.ModuleList(PatchDiscriminator(config) for _ in range(config.scales))

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[list[Tensor]]]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(x.shape)}")
        x = x * 2 - 1  # [-1, 1]
        logits, features = [], []
        for k, d in enumerate(self.scales):
            if k:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out, feats = d(x)
            logits.append(out)
            features.append(feats)
        return logits, features

    @torch.no_grad()
    def power_iteration(self) -> None:
        """One spectral-norm power iteration on every conv (what a train-mode forward does first).

        The trainer calls this once per optimizer step and runs every pass of the
        step in eval mode, so the estimate of sigma is the same for all micro-batches
        and the result does not depend on how the batch is split.
        """
        was_training = self.training
        self.train()
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                module.weight  # noqa: B018 - the parametrization's forward runs the iteration
        self.train(was_training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _patch_side(config: DiscriminatorConfig, size: int) -> int:
    """Side of the coarsest scale's patch map for S x S inputs (0: too small)."""
    side = size
    for k in range(config.scales):
        if k:
            side = (side + 1) // 2  # avg_pool2d(3, 2, 1)
        s = side
        for _ in range(config.layers):
            s //= 2  # conv 4, stride 2, pad 1
        s -= 2  # two conv 4, stride 1, pad 1
    return max(s, 0)


def check_input_size(config: DiscriminatorConfig, size: int) -> None:
    """Raise if S x S images are too small for this discriminator."""
    if _patch_side(config, size) < 1:
        need = next(n for n in range(size, 100_000) if _patch_side(config, n) >= 1)
        raise ValueError(f"expected images of at least {need} pixels for a {config.scales}-scale, {config.layers}-layer discriminator, got {size}")

