"""Training parts on their own: losses, discriminator, EMA, step sampler, pair data, identity metric."""

import logging

import numpy as np
import pytest
import torch

from models.training import losses
from models.training.data import (
    KeyedDataset,
    PairFormatError,
    TensorPairDataset,
    check_sample,
    collate,
    draw_generator,
    synthetic_pairs,
)
from models.training.discriminator import DiscriminatorConfig, MultiScaleDiscriminator, check_input_size
from models.training.distributed import DistContext, StepSampler
from models.training.ema import EMA
from models.training.trainer import TrainConfig


def _images(n=3, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size, size, generator=g)


# ---- losses ------------------------------------------------------------------------------------------------
def test_masked_l2_ignores_zero_weight_pixels_and_normalises_per_item():
    pred, target = _images()
    weight = torch.zeros(3, 1, 24, 24)
    weight[:, :, :12] = 1.0
    changed = pred.clone()
    changed[:, :, 12:] += 5.0  # only where the weight is 0
    assert torch.allclose(losses.masked_l2(changed, target, weight), losses.masked_l2(pred, target, weight))
    # per item: the mean of per-item losses, so any split of the batch averages to the same value
    whole = losses.masked_l2(pred, target, weight)
    parts = (losses.masked_l2(pred[:1], target[:1], weight[:1]) + 2 * losses.masked_l2(pred[1:], target[1:], weight[1:])) / 3
    assert torch.allclose(whole, parts)
    expected = ((pred - target)[:, :, :12] ** 2).mean()
    assert torch.allclose(whole, expected, atol=1e-6)


def test_ssim_loss_is_zero_for_identical_images_and_grows_with_noise():
    pred, _ = _images()
    weight = torch.ones(3, 1, 24, 24)
    assert losses.masked_ssim_loss(pred, pred, weight).item() < 1e-6
    g = torch.Generator().manual_seed(1)
    noisy = [pred + s * torch.randn(pred.shape, generator=g) for s in (0.02, 0.1, 0.3)]
    values = [losses.masked_ssim_loss(x, pred, weight).item() for x in noisy]
    assert values[0] < values[1] < values[2] <= 1.0
    # the SSIM map is the image's size (it is weighted per pixel)
    assert losses.ssim_map(pred, pred).shape == pred.shape


def test_loss_shape_errors_say_what_was_expected():
    pred, target = _images()
    with pytest.raises(ValueError, match=r"expected weight \[N, 1, H, W\] = \(3, 1, 24, 24\), got \(3, 3, 24, 24\)"):
        losses.masked_l2(pred, target, torch.ones(3, 3, 24, 24))
    with pytest.raises(ValueError, match="of one shape"):
        losses.masked_l2(pred, target[:, :, :20])


def test_hinge_losses_on_known_logits():
    real = [torch.full((2, 1, 4, 4), 2.0)]  # confidently real: no D loss
    fake = [torch.full((2, 1, 4, 4), -2.0)]  # confidently fake: no D loss
    assert losses.d_hinge_loss(real, fake).item() == 0.0
    assert losses.d_hinge_loss(fake, real).item() == pytest.approx(6.0)  # (1 + 2) + (1 + 2)
    assert losses.g_hinge_loss(fake).item() == pytest.approx(2.0)
    # the weight map (pooled to the patch grid) picks the patches that count
    logits = torch.zeros(1, 1, 4, 4)
    logits[..., :2, :] = -3.0
    weight = torch.zeros(1, 1, 32, 32)
    weight[..., 16:, :] = 1.0  # bottom half only
    assert losses.g_hinge_loss([logits], weight).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.g_hinge_loss([logits]).item() == pytest.approx(1.5)


def test_feature_matching_is_zero_for_equal_features_and_only_trains_the_fake_side():
    d = MultiScaleDiscriminator(DiscriminatorConfig(channels=8, layers=2))
    x, y = _images(2, 32)
    _, fx = d(x)
    _, fy = d(y)
    assert losses.feature_matching_loss(fx, fx).item() == 0.0
    y.requires_grad_(True)
    _, fy = d(y)
    x.requires_grad_(True)
    _, fx = d(x)
    losses.feature_matching_loss(fx, fy).backward()
    assert x.grad.abs().sum() > 0 and y.grad is None


# ---- discriminator ---------------------------------------------------------------------------------------------
def test_discriminator_scales_and_size_check():
    config = DiscriminatorConfig(channels=8, layers=2, scales=2)
    d = MultiScaleDiscriminator(config)
    logits, features = d(torch.rand(2, 3, 32, 32))
    assert [tuple(x.shape) for x in logits] == [(2, 1, 6, 6), (2, 1, 2, 2)]
    assert len(features) == 2 and len(features[0]) == 3
    check_input_size(config, 32)
    with pytest.raises(ValueError, match="expected images of at least 23 pixels .* got 16"):
        check_input_size(config, 16)
    full = MultiScaleDiscriminator()  # the 256 x 256 default: a few million parameters, spectral norm
    assert 3e6 < full.num_parameters() < 8e6
    assert any("parametrizations" in n for n, _ in full.named_parameters())


# ---- EMA --------------------------------------------------------------------------------------------------------
def test_ema_follows_the_formula_and_swaps_weights_in_and_out():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("p", p)], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(step=0)  # d_0 = min(0.9, 1/10) = 0.1
    assert torch.allclose(ema.shadow["p"], torch.full((3,), 0.9))
    ema.update(step=1000)  # d = 0.9
    assert torch.allclose(ema.shadow["p"], torch.full((3,), 0.9 * 0.9 + 0.1))
    with ema.swapped():
        assert torch.allclose(p, ema.shadow["p"])
    assert torch.equal(p.detach(), torch.ones(3))
    other = EMA([("p", torch.nn.Parameter(torch.zeros(3)))], decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["p"], ema.shadow["p"])
    with pytest.raises(ValueError, match="unknown"):
        other.load_state_dict({"q": torch.zeros(3)})


# ---- schedule ---------------------------------------------------------------------------------------------------
def test_learning_rate_warms_up_per_stage_and_scales_stage_two():
    cfg = TrainConfig(stage1_steps=100, stage2_steps=50, warmup_steps=10, stage2_lr_scale=0.5, lr_schedule="cosine")
    assert cfg.lr_factor(0) == pytest.approx(0.1)
    assert cfg.lr_factor(9) == pytest.approx(1.0 * 0.5 * (1 + np.cos(np.pi * 9 / 100)))
    assert cfg.lr_factor(100) == pytest.approx(0.1 * 0.5)  # stage 2 warms up again, at half the rate
    assert cfg.stage_of(120) == (1, 20, 50)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="noise_min <= noise_max"):
        TrainConfig(noise_min=0.5, noise_max=0.2)
    with pytest.raises(ValueError, match="family"):
        TrainConfig(family="big")


# ---- sampler -----------------------------------------------------------------------------------------------------
def _ctx(rank, world):
    return DistContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def test_step_sampler_splits_each_step_over_ranks_and_accumulation():
    """A step's samples depend on the effective batch only: 2 ranks x B 2 == 1 rank x B 2 x accum 2 == 1 rank x B 4."""
    n = 10
    two = [StepSampler(n, 2, 1, _ctx(r, 2), seed=3, end_step=5) for r in range(2)]
    accum = StepSampler(n, 2, 2, _ctx(0, 1), seed=3, end_step=5)
    big = StepSampler(n, 4, 1, _ctx(0, 1), seed=3, end_step=5)
    for step in range(5):
        r0, r1 = two[0].keys(step, 0), two[1].keys(step, 0)
        assert not set(r0) & set(r1)  # ranks see different samples
        assert r0 + r1 == accum.keys(step, 0) + accum.keys(step, 1) == big.keys(step, 0)
    # every sample once per pass over the data (epoch of 10 = 2.5 steps of 4)
    stream = [k[0] for s in range(5) for k in big.keys(s, 0)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # a new permutation per pass
    # a sampler started at step 3 yields exactly what the full one yields from step 3 on
    resumed = list(StepSampler(n, 2, 2, _ctx(0, 1), seed=3, start_step=3, end_step=5))
    assert resumed == list(accum)[6:]
    assert len(resumed) == 4


# ---- pair data --------------------------------------------------------------------------------------------------------
def test_tensor_pair_dataset_quantises_saves_and_loads(tmp_path):
    samples = synthetic_pairs(3, 16, views=2, seed=0)
    ds = TensorPairDataset.from_samples(samples, augment=False)
    assert len(ds) == 3 and ds.num_views == 2 and ds.size == 16 and ds.ref.dtype == torch.uint8
    item = ds[1]
    assert check_sample(item, 16) == (2, 16)
    assert (item["target"] - samples[1]["target"]).abs().max() <= 0.5 / 255 + 1e-6
    assert item["meta"]["index"] == 1
    ds.save(tmp_path / "pairs.safetensors")
    again = TensorPairDataset.load(tmp_path / "pairs.safetensors", augment=False)
    assert torch.equal(again.views, ds.views) and again.meta == ds.meta
    both = TensorPairDataset.load(tmp_path, augment=False)  # a folder of pair files
    assert len(both) == 3
    batch = collate([KeyedDataset(ds)[(i, 7)] for i in range(3)])
    assert batch["views"].shape == (3, 2, 3, 16, 16) and batch["draw"].tolist() == [7, 7, 7]
    assert [m["index"] for m in batch["meta"]] == [0, 1, 2]


def test_augmentation_flips_everything_together_and_jitters_images_identically():
    sample = synthetic_pairs(1, 16, seed=4)[0]
    sample["views"] = sample["target"].clone()  # views == target: stays so after augmentation
    ds = TensorPairDataset.from_samples([sample], augment=True)
    plain = TensorPairDataset.from_samples([sample], augment=False)[0]
    flips = 0
    for seed in range(12):
        a = ds.sample(0, draw_generator(seed))
        assert torch.equal(a["views"], a["target"])  # identical jitter
        flipped = torch.equal(a["weight"], plain["weight"].flip(-1)) and not torch.equal(a["weight"], plain["weight"])
        flips += flipped
        seen = plain["seen"].flip(-1) if flipped else plain["seen"]
        assert torch.equal(a["seen"], seen)  # masks are flipped, never jittered
        assert torch.equal(ds.sample(0, draw_generator(seed))["ref"], a["ref"])  # same draw, same result
    assert 0 < flips < 12


def test_pair_format_errors_are_clear(tmp_path):
    sample = synthetic_pairs(1, 16)[0]
    with pytest.raises(PairFormatError, match=r"expected sample keys .* \(missing \[.weight.\]\)"):
        check_sample({k: v for k, v in sample.items() if k != "weight"})
    bad = dict(sample, seen=torch.ones(1, 2, 16, 16))
    with pytest.raises(PairFormatError, match=r"expected seen \[V, 1, S, S\] = \(1, 1, 16, 16\), got \(1, 2, 16, 16\)"):
        check_sample(bad)
    with pytest.raises(PairFormatError, match="expected samples of 32x32 pixels, got 16x16"):
        check_sample(sample, 32)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PairFormatError, match="expected a pair file"):
        TensorPairDataset.load(tmp_path / "notes.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PairFormatError, match="unreadable junk.safetensors"):
        TensorPairDataset.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no such path"):
        TensorPairDataset.load(tmp_path / "missing.safetensors")


# ---- identity metric ----------------------------------------------------------------------------------------------------
def test_identity_metric_separates_people(astronaut, test_data):
    pytest.importorskip("dlib", reason="dlib (the eval extra) is not installed")
    import cv2

    from models.face.analysis import read_image
    from models.face.identity import SAME_PERSON_THRESHOLD, IdentityEmbedder

    metric = IdentityEmbedder.optional()
    assert metric is not None
    face = np.ascontiguousarray(cv2.resize(astronaut[0:300, 80:380], (256, 256), interpolation=cv2.INTER_AREA))
    assert metric.distance(face, face) < 1e-4
    assert metric.distance(cv2.GaussianBlur(face, (0, 0), 2.0), face) < SAME_PERSON_THRESHOLD
    other = read_image(test_data / "lp_s42.jpg")  # another person, each face in its own box
    assert np.linalg.norm(metric.embed(other) - metric.embed(face)) > SAME_PERSON_THRESHOLD
    # tensors [3, H, W] in [0, 1] work too
    as_tensor = torch.from_numpy(face).permute(2, 0, 1).float() / 255
    assert metric.batch_distance(as_tensor[None], as_tensor[None])[0] < 1e-4


def test_identity_metric_switches_off_without_dlib(monkeypatch, caplog):
    import builtins

    from models.face.identity import IdentityEmbedder

    real_import = builtins.__import__

    def no_dlib(name, *args, **kwargs):
        if name == "dlib":
            raise ImportError("no dlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dlib)
    with caplog.at_level(logging.INFO, logger="models.face.identity"):
        metric = IdentityEmbedder.optional()
    assert metric is None
    assert [r.message for r in caplog.records] == [
        "identity metric off: dlib is not installed; pip install 'portrait-telepresence[eval]' (dlib-bin, face-recognition-models, setuptools)"]
