"""Architecture presets (diffusers constructor arguments) for the refiner's parts.

- ``sd_turbo``: the SD 2.1-base U-Net of SD-Turbo (865.9 M parameters with 4
  input channels), the SD VAE, and TAESD (``AutoencoderTiny`` defaults).
- ``small``: the from-scratch CPU refiner (pixel-unshuffle x8 codec; U-Net
  blocks (64, 128, 256), one layer per block, transformer blocks - hence joint
  attention - only at the two lowest resolutions and the middle; ~17 M params).
- ``compact``: ``small`` at three quarters of the width (48, 96, 192; ~10 M params):
  less capacity to memorise the few identities of our training data, and half the weights.
- ``tiny``: a few-thousand-parameter version of each for tests.

The values are the saved configs (``unet/config.json``, ``vae/config.json``):
a preset is only used to build random weights.
"""

from __future__ import annotations

import torch
from torch import nn

SD_TURBO_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),  # diffusers' legacy name: these are head counts (64-dim heads)
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
TAESD: dict = {}  # AutoencoderTiny's defaults are the TAESD architecture

SMALL_UNET = dict(
    sample_size=32,
    block_out_channels=(64, 128, 256),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4, 8),  # head counts: 32-dim heads
    cross_attention_dim=256,
    use_linear_projection=True,
    norm_num_groups=32,
)

COMPACT_UNET = {
    **SMALL_UNET,
    "block_out_channels": (48, 96, 192),
    "attention_head_dim": (2, 3, 6),  # head counts: 32-dim heads
    "cross_attention_dim": 192,
    "norm_num_groups": 16,
}
TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    use_linear_projection=True,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)
TINY_TAESD = dict(
    encoder_block_out_channels=(8, 8, 8),
    decoder_block_out_channels=(8, 8, 8),
    num_encoder_blocks=(1, 1, 1),
    num_decoder_blocks=(1, 1, 1),
    latent_channels=4,
)

UNET_PRESETS = {"sd_turbo": SD_TURBO_UNET, "small": SMALL_UNET, "compact": COMPACT_UNET, "tiny": TINY_UNET}
CODEC_PRESETS = {
    ("sd_turbo", "vae"): SD_VAE,
    ("sd_turbo", "tiny"): TAESD,
    ("small", "vae"): SD_VAE,
    ("small", "tiny"): TAESD,
    ("tiny", "vae"): TINY_VAE,
    ("tiny", "tiny"): TINY_TAESD,
}


def build_unet(preset: str | dict, in_channels: int, out_channels: int):
    """A randomly initialised UNet2DConditionModel from a preset name or kwargs."""
    from diffusers import UNet2DConditionModel

    kwargs = dict(UNET_PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    return UNet2DConditionModel(in_channels=in_channels, out_channels=out_channels, **kwargs)


def build_codec_model(kind: str, preset: str | dict):
    """A randomly initialised AutoencoderKL ("vae") or AutoencoderTiny ("tiny")."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    kwargs = dict(CODEC_PRESETS[(preset, kind)]) if isinstance(preset, str) else dict(preset)
    if kind == "vae":
        return AutoencoderKL(**kwargs)
    if kind == "tiny":
        return AutoencoderTiny(**kwargs)
    raise ValueError(f"expected codec kind 'vae' or 'tiny' for a codec model, got {kind!r}")


@torch.no_grad()
def expand_conv_in(unet, extra_channels: int) -> None:
    """Give the U-Net extra input channels with zero weights (pretrained behaviour kept).

    conv_in weight [C_out, C_in, 3, 3] -> [C_out, C_in + extra, 3, 3]; the config's
    in_channels is updated so save/load round-trips.
    """
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    new.weight.zero_()
    new.weight[:, : old.in_channels] = old.weight
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra_channels)
