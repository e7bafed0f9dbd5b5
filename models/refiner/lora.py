"""LoRA adapters through peft, saved and loaded on their own.

Targets follow pix2pix-turbo (GaParmar/img2img-turbo): on the U-Net the
attention projections, the feed-forward and every ResBlock/resampler conv; on a
VAE decoder every conv and linear layer.

The peft trap (DESIGN.md 1): a model with an adapter injected has state-dict
keys ``...to_q.base_layer.weight`` / ``...to_q.lora_A.default.weight``; a
diffusers ``save_pretrained`` writes those and ``from_pretrained`` silently
drops them. So base weights are saved from ``base_state_dict`` (adapter keys
removed, ``base_layer`` renamed back) and adapters from ``lora_state_dict``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from torch import Tensor, nn

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
# pix2pix-turbo's U-Net targets (suffixes of module names)
UNET_LORA_TARGETS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv_out",
    "proj_in",
    "proj_out",
    "ff.net.2",
    "ff.net.0.proj",
)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA adapter on one module (saved in lora.json)."""

    rank: int
    """LoRA rank r."""
    alpha: float
    """LoRA alpha; the update is scaled by alpha / rank."""
    targets: tuple[str, ...]
    """Module-name suffixes (or full names) the adapter is injected into."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"expected LoRA rank >= 1, got {self.rank}")
        if not self.targets:
            raise ValueError("expected at least one LoRA target module, got none")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), targets=tuple(d["targets"]))


def conv_and_linear_names(module: nn.Module) -> tuple[str, ...]:
    """Full names of every Conv2d/Linear in module (decoder LoRA targets)."""
    return tuple(name for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and name)


def add_lora(module: nn.Module, spec: LoraSpec) -> None:
    """Inject a LoRA adapter into module in place (lora_B = 0: starts as a no-op)."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_lora(module):
        raise ValueError(f"expected a module without LoRA, got one with adapters {list(module.peft_config)}")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=list(spec.targets))
    inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)


def has_lora(module: nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


def lora_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Adapter weights only, keys without the adapter name (peft's portable format)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)


def load_lora_state_dict(module: nn.Module, state: dict[str, Tensor], where: str) -> None:
    """Load adapter weights; raise if any adapter weight is missing or unexpected."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"expected LoRA weights matching the {where} adapter, got {len(missing)} missing "
            f"(e.g. {missing[:2]}) and {len(result.unexpected_keys)} unexpected (e.g. {list(result.unexpected_keys)[:2]})"
        )


def is_merged(module: nn.Module) -> bool:
    return any(getattr(m, "merged", False) for m in lora_layers(module))


def merge_lora(module: nn.Module) -> None:
    """Fold the adapter into the base weights (inference speed); reversible with unmerge_lora."""
    for layer in lora_layers(module):
        if not layer.merged:
            layer.merge()


def unmerge_lora(module: nn.Module) -> None:
    for layer in lora_layers(module):
        if layer.merged:
            layer.unmerge()


def base_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's own weights with adapters stripped: loadable by its diffusers class."""
    if is_merged(module):
        raise RuntimeError("LoRA adapters are merged into the base weights; unmerge (or save before prepare) to save base weights")
    out = {}
    for key, value in module.state_dict().items():
        if ".lora_" in key or "lora_magnitude_vector" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out
