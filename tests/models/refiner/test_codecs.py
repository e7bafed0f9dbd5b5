"""Image <-> latent codecs."""

import pytest
import torch

from models.refiner import presets as architectures
from models.refiner.codecs import PixelUnshuffleCodec, TinyCodec, VAECodec, _skip_channels


def _codec(kind):
    torch.manual_seed(0)
    if kind == "pixel_unshuffle":
        return PixelUnshuffleCodec(4)
    model = architectures.build_codec_model(kind, "tiny").eval()
    return VAECodec(model) if kind == "vae" else TinyCodec(model)


def test_pixel_unshuffle_round_trip_is_exact():
    codec = PixelUnshuffleCodec(8)
    x = torch.rand(2, 3, 64, 32) * 2 - 1
    z, skips = codec.encode(x)
    assert z.shape == (2, 192, 8, 4) and codec.latent_channels == 192 and skips is None
    assert torch.equal(codec.decode(z), x)


@pytest.mark.parametrize("kind", ["pixel_unshuffle", "vae", "tiny"])
def test_codec_shapes_match_factor(kind):
    codec = _codec(kind)
    x = torch.rand(3, 3, 32, 64) * 2 - 1
    with torch.no_grad():
        z, _ = codec.encode(x)
        y = codec.decode(z)
    assert z.shape == (3, codec.latent_channels, 32 // codec.factor, 64 // codec.factor)
    assert y.shape == x.shape


def test_sd_vae_preset_factor_and_skip_channels():
    # pix2pix-turbo's SD-VAE skip convs: 512->512, 256->512, 128->512, 128->256
    assert _skip_channels(architectures.SD_VAE["block_out_channels"]) == [(512, 512), (256, 512), (128, 512), (128, 256)]


def test_vae_latent_is_scaled_posterior_mean():
    codec = _codec("vae")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z, _ = codec.encode(x)
        mean = codec.vae.encode(x).latent_dist.mode() * codec.vae.config.scaling_factor
        plain = codec.vae.decode(z / codec.vae.config.scaling_factor).sample
        ours = codec.decode(z)
    torch.testing.assert_close(z, mean)
    torch.testing.assert_close(ours, plain)


def test_vae_skip_path_with_zero_skips_equals_plain_decoder():
    codec = _codec("vae")
    codec.add_skip_convs()
    assert len(codec.skip_convs) == 3
    assert all(torch.all(c.weight == 1e-5) for c in codec.skip_convs)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z, skips = codec.encode(x, return_skips=True)
        z_plain, _ = codec.encode(x)
        for conv in codec.skip_convs:
            conv.weight.zero_()
        with_skips = codec.decode(z, skips)
        plain = codec.decode(z)
        for conv in codec.skip_convs:
            conv.weight.normal_()
        changed = codec.decode(z, skips)
    assert torch.equal(z, z_plain)
    torch.testing.assert_close(with_skips, plain)
    assert not torch.allclose(changed, plain)


def test_tiny_codec_matches_autoencoder_tiny():
    codec = _codec("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z, _ = codec.encode(x)
        assert torch.equal(z, codec.ae.encode(x).latents)
        assert torch.equal(codec.decode(z), codec.ae.decode(z).sample)
