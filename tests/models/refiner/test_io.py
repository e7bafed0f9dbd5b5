"""Saving and loading: refiner folders, LoRA adapters, SD-style base folders, missing models."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from models.refiner import presets as architectures
from models.refiner import MissingModelError, Refiner, RefinerConfig, encode_prompt

H = W = 32


def _inputs(b=2, v=2, seed=0, seen=False):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(b, 3, H, W, generator=g)
    views = torch.rand(b, v, 3, H, W, generator=g)
    mask = torch.rand(b, v, 1, H, W, generator=g) if seen else None
    return ref, views, mask


def _run(model, seen=False):
    """Outputs in eval mode (from_pretrained returns eval models, as diffusers does)."""
    model.eval()
    ref, views, mask = _inputs(seen=seen)
    with torch.no_grad():
        return model(ref, views, mask, noise_level=0.6, generator=torch.Generator().manual_seed(5))


def _perturb_adapters(model):
    """LoRA B starts at zero; make every trainable tensor matter."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "codec, overrides",
    [
        ("pixel_unshuffle", {}),
        ("pixel_unshuffle", {"seen_mask": True, "learned_prompt": True, "view_attention": "ref_isolated"}),
        ("vae", {"prediction_type": "v_prediction", "timestep": 999}),
        ("tiny", {"prompt_tokens": 1}),
    ],
)
def test_save_load_round_trip_is_bit_identical(tmp_path, codec, overrides):
    torch.manual_seed(0)
    model = Refiner.tiny(codec=codec, **overrides)
    seen = overrides.get("seen_mask", False)
    before = _run(model, seen)
    model.save_pretrained(tmp_path / "refiner")
    loaded = Refiner.from_pretrained(tmp_path / "refiner")
    assert loaded.config == model.config
    assert torch.equal(_run(loaded, seen), before)
    names = {p.name for p in (tmp_path / "refiner").iterdir()}
    assert {"refiner.json", "refiner.safetensors", "unet"} <= names
    assert ("vae" in names) == (codec != "pixel_unshuffle")


def test_lora_adapters_round_trip_on_their_own(tmp_path):
    torch.manual_seed(0)
    base = Refiner.tiny(codec="vae")
    base.save_pretrained(tmp_path / "base")
    model = Refiner.from_pretrained(tmp_path / "base")
    params = model.add_lora(rank=4, decoder_rank=2, skip_convs=True)
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n and "skip_convs" not in n)
    _perturb_adapters(model)
    before = _run(model)
    model.save_lora(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "lora.safetensors")
    assert all(".lora_" in k or k.startswith("skip_convs.") for k in saved)
    assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in params)

    fresh = Refiner.from_pretrained(tmp_path / "base")
    assert not torch.equal(_run(fresh), before)
    fresh.load_lora(tmp_path / "adapter")
    assert torch.equal(_run(fresh), before)


def test_full_save_with_adapters_attached_avoids_the_peft_trap(tmp_path):
    torch.manual_seed(0)
    model = Refiner.tiny(codec="vae")
    model.add_lora(rank=4, decoder_rank=2)
    _perturb_adapters(model)
    before = _run(model)
    model.save_pretrained(tmp_path / "refiner")
    unet_keys = load_file(tmp_path / "refiner" / "unet" / "diffusion_pytorch_model.safetensors").keys()
    vae_keys = load_file(tmp_path / "refiner" / "vae" / "diffusion_pytorch_model.safetensors").keys()
    assert not any("base_layer" in k or "lora_" in k for k in [*unet_keys, *vae_keys])
    loaded = Refiner.from_pretrained(tmp_path / "refiner")
    assert loaded.has_lora
    assert torch.equal(_run(loaded), before)


def test_save_after_merging_lora_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Refiner.tiny()
    model.add_lora(rank=2)
    model.prepare("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="merged"):
        model.save_pretrained(tmp_path / "x")
    model.save_lora(tmp_path / "adapter")  # adapters alone are still fine


def _sd_folder(path, seed=0):
    """A tiny stand-in for a local copy of stabilityai/sd-turbo (unet/, vae/)."""
    torch.manual_seed(seed)
    architectures.build_unet("tiny", in_channels=4, out_channels=4).save_pretrained(path / "unet")
    architectures.build_codec_model("vae", "tiny").save_pretrained(path / "vae")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return path


@pytest.mark.parametrize("seen", [False, True])
def test_adapter_package_on_a_base_model_folder(tmp_path, seen):
    base = _sd_folder(tmp_path / "sd")
    prompt = torch.randn(4, 32)
    model = Refiner.from_pretrained(base, prompt_embeds=prompt, prompt_tokens=4, timestep=199, seen_mask=seen)
    assert model.config.base_model == str(base)
    assert model.unet.config.in_channels == 4 + int(seen)
    model.add_lora(rank=4, skip_convs=True)
    _perturb_adapters(model)
    before = _run(model, seen)
    model.save_pretrained(tmp_path / "adapter", include_base=False)
    assert not (tmp_path / "adapter" / "unet").exists() and not (tmp_path / "adapter" / "vae").exists()
    loaded = Refiner.from_pretrained(tmp_path / "adapter")
    assert torch.equal(_run(loaded, seen), before)


def _tiny_text_encoder(path):
    """CLIP tokenizer (byte-level vocabulary, no merges) + a 1-layer CLIP text model."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    (path / "tokenizer").mkdir(parents=True)
    (path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (path / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "tokenizer" / "vocab.json"), str(path / "tokenizer" / "merges.txt"), model_max_length=77)
    tok.save_pretrained(path / "tokenizer")
    eos = vocab["<|endoftext|>"]
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(path / "text_encoder")


def test_sd_folder_prompt_embedding_from_its_text_encoder(tmp_path):
    pytest.importorskip("transformers")
    base = _sd_folder(tmp_path / "sd")
    _tiny_text_encoder(base)
    full = encode_prompt(base, "a portrait", 77)
    assert full.shape == (77, 32)
    model = Refiner.from_pretrained(base, prompt="a portrait", prompt_tokens=3, timestep=199)
    assert torch.equal(model.prompt_embeds, full[:3])
    before = _run(model)
    model.save_pretrained(tmp_path / "refiner")  # the embedding travels with the weights: no text encoder needed
    assert torch.equal(_run(Refiner.from_pretrained(tmp_path / "refiner")), before)


@pytest.mark.parametrize("where", ["/nowhere/sd-turbo", "./nowhere", "../nowhere/sd-turbo", "nowhere"])
def test_a_missing_local_folder_is_said_to_be_missing_not_downloaded(where):
    """A local path is no hub id: `hf download /nowhere/sd-turbo` was suggested for it, in a paragraph."""
    with pytest.raises(MissingModelError) as info:
        Refiner.from_pretrained(where)
    message = str(info.value)
    assert message.startswith(f"no refiner at '{where}': no such folder (expected a folder holding refiner.json")
    assert "hf download" not in message and "\n" not in message


def test_missing_hub_model_offline_is_a_clear_error_that_says_what_to_download():
    with pytest.raises(MissingModelError) as info:
        Refiner.from_pretrained("stabilityai/sd-turbo", local_files_only=True)
    message = str(info.value)
    assert re.match(r"refiner model 'stabilityai/sd-turbo' not found: .*hub did not provide it", message), message
    assert "`hf download stabilityai/sd-turbo " in message and "--local-dir WEIGHTS_DIR/sd-turbo`" in message
    assert "--include 'unet/diffusion_pytorch_model.safetensors'" in message and "\n" not in message


def test_folder_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingModelError, match="holds neither refiner.json nor unet/config.json"):
        Refiner.from_pretrained(tmp_path / "empty")


def test_adapter_package_with_missing_base_is_a_clear_error(tmp_path):
    base = _sd_folder(tmp_path / "sd")
    model = Refiner.from_pretrained(base, prompt_embeds=torch.randn(4, 32), prompt_tokens=4)
    model.add_lora(rank=2)
    model.save_pretrained(tmp_path / "adapter", include_base=False)
    config = json.loads((tmp_path / "adapter" / "refiner.json").read_text())
    config["base_model"] = str(tmp_path / "gone")
    (tmp_path / "adapter" / "refiner.json").write_text(json.dumps(config))
    with pytest.raises(MissingModelError, match="gone"):
        Refiner.from_pretrained(tmp_path / "adapter")


def test_config_json_round_trip_and_unknown_fields():
    config = RefinerConfig.small(noise_level=0.25)
    assert RefinerConfig.from_json(config.to_json()) == config
    data = json.loads(config.to_json())
    data["unet_size"] = 3
    with pytest.raises(ValueError, match=r"got unknown \['unet_size'\]"):
        RefinerConfig.from_json(json.dumps(data))


def test_sd_turbo_lora_spec_loads_our_adapter_on_the_sd_turbo_base(tmp_path, monkeypatch):
    """--refiner sd-turbo-lora:PATH: the adapter at PATH on SD-Turbo, whatever base its refiner.json names
    (TELEPRESENCE_SD_TURBO stands in for stabilityai/sd-turbo here: a tiny base the test builds)."""
    from models.refiner.shipped import load_refiner

    base = _sd_folder(tmp_path / "sd")
    model = Refiner.from_pretrained(base, prompt_embeds=torch.randn(4, 32), prompt_tokens=4, timestep=199)
    model.add_lora(rank=4)
    _perturb_adapters(model)
    before = _run(model)
    model.save_pretrained(tmp_path / "adapter", include_base=False)
    config = json.loads((tmp_path / "adapter" / "refiner.json").read_text())
    config["base_model"] = str(tmp_path / "where-it-was-trained")  # gone: the spec's base is used instead
    (tmp_path / "adapter" / "refiner.json").write_text(json.dumps(config))
    monkeypatch.setenv("TELEPRESENCE_SD_TURBO", str(base))
    loaded = load_refiner(f"sd-turbo-lora:{tmp_path / 'adapter'}")
    assert loaded.config.base_model == str(base)
    assert torch.allclose(_run(loaded), before, atol=1e-5)
    full = tmp_path / "full"
    model.save_pretrained(full)  # a whole refiner (its own unet/) is no adapter
    with pytest.raises(MissingModelError, match="is no LoRA adapter"):
        load_refiner(f"sd-turbo-lora:{full}")
    with pytest.raises(MissingModelError, match="nowhere"):
        load_refiner(f"sd-turbo-lora:{tmp_path / 'nowhere'}")
