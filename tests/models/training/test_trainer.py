"""The trainer on tiny refiners (CPU): loss goes down for both families, exact resume,
GAN warm-up, two stages, EMA export, errors."""

import json

import pytest
import torch
from torch.utils.data import Dataset

from models.refiner import Refiner
from models.training.data import TensorPairDataset, synthetic_pairs
from models.training.families import build_refiner
from models.training.trainer import TrainConfig, Trainer, latest_checkpoint
from tests.models.refiner.test_io import _sd_folder, _tiny_text_encoder

S = 32


def _config(**overrides) -> TrainConfig:
    base = dict(
        model_preset="tiny", resolution=S, batch_size=2, stage1_steps=4, warmup_steps=0, lr=3e-3, gan_weight=0.0,
        noise_max=0.0, num_workers=0, d_channels=8, d_layers=2, log_every=1, image_every=0, ckpt_every=0,
        progress=False, identity_metric=False,
    )
    return TrainConfig(**{**base, **overrides})


def _pairs(n=2, seed=0, views=1, augment=False, **kwargs):
    return TensorPairDataset.from_samples(synthetic_pairs(n, S, views=views, seed=seed, **kwargs), augment=augment)


class _Recording(Dataset):
    """Wraps a pair dataset and records which indices were read (keeps its seeded sample())."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.read: list[int] = []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.sample(index, None)

    def sample(self, index, generator):
        self.read.append(index)
        return self.dataset.sample(index, generator)


def _losses(trainer, steps):
    return [trainer.train_step()["loss"] for _ in range(steps)]


def test_small_family_loss_goes_down_and_ema_is_exported(tmp_path):
    config = _config(stage1_steps=12, image_every=6, ema_decay=0.5)
    torch.manual_seed(0)
    model = build_refiner(config)
    assert all(p.requires_grad for p in model.parameters())
    trainer = Trainer(model, config, tmp_path / "run", _pairs())
    trainer.fit()
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in logged if "loss" in r]
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < 0.6 * curve[0], curve
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))  # TensorBoard scalars and images
    assert latest_checkpoint(tmp_path / "run").name == "step_0000012"  # end of stage

    trainer.export(tmp_path / "export")
    loaded = Refiner.from_pretrained(tmp_path / "export")
    shadow = trainer.ema.state_dict()
    for name, p in loaded.named_parameters():
        assert torch.equal(p, shadow[name]), name  # the EMA weights, not the last ones
    assert not torch.equal(shadow["unet.conv_in.weight"], model.unet.conv_in.weight.detach())
    info = json.loads((tmp_path / "export" / "training.json").read_text())
    assert info["steps"] == {"stage1": 12, "stage2": 0, "total": 12}
    assert info["weights"] == "EMA" and info["config"]["family"] == "small"
    assert info["hardware"]["device"]["type"] == "cpu" and info["hardware"]["world_size"] == 1 and info["wall_time_s"] > 0
    assert set(info["final_losses"]) >= {"l2", "ssim", "loss"}


def test_lora_family_on_a_tiny_diffusers_base(tmp_path):
    pytest.importorskip("transformers")
    base = _sd_folder(tmp_path / "sd")
    _tiny_text_encoder(base)
    config = _config(family="lora", base=str(base), timestep=199, lora_rank=4, lora_decoder_rank=2, stage1_steps=10, lr=1e-2)
    torch.manual_seed(0)
    model = build_refiner(config)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("codec.skip_convs") for n in trained)
    assert any(n.startswith("codec.skip_convs") for n in trained) and any("decoder" in n for n in trained)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(model, config, tmp_path / "run", _pairs())
    curve = _losses(trainer, 10)
    assert sum(curve[-3:]) / 3 < 0.8 * curve[0], curve
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # base untouched

    trainer.export(tmp_path / "export")
    assert not (tmp_path / "export" / "unet").exists()  # an adapter package on top of --base
    assert (tmp_path / "export" / "lora" / "lora.safetensors").is_file()
    loaded = Refiner.from_pretrained(tmp_path / "export")
    sample = _pairs()[0]
    with trainer.ema.swapped(), torch.no_grad():
        model.eval()
        expected = model(sample["ref"][None], sample["views"][None])
    with torch.no_grad():
        assert torch.allclose(loaded(sample["ref"][None], sample["views"][None]), expected, atol=1e-6)


def _resume_config(**overrides):
    return _config(
        stage1_steps=3, stage2_steps=2, batch_size=1, grad_accum=2, gan_weight=0.1, feature_matching_weight=1.0,
        gan_start_step=1, noise_min=0.1, noise_max=0.6, ema_decay=0.9, **overrides,
    )


def _trainer(tmp_path, name, config, seed=0):
    torch.manual_seed(seed)
    model = Refiner.tiny()
    return Trainer(model, config, tmp_path / name, _pairs(3, augment=True), _pairs(3, seed=1, augment=True))


def test_resume_continues_bit_for_bit(tmp_path):
    """Stop after step 2, resume in a fresh process-like setup: the next steps' losses and
    all weights (model, EMA, discriminator) equal those of an uninterrupted run."""
    config = _resume_config()
    straight = _trainer(tmp_path, "a", config)
    expected = _losses(straight, 5)

    first = _trainer(tmp_path, "b", config)
    assert _losses(first, 2) == expected[:2]
    checkpoint = first.save_checkpoint()
    resumed = _trainer(tmp_path, "b", config, seed=123)  # different initial weights: all must come from the checkpoint
    resumed.load_checkpoint(checkpoint)
    assert resumed.step == 2
    assert _losses(resumed, 3) == expected[2:]  # crosses the stage boundary too
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    for n, t in straight.ema.shadow.items():
        assert torch.equal(t, resumed.ema.shadow[n]), n
    for (n, p), (_, q) in zip(straight.discriminator.state_dict().items(), resumed.discriminator.state_dict().items()):
        assert torch.equal(p, q), n


def test_resume_keeps_this_devices_optimizer_implementation(tmp_path):
    """A checkpoint of a fused AdamW (what CUDA runs) resumes with this trainer's own (foreach on the
    CPU, step counts on the CPU) and continues the uninterrupted run bit for bit."""
    config = _resume_config()
    expected = _losses(_trainer(tmp_path, "a", config), 4)
    first = _trainer(tmp_path, "b", config)
    _losses(first, 2)
    state = first.state_dict()
    for key in ("optimizer", "optimizer_d"):
        for group in state[key]["param_groups"]:
            group.update(fused=True, foreach=False)
    torch.save(state, tmp_path / "fused.pt")
    resumed = _trainer(tmp_path, "c", config, seed=123)
    resumed.load_checkpoint(tmp_path / "fused.pt")
    for optimizer in (resumed.optimizer, resumed.optimizer_d):
        assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)
        assert optimizer.state and all(s["step"].device.type == "cpu" for s in optimizer.state.values())
    assert _losses(resumed, 2) == expected[2:]


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    config = _resume_config()
    trainer = _trainer(tmp_path, "a", config)
    trainer.train_step()
    checkpoint = trainer.save_checkpoint()
    torch.manual_seed(0)
    other = Refiner.tiny()
    other.add_lora(rank=2)
    with pytest.raises(ValueError, match="expected checkpoint tensors for the .* trained parameters"):
        Trainer(other, config, tmp_path / "c", _pairs(3), _pairs(3)).load_checkpoint(checkpoint)


def test_gan_switches_on_after_warm_up(tmp_path):
    config = _config(stage1_steps=3, gan_weight=0.5, gan_start_step=2, lr_d=1e-2)
    torch.manual_seed(0)
    trainer = Trainer(Refiner.tiny(), config, tmp_path / "run", _pairs())
    initial = {k: v.clone() for k, v in trainer.discriminator.state_dict().items()}
    before = [trainer.train_step() for _ in range(2)]
    assert all("d_loss" not in logs and "g_adv" not in logs for logs in before)
    assert all(torch.equal(v, initial[k]) for k, v in trainer.discriminator.state_dict().items())
    after = trainer.train_step()
    assert {"d_loss", "g_adv", "d_real", "d_fake"} <= set(after)
    assert after["loss"] == pytest.approx(after["l2"] + 0.5 * after["ssim"] + 0.5 * after["g_adv"], rel=1e-5)
    assert not torch.equal(trainer.discriminator.scales[0].head.parametrizations.weight.original, initial["scales.0.head.parametrizations.weight.original"])


def test_two_stages_read_their_own_data_with_several_views(tmp_path):
    config = _config(stage1_steps=2, stage2_steps=2, stage2_lr_scale=0.5, warmup_steps=0)
    synthetic, real = _Recording(_pairs(4, views=2)), _Recording(_pairs(4, seed=5, views=2))
    torch.manual_seed(0)
    trainer = Trainer(Refiner.tiny(), config, tmp_path / "run", synthetic, real)
    synthetic.read.clear(), real.read.clear()  # the constructor checks one sample of each
    logs = [trainer.train_step() for _ in range(2)]
    assert len(synthetic.read) == 4 and not real.read
    logs += [trainer.train_step() for _ in range(2)]
    assert len(synthetic.read) == 4 and len(real.read) == 4
    assert [round(x["lr"], 6) for x in logs] == [3e-3, 3e-3, 1.5e-3, 1.5e-3]
    with pytest.raises(RuntimeError, match="training is done"):
        trainer.train_step()


def test_trainer_input_errors(tmp_path):
    torch.manual_seed(0)
    model = Refiner.tiny()
    with pytest.raises(ValueError, match=r"expected a stage-2 \(real\) dataset for stage2_steps=3, got none"):
        Trainer(model, _config(stage2_steps=3), tmp_path / "a", _pairs())
    with pytest.raises(ValueError, match="expected samples of 64x64 pixels, got 32x32"):
        Trainer(model, _config(resolution=64), tmp_path / "b", _pairs())
    with pytest.raises(ValueError, match="expected images of at least"):
        Trainer(model, _config(gan_weight=0.1, d_layers=3), tmp_path / "c", _pairs())
    with pytest.raises(ValueError, match="lora family"):
        build_refiner(_config(family="lora"))


def test_seen_mask_reaches_the_refiner(tmp_path):
    config = _config(stage1_steps=2, seen_mask=True)
    torch.manual_seed(0)
    model = build_refiner(config)
    assert model.config.seen_mask and model.unet.conv_in.in_channels == model.codec.latent_channels + 1
    seen_weights = model.unet.conv_in.weight[:, -1].detach().clone()  # the seen-mask input channel
    Trainer(model, config, tmp_path / "run", _pairs()).train_step()
    assert not torch.equal(model.unet.conv_in.weight[:, -1], seen_weights)


def test_time_budget_stops_early_and_still_exports(tmp_path):
    from models.training.families import build_refiner

    torch.manual_seed(0)
    config = TrainConfig(family="small", model_preset="tiny", resolution=32, batch_size=2, stage1_steps=10_000,
                         stage2_steps=0, num_workers=0, progress=False, gan_weight=0.0, identity_metric=False,
                         max_wall_s=1e-9, log_every=1, val_every=0, ckpt_every=0, image_every=0)
    data = synthetic_pairs(4, size=32)
    trainer = Trainer(build_refiner(config), config, tmp_path / "run", data, device="cpu")
    trainer.fit()
    assert trainer.step < 10  # the budget counts from the start of fit(): no step fits in it
    assert (trainer.export(tmp_path / "refiner") / "refiner.json").exists()


def test_keep_best_exports_the_best_validation_and_records_its_step(tmp_path):
    torch.manual_seed(0)
    config = TrainConfig(family="small", model_preset="tiny", resolution=32, batch_size=2, stage1_steps=6,
                         stage2_steps=0, num_workers=0, progress=False, gan_weight=0.0, identity_metric=False,
                         log_every=1, val_every=2, val_samples=2, ckpt_every=0, image_every=0, warmup_steps=1,
                         lr=1e-3, keep_best=True)
    data = synthetic_pairs(4, size=32)
    trainer = Trainer(build_refiner(config), config, tmp_path / "run", data, val=synthetic_pairs(2, size=32, seed=5),
                      device="cpu")
    trainer.fit()
    vals = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl") if "val/psnr" in line]
    best = max(vals, key=lambda r: r["val/psnr"])
    info = json.loads((tmp_path / "run" / "best" / "training.json").read_text())
    assert info["selected"]["step"] == best["step"] and info["selected"]["psnr"] == pytest.approx(best["val/psnr"])
    assert info["steps"]["total"] == best["step"]
    # The exported best weights are the EMA weights of that step: they score what was logged.
    again = Trainer(Refiner.from_pretrained(tmp_path / "run" / "best").train(), config, tmp_path / "again", data,
                    device="cpu")
    assert again.evaluate(synthetic_pairs(2, size=32, seed=5), use_ema=False)["psnr"] == pytest.approx(
        best["val/psnr"], abs=1e-3)


def test_compact_preset_is_between_small_and_tiny():
    torch.manual_seed(0)
    compact = build_refiner(TrainConfig(family="small", model_preset="compact", seen_mask=True))
    n = sum(p.numel() for p in compact.parameters())
    assert 5e6 < n < 15e6
    assert compact.unet.config.block_out_channels == (48, 96, 192) or list(compact.unet.config.block_out_channels) == [48, 96, 192]
    out = compact.refine(torch.rand(1, 3, 64, 64), torch.rand(1, 1, 3, 64, 64), torch.ones(1, 1, 1, 64, 64))
    assert out.shape == (1, 1, 3, 64, 64)
