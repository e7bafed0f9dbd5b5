"""The two refiner families a TrainConfig can train.

* ``small``: the from-scratch refiner (pixel-unshuffle codec, models.refiner.presets
  SMALL_UNET; or the "tiny" preset for tests), every parameter trained. With
  ``base`` = a refiner folder it continues from those weights (e.g. stage 2
  from a stage-1 export).
* ``lora``: an SD-Turbo-style base (a local diffusers folder with unet/, vae/,
  text_encoder/, tokenizer/, or the hub id stabilityai/sd-turbo when online)
  with pix2pix-turbo LoRA adapters; only adapters (+ skip convs, + seen-mask
  conv_in) train. ``base`` may also be a refiner folder that already carries
  adapters (continue training them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from models.refiner import CONFIG_NAME, Refiner

if TYPE_CHECKING:
    from .trainer import TrainConfig

logger = logging.getLogger(__name__)


def _is_refiner_folder(src: str) -> bool:
    return (Path(src).expanduser() / CONFIG_NAME).is_file()


def build_refiner(config: "TrainConfig") -> Refiner:
    """A refiner in train mode whose trainable_parameters() are what the family trains.

    Seed the global RNG first (torch.manual_seed(config.seed)) for a reproducible
    initialisation of new weights.
    """
    base = config.base
    if base is not None and Path(base).expanduser().is_dir():
        base = str(Path(base).expanduser().resolve())  # refiner.json of an adapter export names it: any cwd must find it
    overrides = {"seen_mask": config.seen_mask}
    if config.edit_unseen_only:
        overrides["edit_unseen_only"] = True
    if config.timestep is not None:
        overrides["timestep"] = config.timestep
    if config.family == "small":
        if base is not None:
            model = Refiner.from_pretrained(base)
            if model.has_lora:
                raise ValueError(f"expected a refiner without adapters for the small family, got adapters in {base} (use --family lora)")
            model.requires_grad_(True)
        elif config.model_preset == "tiny":
            model = Refiner.tiny(**overrides)
        elif config.model_preset == "compact":
            model = Refiner.compact(**overrides)
        else:
            model = Refiner.small(**overrides)
    elif config.family == "lora":
        if base is None:
            raise ValueError("expected --base (an SD-Turbo diffusers folder or stabilityai/sd-turbo) for the lora family, got none")
        if _is_refiner_folder(base):
            model = Refiner.from_pretrained(base)
        else:
            model = Refiner.from_pretrained(base, codec=config.codec, codec_model=config.codec_model, prompt=config.prompt, **overrides)
        if not model.has_lora:
            model.add_lora(
                rank=config.lora_rank,
                decoder_rank=config.lora_decoder_rank if model.codec.decoder_module() is not None else 0,
                skip_convs=config.skip_convs and model.config.codec == "vae",
            )
    else:
        raise ValueError(f"expected family 'small' or 'lora', got {config.family!r}")
    if model.config.seen_mask != config.seen_mask:
        raise ValueError(f"expected a refiner with seen_mask={config.seen_mask}, got {model.config.seen_mask} from {base}")
    model.train()
    return model
