"""The one-step multi-view refiner (TurboPortrait3D): model, attention, codecs, LoRA, weights."""
from models.refiner.model import CONFIG_NAME, MissingModelError, Refiner, RefinerConfig, encode_prompt

__all__ = ["CONFIG_NAME", "MissingModelError", "Refiner", "RefinerConfig", "encode_prompt"]
