"""LoRA adapters through peft, saved and loaded on their own; the Refiner's adapter methods (LoraMixin).

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

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .codecs import VAECodec
from .config import FORMAT_VERSION, LORA_CONFIG_NAME, LORA_WEIGHTS_NAME

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


class LoraMixin:
    """Refiner adapters (diffusers' PeftAdapterMixin): add, save and load them on their own.

    Uses the Refiner's unet, codec, config, prompt_embeds and _prepared; owns _lora
    (the lora.json content once add_lora ran).
    """

    @property
    def has_lora(self) -> bool:
        return self._lora is not None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """All parameters without LoRA; with LoRA: adapters, skip convs, conv_in (seen mask), learned prompt."""
        if not self.has_lora:
            return list(self.parameters())
        return [p for _, p in self._adapter_parameters()]

    def _lora_modules(self) -> dict[str, nn.Module]:
        """Prefix -> module carrying adapters."""
        if self._lora is None:
            return {}
        modules = {"unet": self.unet}
        if self._lora.get("decoder") is not None:
            modules["decoder"] = self.codec.decoder_module()
        return modules

    def _adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything an adapter trains and save_lora stores (besides peft weights)."""
        named = []
        for prefix, module in self._lora_modules().items():
            named += [(f"{prefix}.{n}", p) for n, p in module.named_parameters() if ".lora_" in n]
        if self.codec.has_skips:
            named += [(f"skip_convs.{n}", p) for n, p in self.codec.skip_convs.named_parameters()]
        if self.config.seen_mask:
            named += [(f"unet.conv_in.{n}", p) for n, p in self.unet.conv_in.named_parameters()]
        if self.config.learned_prompt:
            named.append(("prompt_embeds", self.prompt_embeds))
        return named

    def add_lora(
        self,
        rank: int = 8,
        alpha: float | None = None,
        decoder_rank: int = 0,
        skip_convs: bool = False,
        targets: tuple[str, ...] = UNET_LORA_TARGETS,
    ) -> list[nn.Parameter]:
        """pix2pix-turbo fine-tuning structure: U-Net LoRA (rank, alpha = rank by
        default), optional decoder LoRA (decoder_rank > 0, every decoder conv/linear)
        and optional encoder->decoder skip convs ("vae" codec). Freezes everything
        else; returns trainable_parameters()."""
        if self._lora is not None:
            raise ValueError("expected a refiner without adapters, got one with adapters (load_lora replaces weights)")
        if self._prepared is not None and self._prepared.cuda_graphs:
            raise RuntimeError("add adapters before prepare(cuda_graphs=True)")
        meta = {"format_version": FORMAT_VERSION, "decoder": None, "skip_convs": bool(skip_convs)}
        unet_spec = LoraSpec(rank=rank, alpha=float(alpha if alpha is not None else rank), targets=tuple(targets))
        decoder = self.codec.decoder_module()
        if decoder_rank and decoder is None:
            raise ValueError(f"expected a codec with a decoder for decoder LoRA, got {self.codec.kind!r}")
        if skip_convs and not isinstance(self.codec, VAECodec):
            raise ValueError(f"expected the 'vae' codec for skip convs, got {self.codec.kind!r}")
        add_lora(self.unet, unet_spec)
        meta["unet"] = unet_spec.to_dict()
        if decoder_rank:
            decoder_spec = LoraSpec(rank=decoder_rank, alpha=float(decoder_rank), targets=conv_and_linear_names(decoder))
            add_lora(decoder, decoder_spec)
            meta["decoder"] = decoder_spec.to_dict()
        if skip_convs:
            self.codec.add_skip_convs()
        self._lora = meta
        self.requires_grad_(False)
        params = self.trainable_parameters()
        for p in params:
            p.requires_grad_(True)
        logger.info("LoRA added: %d trainable tensors, %.2f M parameters", len(params), sum(p.numel() for p in params) / 1e6)
        return params

    def save_lora(self, directory: str | Path) -> None:
        """Write lora.json + lora.safetensors: exactly the tensors trainable_parameters() trains."""
        from safetensors.torch import save_file

        if self._lora is None:
            raise ValueError("expected a refiner with adapters (add_lora), got none")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {}
        for prefix, module in self._lora_modules().items():
            state.update({f"{prefix}.{k}": v for k, v in lora_state_dict(module).items()})
        state.update({n: p for n, p in self._adapter_parameters() if ".lora_" not in n})
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, directory / LORA_WEIGHTS_NAME)
        (directory / LORA_CONFIG_NAME).write_text(json.dumps(self._lora, indent=2))

    def load_lora(self, directory: str | Path) -> None:
        """Load adapters written by save_lora (adds them first if this refiner has none)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / LORA_CONFIG_NAME).is_file() or not (directory / LORA_WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"expected {LORA_CONFIG_NAME} and {LORA_WEIGHTS_NAME} in {directory}, got {sorted(p.name for p in directory.glob('*'))}")
        meta = json.loads((directory / LORA_CONFIG_NAME).read_text())
        unet_spec = LoraSpec.from_dict(meta["unet"])
        decoder_spec = LoraSpec.from_dict(meta["decoder"]) if meta.get("decoder") else None
        if self._lora is None:
            self.add_lora(
                rank=unet_spec.rank,
                alpha=unet_spec.alpha,
                decoder_rank=decoder_spec.rank if decoder_spec else 0,
                skip_convs=bool(meta.get("skip_convs")),
                targets=unet_spec.targets,
            )
        elif json.loads(json.dumps(self._lora)) != meta:
            raise ValueError(f"expected adapters like {meta}, got {self._lora}")
        if any(is_merged(m) for m in self._lora_modules().values()):
            raise RuntimeError("adapters are merged (prepare): load adapters before prepare()")
        state = load_file(directory / LORA_WEIGHTS_NAME)
        for prefix, module in self._lora_modules().items():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".") and ".lora_" in k}
            load_lora_state_dict(module, part, prefix)
        others = dict(self._adapter_parameters())
        rest = {k: v for k, v in state.items() if ".lora_" not in k}
        if set(rest) != {k for k in others if ".lora_" not in k}:
            raise ValueError(f"expected adapter tensors {sorted(k for k in others if '.lora_' not in k)}, got {sorted(rest)}")
        with torch.no_grad():
            for k, v in rest.items():
                others[k].copy_(v)
