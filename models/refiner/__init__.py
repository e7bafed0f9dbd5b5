"""The one-step multi-view refiner (TurboPortrait3D): model, schedule, attention, codecs, LoRA, weights."""
from models.refiner.config import CONFIG_NAME, MissingModelError, RefinerConfig
from models.refiner.io import encode_prompt
from models.refiner.model import Refiner, compile_views, refine_views

__all__ = ["CONFIG_NAME", "MissingModelError", "Refiner", "RefinerConfig", "compile_views", "encode_prompt", "refine_views"]
