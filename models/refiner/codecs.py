"""Image <-> latent codecs for the refiner.

Every codec maps images in [-1, 1] to latents and back:

    encode: x [N, 3, H, W] in [-1, 1] -> z [N, C, H/f, W/f]   (f = codec.factor)
    decode: z [N, C, H/f, W/f]        -> x [N, 3, H, W], about [-1, 1] (not clamped)

Latents are in the diffusion model's units (already multiplied by the VAE
scaling factor), so noise of unit variance is on the scale the U-Net expects.

- ``VAECodec``: the Stable Diffusion ``AutoencoderKL`` (f = 8, C = 4); the
  posterior mean is used (deterministic). Optional encoder->decoder 1x1 skip
  convolutions (pix2pix-turbo), initialised to 1e-5 so they start as a no-op.
- ``TinyCodec``: ``AutoencoderTiny`` (TAESD architecture, f = 8, C = 4).
- ``PixelUnshuffleCodec``: weight-free space-to-depth (f = factor,
  C = 3 f^2), for small refiners trained from scratch; decode(encode(x)) == x.
"""

from __future__ import annotations

import abc
import logging

import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CODEC_KINDS = ("vae", "tiny", "pixel_unshuffle")
SKIP_INIT = 1e-5  # pix2pix-turbo's initial skip-conv weight


class Codec(nn.Module, metaclass=abc.ABCMeta):
    """Base class: see the module docstring for the tensor contract."""

    kind: str = ""
    factor: int = 1
    latent_channels: int = 0

    @abc.abstractmethod
    def encode(self, x: Tensor, return_skips: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        """x [N, 3, H, W] in [-1, 1] -> (z [N, C, H/f, W/f], skip activations or None)."""

    @abc.abstractmethod
    def decode(self, z: Tensor, skips: list[Tensor] | None = None) -> Tensor:
        """z [N, C, H/f, W/f] (+ skips from encode of the same images) -> x [N, 3, H, W]."""

    @property
    def has_skips(self) -> bool:
        return False

    def decoder_module(self) -> nn.Module | None:
        """The module decoder LoRA adapters are injected into (None: no weights)."""
        return None

    def base_model(self) -> nn.Module | None:
        """The diffusers model saved as the ``vae/`` folder (None: nothing to save)."""
        return None


class PixelUnshuffleCodec(Codec):
    """Weight-free space-to-depth codec: z = pixel_unshuffle(x, f)."""

    kind = "pixel_unshuffle"

    def __init__(self, factor: int = 8):
        super().__init__()
        if factor < 1:
            raise ValueError(f"expected a pixel-unshuffle factor >= 1, got {factor}")
        self.factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, x: Tensor, return_skips: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        return F.pixel_unshuffle(x, self.factor), None

    def decode(self, z: Tensor, skips: list[Tensor] | None = None) -> Tensor:
        return F.pixel_shuffle(z, self.factor)


class TinyCodec(Codec):
    """``AutoencoderTiny`` (TAESD). Its encoder/decoder take and give [-1, 1] images."""

    kind = "tiny"

    def __init__(self, ae):
        super().__init__()
        self.ae = ae
        cfg = ae.config
        self.factor = 2 ** (len(cfg.encoder_block_out_channels) - 1)
        decoder_factor = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1)
        if decoder_factor != self.factor:
            raise ValueError(f"expected tiny AE decoder upsampling {self.factor}, got {decoder_factor}")
        self.latent_channels = cfg.latent_channels
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", 0.0) or 0.0)

    def encode(self, x: Tensor, return_skips: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        z = self.ae.encoder(x)
        return (z - self.shift_factor) * self.scaling_factor, None

    def decode(self, z: Tensor, skips: list[Tensor] | None = None) -> Tensor:
        return self.ae.decoder(z / self.scaling_factor + self.shift_factor)

    def decoder_module(self) -> nn.Module:
        return self.ae.decoder

    def base_model(self) -> nn.Module:
        return self.ae


def _skip_channels(block_out_channels: tuple[int, ...]) -> list[tuple[int, int]]:
    """(in, out) channels of the 1x1 skip conv feeding decoder up block i.

    Encoder activations are taken at the input of each down block (resolution
    H / 2^j, channels c[max(j-1, 0)]); up block i of the decoder runs at the
    resolution of down block n-1-i and takes c_rev[max(i-1, 0)] channels.
    """
    c = list(block_out_channels)
    n = len(c)
    return [(c[max(n - 2 - i, 0)], c[n - 1 - max(i - 1, 0)]) for i in range(n)]


class VAECodec(Codec):
    """Stable Diffusion ``AutoencoderKL``; z = (mean(q(z|x)) - shift) * scaling_factor."""

    kind = "vae"

    def __init__(self, vae, skip_convs: bool = False):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = cfg.latent_channels
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        if len(vae.decoder.up_blocks) != len(vae.encoder.down_blocks):
            raise ValueError(
                f"expected as many decoder up blocks as encoder down blocks, got {len(vae.decoder.up_blocks)} and {len(vae.encoder.down_blocks)}"
            )
        self.skip_convs: nn.ModuleList | None = None
        if skip_convs:
            self.add_skip_convs()

    @property
    def has_skips(self) -> bool:
        return self.skip_convs is not None

    def add_skip_convs(self) -> None:
        """Add pix2pix-turbo encoder->decoder 1x1 skip convs (weights 1e-5, no bias)."""
        if self.skip_convs is not None:
            return
        p = next(self.vae.parameters())
        convs = []
        for cin, cout in _skip_channels(tuple(self.vae.config.block_out_channels)):
            conv = nn.Conv2d(cin, cout, kernel_size=1, bias=False, device=p.device, dtype=p.dtype)
            nn.init.constant_(conv.weight, SKIP_INIT)
            convs.append(conv)
        self.skip_convs = nn.ModuleList(convs)

    def encode(self, x: Tensor, return_skips: bool = False) -> tuple[Tensor, list[Tensor] | None]:
        enc = self.vae.encoder
        skips: list[Tensor] | None = None
        if return_skips and self.skip_convs is not None:
            # Encoder.forward, recording the input of every down block.
            h = enc.conv_in(x)
            skips = []
            for block in enc.down_blocks:
                skips.append(h)  # [N, c_j, H/2^j, W/2^j]
                h = block(h)
            h = enc.mid_block(h)
            h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
        else:
            h = enc(x)
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h)
        mean = h[:, : self.latent_channels]  # posterior mean; the rest is log-variance
        return (mean - self.shift_factor) * self.scaling_factor, skips

    def decode(self, z: Tensor, skips: list[Tensor] | None = None) -> Tensor:
        z = z / self.scaling_factor + self.shift_factor
        if self.vae.post_quant_conv is not None:
            z = self.vae.post_quant_conv(z)
        dec = self.vae.decoder
        if skips is None or self.skip_convs is None:
            return dec(z)
        if len(skips) != len(dec.up_blocks):
            raise ValueError(f"expected {len(dec.up_blocks)} skip activations, got {len(skips)}")
        # Decoder.forward with h += skip_conv_i(encoder activation at the same resolution).
        h = dec.conv_in(z)
        h = dec.mid_block(h)
        for i, block in enumerate(dec.up_blocks):
            h = h + self.skip_convs[i](skips[-1 - i])
            h = block(h)
        return dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))

    def decoder_module(self) -> nn.Module:
        return self.vae.decoder

    def base_model(self) -> nn.Module:
        return self.vae
