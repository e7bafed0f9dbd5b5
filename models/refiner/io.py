"""Saving and loading refiners: the refiner folder, diffusers SD folders, hub ids, and the
prompt embedding computed once from an SD text encoder (diffusers' ModelMixin / loaders).

Saved folder (``save_pretrained`` / ``from_pretrained``)::

    refiner.json          RefinerConfig
    refiner.safetensors   prompt_embeds [L, D]
    unet/                 diffusers U-Net (base weights, adapters stripped)
    vae/                  diffusers AutoencoderKL / AutoencoderTiny ("vae"/"tiny" codecs)
    lora/                 lora.json + lora.safetensors (only when adapters exist)

``unet/`` and ``vae/`` may be left out (``include_base=False``): they are then
read from ``config.base_model`` / ``config.codec_model`` (a local folder or a
hub id), e.g. stabilityai/sd-turbo + our adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from . import lora, presets
from .codecs import Codec, PixelUnshuffleCodec, TinyCodec, VAECodec
from .config import (
    CODEC_DIR,
    CONFIG_NAME,
    DEFAULT_TINY_AE,
    DIFFUSERS_WEIGHTS_NAME,
    HUB_FILES,
    HUB_ID,
    LOCAL_EXPECTED,
    LORA_DIR,
    UNET_DIR,
    WEIGHTS_NAME,
    MissingModelError,
    RefinerConfig,
)

logger = logging.getLogger(__name__)


class PretrainedMixin:
    """save_pretrained / from_pretrained of a Refiner (see the module docstring for the folder).

    Uses the Refiner's constructor, config, unet, codec, prompt_embeds, has_lora, save_lora,
    load_lora and fit_prompt.
    """

    def save_pretrained(self, directory: str | Path, include_base: bool = True) -> None:
        """Write the refiner folder (see module docstring). include_base=False leaves out
        unet/ and vae/ (an adapter package on top of config.base_model / codec_model)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not include_base:
            if self.config.base_model is None:
                raise ValueError("expected config.base_model (where unet/ comes from) for include_base=False, got None")
            if self.config.seen_mask and not self.has_lora:
                raise ValueError("expected adapters (add_lora) to save the seen-mask conv_in without the base, got none")
        (directory / CONFIG_NAME).write_text(self.config.to_json())
        save_file({"prompt_embeds": self.prompt_embeds.detach().cpu().float().contiguous()}, directory / WEIGHTS_NAME)
        if include_base:
            _save_diffusers(self.unet, directory / UNET_DIR)
            base = self.codec.base_model()
            if base is not None:
                _save_diffusers(base, directory / CODEC_DIR)
        if self.has_lora:
            self.save_lora(directory / LORA_DIR)
        logger.info("refiner saved to %s", directory)

    @classmethod
    def from_pretrained(
        cls,
        src: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        codec: str = "vae",
        codec_model: str | None = None,
        prompt: str = "",
        prompt_embeds: Tensor | None = None,
        local_files_only: bool = False,
        base_model: str | None = None,
        **config_overrides,
    ) -> "Refiner":
        """Load a refiner folder, or build one on an SD-Turbo-style diffusers folder.

        src: a refiner folder (refiner.json), a diffusers SD folder (unet/,
        vae/, text_encoder/, tokenizer/; e.g. a local copy of stabilityai/sd-turbo)
        or a hub id of either (needs the hub; raises MissingModelError offline).
        For an SD folder: codec "vae" or "tiny" (from codec_model, default
        madebyollin/taesd), the prompt embedding from ``prompt`` through its text
        encoder (or given as prompt_embeds [L, D]), RefinerConfig.sd_turbo(**config_overrides).
        base_model: for a saved adapter (a refiner folder without unet/): the base to load it on, a folder or
        hub id, instead of the one its refiner.json names.
        """
        root = _resolve(src, local_files_only)
        if (root / CONFIG_NAME).is_file():
            if config_overrides or prompt_embeds is not None:
                raise ValueError(f"expected no config overrides for a saved refiner, got {sorted(config_overrides)}")
            model = cls._load_refiner_folder(root, local_files_only, base_model)
        elif base_model is not None:
            raise MissingModelError(str(src), f"{root} is no saved adapter ({CONFIG_NAME}) to load on base {base_model}")
        elif (root / UNET_DIR / "config.json").is_file():
            model = cls._load_sd_folder(root, str(src), codec, codec_model, prompt, prompt_embeds, local_files_only, config_overrides)
        else:
            raise MissingModelError(str(src), f"{root} holds neither {CONFIG_NAME} nor {UNET_DIR}/config.json")
        model.eval()  # like diffusers' from_pretrained (train-mode dropout(p=0) kernels differ in the last bits)
        return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model

    @classmethod
    def _load_refiner_folder(cls, root: Path, local_files_only: bool, base_model: str | None = None) -> "Refiner":
        import dataclasses

        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        config = RefinerConfig.from_json((root / CONFIG_NAME).read_text())
        if base_model is not None:
            if (root / UNET_DIR).is_dir() or not (root / LORA_DIR).is_dir():
                raise MissingModelError(str(root), f"{root} is no LoRA adapter to load on base {base_model}: it "
                                        f"{'holds its own ' + UNET_DIR + '/' if (root / UNET_DIR).is_dir() else 'has no ' + LORA_DIR + '/'}")
            config = dataclasses.replace(config, base_model=base_model)
        base = None
        if not (root / UNET_DIR / "config.json").is_file() or (config.codec == "vae" and not (root / CODEC_DIR).is_dir() and config.codec_model is None):
            if config.base_model is None:
                raise MissingModelError(str(root), f"{root} has no {UNET_DIR}/ and refiner.json names no base_model")
            base = _resolve(config.base_model, local_files_only)
        unet = UNet2DConditionModel.from_pretrained(root / UNET_DIR if (root / UNET_DIR).is_dir() else base / UNET_DIR)
        latent_channels = unet.config.out_channels
        if config.seen_mask and unet.config.in_channels == latent_channels:
            presets.expand_conv_in(unet, 1)  # base U-Net; the adapter holds the trained conv_in
        codec = _load_codec(config, root, base, local_files_only)
        prompt = load_file(root / WEIGHTS_NAME)["prompt_embeds"]
        model = cls(config, unet, codec, prompt)
        if (root / LORA_DIR).is_dir():
            model.load_lora(root / LORA_DIR)
        elif base is not None and config.seen_mask:
            raise MissingModelError(str(root), f"{root} has no {LORA_DIR}/ holding the seen-mask conv_in for base {config.base_model}")
        return model

    @classmethod
    def _load_sd_folder(cls, root, src, codec, codec_model, prompt, prompt_embeds, local_files_only, overrides) -> "Refiner":
        from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(root / UNET_DIR)
        if codec == "tiny":
            codec_model = codec_model or DEFAULT_TINY_AE
        config = RefinerConfig.sd_turbo(
            codec=codec, base_model=src, codec_model=codec_model, prompt_dim=unet.config.cross_attention_dim, **overrides
        )
        if config.seen_mask:
            presets.expand_conv_in(unet, 1)
        if codec == "vae":
            codec_obj = VAECodec(AutoencoderKL.from_pretrained(_resolve(codec_model, local_files_only) if codec_model else root / CODEC_DIR))
        elif codec == "tiny":
            codec_obj = TinyCodec(AutoencoderTiny.from_pretrained(_resolve(codec_model, local_files_only)))
        else:
            raise ValueError(f"expected codec 'vae' or 'tiny' on an SD model, got {codec!r}")
        if prompt_embeds is None:
            prompt_embeds = encode_prompt(root, prompt, config.prompt_tokens)
        return cls(config, unet, codec_obj, cls.fit_prompt(prompt_embeds, config.prompt_tokens))


def _load_codec(config: RefinerConfig, root: Path, base: Path | None, local_files_only: bool) -> Codec:
    from diffusers import AutoencoderKL, AutoencoderTiny

    if config.codec == "pixel_unshuffle":
        return PixelUnshuffleCodec(config.pixel_unshuffle_factor)
    if (root / CODEC_DIR).is_dir():
        folder = root / CODEC_DIR
    elif config.codec_model is not None:
        folder = _resolve(config.codec_model, local_files_only)
    elif base is not None and config.codec == "vae":
        folder = base / CODEC_DIR
    else:
        raise MissingModelError(str(root), f"no {CODEC_DIR}/ in {root} and refiner.json names no codec_model")
    cls = AutoencoderKL if config.codec == "vae" else AutoencoderTiny
    model = cls.from_pretrained(folder)
    return VAECodec(model) if config.codec == "vae" else TinyCodec(model)


def _save_diffusers(model, directory: Path) -> None:
    """diffusers folder (config.json + safetensors) of the base weights, adapters stripped (the peft trap)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.save_config(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in lora.base_state_dict(model).items()}
    save_file(state, directory / DIFFUSERS_WEIGHTS_NAME, metadata={"format": "pt"})


def _resolve(src: str | Path, local_files_only: bool = False) -> Path:
    """A local folder, or a hub snapshot of the files the refiner may need."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    text = str(src)
    if not HUB_ID.fullmatch(text):
        raise MissingModelError(text, f"no such folder ({LOCAL_EXPECTED})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=list(HUB_FILES), local_files_only=local_files_only))
    except Exception as exc:  # offline, unknown repo, gated, ...: one clear error
        raise MissingModelError(text, f"no local folder {path} and the hub did not provide it ({type(exc).__name__})") from exc


def encode_prompt(root: str | Path, prompt: str, num_tokens: int) -> Tensor:
    """Prompt embedding [num_tokens, D] from an SD folder's text_encoder/ and tokenizer/.

    The first num_tokens of the padded 77-token CLIP output (BOS first). Done once
    when the text encoder is available; the result is stored with the weights.
    """
    root = Path(root)
    for sub in ("text_encoder", "tokenizer"):
        if not (root / sub).is_dir():
            raise MissingModelError(str(root), f"no {sub}/ in {root} to compute the prompt embedding (or pass prompt_embeds)")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:
        raise ImportError("computing the prompt embedding needs `transformers` (pip install transformers), or pass prompt_embeds") from exc
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = text_encoder(ids)[0]  # [1, 77, D], last hidden state (as diffusers' SD pipelines)
    if num_tokens > embeds.shape[1]:
        raise ValueError(f"expected prompt_tokens <= {embeds.shape[1]}, got {num_tokens}")
    return embeds[0, :num_tokens].float()
