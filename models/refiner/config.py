"""The refiner's saved configuration (RefinerConfig, refiner.json), the names of the files in a
refiner folder, and the error for weights that are nowhere to be found."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import presets
from .attention import VIEW_ATTENTION_MODES
from .codecs import CODEC_KINDS

CONFIG_NAME = "refiner.json"
WEIGHTS_NAME = "refiner.safetensors"
LORA_DIR = "lora"
LORA_CONFIG_NAME = "lora.json"
LORA_WEIGHTS_NAME = "lora.safetensors"
UNET_DIR = "unet"
CODEC_DIR = "vae"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
FORMAT_VERSION = 1
DEFAULT_TINY_AE = "madebyollin/taesd"
# Files worth fetching from a hub repo: a refiner folder, an SD pipeline (fp32 safetensors only) or a bare codec.
HUB_FILES = (
    CONFIG_NAME,
    WEIGHTS_NAME,
    f"{LORA_DIR}/*",
    "model_index.json",
    "unet/config.json",
    f"unet/{DIFFUSERS_WEIGHTS_NAME}",
    "vae/config.json",
    f"vae/{DIFFUSERS_WEIGHTS_NAME}",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/*",
    "config.json",
    DIFFUSERS_WEIGHTS_NAME,
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "residual")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A model hub id, "owner/name": never absolute, never ./ or ../, exactly one separator."""
LOCAL_EXPECTED = (f"expected a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}, or a diffusers model with "
                  f"{UNET_DIR}/config.json")
"""What a local refiner folder holds, for the errors about one that holds nothing we can load."""


def is_hub_id(src: str | Path) -> bool:
    """True for "owner/name" that is no folder here: a name the model hub may know."""
    return bool(HUB_ID.fullmatch(str(src))) and not Path(src).expanduser().exists()


class MissingModelError(FileNotFoundError):
    """Refiner weights are neither in a local folder nor reachable on the hub. One line: for a hub id, the
    `hf download` that fetches it; for a local path, only what is wrong with that folder."""

    def __init__(self, src: str, reason: str, files: tuple[str, ...] = HUB_FILES):
        if is_hub_id(src):
            name = str(src).split("/")[-1]
            include = " ".join(f"--include '{f}'" for f in files)
            message = (f"refiner model {src!r} not found: {reason}; on a machine with internet run `hf download {src} "
                       f"{include} --local-dir WEIGHTS_DIR/{name}`, copy that folder here and pass it instead")
        else:
            message = f"no refiner at {str(src)!r}: {reason}"
        super().__init__(message)
        self.src = str(src)

@dataclass(frozen=True)
class RefinerConfig:
    """Refiner hyper-parameters; saved as refiner.json beside the weights."""

    codec: str = "vae"
    """Image<->latent codec: "vae" (SD AutoencoderKL), "tiny" (AutoencoderTiny/TAESD) or "pixel_unshuffle"."""
    pixel_unshuffle_factor: int = 8
    """Space-to-depth factor of the "pixel_unshuffle" codec (latent channels 3 f^2)."""
    timestep: int = 999
    """U-Net timestep T of the single step (999: pix2pix-turbo/SD-Turbo, 199: Difix3D)."""
    num_train_timesteps: int = 1000
    """Length of the DDPM schedule the timestep indexes."""
    beta_start: float = 0.00085
    """DDPM beta at t = 0 (SD)."""
    beta_end: float = 0.012
    """DDPM beta at the last step (SD)."""
    beta_schedule: str = "scaled_linear"
    """diffusers beta schedule name (SD: "scaled_linear")."""
    prediction_type: str = "epsilon"
    """What the U-Net predicts: "epsilon", "v_prediction", "sample" (x0 directly) or
    "residual" (x0 = z_t - prediction: a correction of the render's own latent; with a
    zero-initialised output layer a new model starts as the identity)."""
    noise_level: float = 0.0
    """Default noise added to the novel views, a fraction of T in [0, 1] (0: none)."""
    view_attention: str = "joint"
    """Self-attention across views: "joint" (Difix3D), "ref_isolated" (reference attends to itself only; cacheable),
    "ref_pairs" (as ref_isolated, and each novel view attends only to the reference and itself: views independent of
    each other, cost linear in their number) or "per_view"."""
    seen_mask: bool = False
    """Feed the avatar's seen-texture mask as one extra U-Net input channel (reference: all ones)."""
    edit_unseen_only: bool = False
    """With "residual" prediction and a seen mask: scale the correction by (1 - seen) per latent
    cell, so the refiner only repaints what the avatar had to invent and leaves seen texture as
    rendered (a strong prior when real training data is scarce)."""
    prompt_tokens: int = 77
    """Tokens L of the fixed prompt embedding [L, prompt_dim] (77: full CLIP context; fewer is faster)."""
    prompt_dim: int = 1024
    """Width of the prompt embedding (= the U-Net's cross_attention_dim)."""
    learned_prompt: bool = False
    """Train the prompt embedding (a learned constant) instead of keeping it fixed."""
    base_model: str | None = None
    """Where unet/ (and vae/ for the "vae" codec) come from when not saved with the refiner: folder or hub id."""
    codec_model: str | None = None
    """Where the codec comes from when not saved with the refiner and not in base_model (e.g. madebyollin/taesd)."""

    def __post_init__(self):
        if self.codec not in CODEC_KINDS:
            raise ValueError(f"expected codec in {CODEC_KINDS}, got {self.codec!r}")
        if self.pixel_unshuffle_factor < 1:
            raise ValueError(f"expected pixel_unshuffle_factor >= 1, got {self.pixel_unshuffle_factor}")
        if not 0 <= self.timestep < self.num_train_timesteps:
            raise ValueError(f"expected 0 <= timestep < {self.num_train_timesteps}, got {self.timestep}")
        if self.edit_unseen_only and (self.prediction_type != "residual" or not self.seen_mask):
            raise ValueError("expected edit_unseen_only only with prediction_type 'residual' and seen_mask on")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"expected prediction_type in {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not 0.0 <= self.noise_level <= 1.0:
            raise ValueError(f"expected noise_level in [0, 1], got {self.noise_level}")
        if self.view_attention not in VIEW_ATTENTION_MODES:
            raise ValueError(f"expected view_attention in {VIEW_ATTENTION_MODES}, got {self.view_attention!r}")
        if self.prompt_tokens < 1 or self.prompt_dim < 1:
            raise ValueError(f"expected a prompt embedding shape >= (1, 1), got ({self.prompt_tokens}, {self.prompt_dim})")

    # ---- presets -----------------------------------------------------------------
    @classmethod
    def sd_turbo(cls, codec: str = "vae", **overrides) -> "RefinerConfig":
        """SD-Turbo refiner (pix2pix-turbo timestep 999, 77-token prompt)."""
        return cls(**{**dict(codec=codec, timestep=999, prompt_tokens=77, prompt_dim=1024), **overrides})

    @classmethod
    def small(cls, **overrides) -> "RefinerConfig":
        """From-scratch CPU refiner: pixel-unshuffle x8, learned 1-token prompt, cacheable reference."""
        defaults = dict(
            codec="pixel_unshuffle",
            pixel_unshuffle_factor=8,
            timestep=199,
            prompt_tokens=1,
            prompt_dim=presets.SMALL_UNET["cross_attention_dim"],
            learned_prompt=True,
            view_attention="ref_isolated",
            prediction_type="residual",
        )
        return cls(**{**defaults, **overrides})

    @classmethod
    def tiny(cls, codec: str = "pixel_unshuffle", **overrides) -> "RefinerConfig":
        """Test-size refiner (32x32 images)."""
        defaults = dict(
            codec=codec,
            pixel_unshuffle_factor=4,
            timestep=199,
            prompt_tokens=4,
            prompt_dim=presets.TINY_UNET["cross_attention_dim"],
        )
        return cls(**{**defaults, **overrides})

    # ---- json --------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RefinerConfig":
        data = json.loads(text)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"expected refiner.json format_version {FORMAT_VERSION}, got {version}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"expected refiner.json fields from {sorted(known)}, got unknown {unknown}")
        return cls(**data)
