"""One-step multi-view diffusion refiner (TurboPortrait3D, Kim et al. 2025).

The avatar renders V_n novel views of a head; the refiner fixes them in one
U-Net step, looking at the clean reference frame as an extra view:

    z_ref = E(ref)                          clean reference latent
    z_n   = E(view_n)                        render latents, n = 1..V_n
    z_n'  = sqrt(a_s) z_n + sqrt(1 - a_s) e  "variable noise": s in [0, 1], a_1 = a_T, a_0 = 1
    e^    = U([z_ref, z_1', .., z_Vn'], T)   joint multi-view self-attention (models.refiner.attention)
    x0_n  = (z_n' - sqrt(1 - a_T) e^) / sqrt(a_T)          (epsilon prediction; DDPM x0)
    out_n = D(x0_n)                          the reference's prediction is discarded

a_t is the DDPM cumulative alpha of the scheduler (SD: scaled-linear betas,
1000 steps); T is the configured U-Net timestep (999 = pix2pix-turbo / SD-Turbo,
199 = Difix3D). The noise level s is a fraction of T: the novel latents get the
noise of timestep round(s (T + 1)) - 1, and s = 0 adds none.

Components (diffusers-style separation): a codec (models.refiner.codecs), a diffusers
``UNet2DConditionModel`` with multi-view attention processors
(models.refiner.attention), a fixed prompt embedding stored with the weights (no text
encoder at run time), optional LoRA adapters (models.refiner.lora).

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

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import lora, presets
from .attention import VIEW_ATTENTION_MODES, clear_caches, prepare_caches, self_attn_processors, set_view_attention
from .codecs import CODEC_KINDS, Codec, PixelUnshuffleCodec, TinyCodec, VAECodec

logger = logging.getLogger(__name__)

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


class MissingModelError(FileNotFoundError):
    """Refiner weights are neither in a local folder nor reachable on the hub."""

    def __init__(self, src: str, reason: str, files: tuple[str, ...] = HUB_FILES):
        name = str(src).rstrip("/").split("/")[-1] or "model"
        include = " ".join(f"--include '{f}'" for f in files)
        super().__init__(
            f"refiner model {src!r} not found: {reason}. "
            f"On a machine with internet run `hf download {src} {include} --local-dir WEIGHTS_DIR/{name}` "
            f"(patterns that do not exist in the repo are skipped), copy WEIGHTS_DIR/{name} here "
            f"and pass that folder: Refiner.from_pretrained('WEIGHTS_DIR/{name}')."
        )
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
    """Self-attention across views: "joint" (Difix3D), "ref_isolated" (reference attends to itself only; cacheable) or "per_view"."""
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


def _alphas_cumprod(config: RefinerConfig) -> Tensor:
    """DDPM cumulative alphas [num_train_timesteps] (float32), as diffusers' DDPMScheduler computes them."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
    )
    return scheduler.alphas_cumprod.to(torch.float32)


class _CudaGraphStep:
    """fn captured once as a CUDA graph for fixed shapes; calls copy inputs in, replay, clone out."""

    def __init__(self, fn, args: tuple[Tensor | None, ...], warmup: int = 2):
        self.static_args = tuple(None if a is None else a.clone() for a in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(*self.static_args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_args)

    def __call__(self, *args: Tensor | None) -> Tensor:
        for dst, src in zip(self.static_args, args):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        return self.static_out.clone()


@dataclass(frozen=True)
class _Prepared:
    """What prepare() fixed for the inference path."""

    device: torch.device
    dtype: torch.dtype
    compile: bool
    cuda_graphs: bool


class Refiner(nn.Module):
    """Codec + multi-view U-Net + one-step x0 prediction. See the module docstring.

    Images are [0, 1] floats; B batch, V_n novel views, H W pixels (multiples
    of the codec factor f), C h w latent channels and size (h = H / f).
    """

    def __init__(self, config: RefinerConfig, unet, codec: Codec, prompt_embeds: Tensor | None = None):
        super().__init__()
        if codec.kind != config.codec:
            raise ValueError(f"expected a {config.codec!r} codec, got {codec.kind!r}")
        expected_in = codec.latent_channels + int(config.seen_mask)
        if unet.config.in_channels != expected_in or unet.config.out_channels != codec.latent_channels:
            raise ValueError(
                f"expected a U-Net with {expected_in} input and {codec.latent_channels} output channels, "
                f"got {unet.config.in_channels} and {unet.config.out_channels}"
            )
        if unet.config.cross_attention_dim != config.prompt_dim:
            raise ValueError(f"expected U-Net cross_attention_dim {config.prompt_dim}, got {unet.config.cross_attention_dim}")
        shape = (config.prompt_tokens, config.prompt_dim)
        if prompt_embeds is None:
            prompt_embeds = torch.randn(shape)
        if tuple(prompt_embeds.shape) != shape:
            raise ValueError(f"expected prompt_embeds of shape {shape}, got {tuple(prompt_embeds.shape)}")
        self.config = config
        self.unet = unet
        self.codec = codec
        prompt_embeds = prompt_embeds.detach().clone().to(torch.float32)
        if config.learned_prompt:
            self.prompt_embeds = nn.Parameter(prompt_embeds)  # [L, D]
        else:
            self.register_buffer("prompt_embeds", prompt_embeds)  # [L, D]
        set_view_attention(unet, config.view_attention)

        ab = _alphas_cumprod(config)
        a_t = float(ab[config.timestep])
        self._sqrt_a_t = a_t**0.5  # x0 coefficients at the U-Net timestep T
        self._sqrt_1m_a_t = (1.0 - a_t) ** 0.5
        # a(s) for s = i / (T + 1): index 0 is the clean latent, index T + 1 is timestep T.
        # Kept float32 (not a buffer, which .to(dtype) would round); moved to the device on first use.
        self._noise_table = torch.cat([torch.ones(1), ab[: config.timestep + 1]])  # [T + 2]
        self.register_buffer("_timestep", torch.tensor(config.timestep, dtype=torch.long), persistent=False)
        self._lora: dict | None = None  # lora.json content once add_lora ran
        self._prepared: _Prepared | None = None
        self._runners: dict = {}
        self._compiled = None
        self._reference_key: tuple | None = None

    # ---- factories ---------------------------------------------------------------
    @classmethod
    def build(cls, config: RefinerConfig, unet_preset: str | dict, codec_preset: str | dict | None = None) -> "Refiner":
        """Random weights for an architecture preset (see models.refiner.presets)."""
        codec = _build_codec(config, codec_preset)
        unet = presets.build_unet(
            unet_preset, in_channels=codec.latent_channels + int(config.seen_mask), out_channels=codec.latent_channels
        )
        if config.prediction_type == "residual":
            # A new residual model starts as the identity: the render passes through unchanged.
            torch.nn.init.zeros_(unet.conv_out.weight)
            torch.nn.init.zeros_(unet.conv_out.bias)
        return cls(config, unet, codec)

    @classmethod
    def small(cls, **overrides) -> "Refiner":
        """The from-scratch CPU refiner (~17 M parameters), random weights."""
        config = RefinerConfig.small(**overrides)
        return cls.build(config, "small", "small" if config.codec != "pixel_unshuffle" else None)

    @classmethod
    def compact(cls, **overrides) -> "Refiner":
        """The small refiner at three quarters of the width (~10 M parameters), random weights."""
        config = RefinerConfig.small(prompt_dim=presets.COMPACT_UNET["cross_attention_dim"], **overrides)
        return cls.build(config, "compact", None)

    @classmethod
    def sd_turbo_random(cls, codec: str = "vae", **overrides) -> "Refiner":
        """SD-Turbo architecture with random weights (timing only)."""
        config = RefinerConfig.sd_turbo(codec=codec, **overrides)
        return cls.build(config, "sd_turbo", "sd_turbo" if codec != "pixel_unshuffle" else None)

    @classmethod
    def tiny(cls, codec: str = "pixel_unshuffle", **overrides) -> "Refiner":
        """A ~1 M-parameter refiner for tests (32x32 images)."""
        config = RefinerConfig.tiny(codec=codec, **overrides)
        return cls.build(config, "tiny", "tiny" if codec != "pixel_unshuffle" else None)

    # ---- properties --------------------------------------------------------------
    @property
    def factor(self) -> int:
        """Pixels per latent cell along each axis; H and W must be multiples of it."""
        return self.codec.factor

    @property
    def has_lora(self) -> bool:
        return self._lora is not None

    @property
    def device(self) -> torch.device:
        return self._timestep.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # ---- input checks ------------------------------------------------------------
    def _check_inputs(self, ref: Tensor | None, views: Tensor, seen: Tensor | None) -> tuple[int, int, int, int]:
        if views.ndim != 5 or views.shape[2] != 3:
            raise ValueError(f"expected views [B, V, 3, H, W], got {tuple(views.shape)}")
        b, vn, _, h, w = views.shape
        if vn < 1:
            raise ValueError(f"expected at least one novel view, got V={vn}")
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"expected H and W multiples of {f} (the codec factor), got {h}x{w}")
        if ref is not None and tuple(ref.shape) != (b, 3, h, w):
            raise ValueError(f"expected ref [B, 3, H, W] = {(b, 3, h, w)}, got {tuple(ref.shape)}")
        if seen is not None:
            if not self.config.seen_mask:
                raise ValueError("expected seen=None (config.seen_mask is off), got a tensor")
            if tuple(seen.shape) != (b, vn, 1, h, w):
                raise ValueError(f"expected seen [B, V, 1, H, W] = {(b, vn, 1, h, w)}, got {tuple(seen.shape)}")
        return b, vn, h, w

    def _noise_levels(self, noise_level: float | Tensor | None, b: int) -> Tensor | None:
        """noise_level -> s [B] float on the model device, or None for no noise at all."""
        if noise_level is None:
            noise_level = self.config.noise_level
        if isinstance(noise_level, Tensor):
            s = noise_level.to(device=self.device, dtype=torch.float32)
            if s.ndim == 0:
                s = s.expand(b)
            if tuple(s.shape) != (b,):
                raise ValueError(f"expected noise_level [B] = ({b},), got {tuple(noise_level.shape)}")
            if bool(((s < 0) | (s > 1)).any()):
                raise ValueError(f"expected noise_level in [0, 1], got values in [{s.min().item()}, {s.max().item()}]")
            return s
        noise_level = float(noise_level)
        if not 0.0 <= noise_level <= 1.0:
            raise ValueError(f"expected noise_level in [0, 1], got {noise_level}")
        if noise_level == 0.0:
            return None
        return torch.full((b,), noise_level, device=self.device)

    def _noise(self, s: Tensor | None, b: int, vn: int, h: int, w: int, generator, dtype) -> tuple[Tensor | None, ...]:
        """(noise [B, Vn, C, h, w], sqrt(a_s) [B], sqrt(1 - a_s) [B]) or Nones."""
        if s is None:
            return None, None, None
        if self._noise_table.device != s.device:
            self._noise_table = self._noise_table.to(s.device)
        idx = torch.round(s * (self.config.timestep + 1)).long()  # [B] in 0..T+1
        a = self._noise_table[idx]  # [B] float32
        shape = (b, vn, self.codec.latent_channels, h // self.factor, w // self.factor)
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=dtype)
        return noise, a.sqrt().to(dtype), (1.0 - a).sqrt().to(dtype)

    # ---- the step ------------------------------------------------------------------
    def _x0(self, z_t: Tensor, pred: Tensor) -> Tensor:
        """One-step DDPM x0 from the U-Net output at timestep T. z_t, pred: [..., C, h, w]."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (z_t - self._sqrt_1m_a_t * pred) / self._sqrt_a_t
        if kind == "v_prediction":
            return self._sqrt_a_t * z_t - self._sqrt_1m_a_t * pred
        if kind == "residual":
            return z_t - pred
        return pred

    def _seen_channel(self, seen: Tensor | None, b: int, v: int, vn: int, h: int, w: int, dtype) -> Tensor:
        """Seen mask per view pooled to latent size -> [B*V, 1, h/f, w/f]; reference and seen=None: ones."""
        if seen is None:
            return torch.ones(b * v, 1, h // self.factor, w // self.factor, device=self.device, dtype=dtype)
        seen = seen.to(dtype)
        if v > vn:
            seen = torch.cat([torch.ones_like(seen[:, :1]).expand(b, v - vn, 1, h, w), seen], dim=1)
        return F.avg_pool2d(seen.flatten(0, 1), self.factor)

    def _step(
        self,
        ref: Tensor | None,
        views: Tensor,
        seen: Tensor | None,
        noise: Tensor | None,
        signal: Tensor | None,
        sigma: Tensor | None,
        fast: bool = False,
    ) -> Tensor:
        """The whole refinement as tensor maths (what compile / CUDA graphs wrap).

        ref [B, 3, H, W] or None (the reference cached by set_reference), views
        [B, Vn, 3, H, W], seen [B, Vn, 1, H, W] or None, noise [B, Vn, C, h, w] or
        None with signal/sigma [B] its coefficients -> [B, Vn, 3, H, W] in [0, 1].
        """
        dtype = self.dtype
        b, vn, _, h, w = views.shape
        images = views if ref is None else torch.cat([ref.unsqueeze(1), views], dim=1)  # [B, V, 3, H, W]
        v = images.shape[1]
        x = images.flatten(0, 1).to(dtype) * 2 - 1  # [B*V, 3, H, W] in [-1, 1]
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        z, skips = self.codec.encode(x, return_skips=self.codec.has_skips)  # [B*V, C, h, w]
        z = z.unflatten(0, (b, v))
        z_ref, z_new = z[:, : v - vn], z[:, v - vn :]  # [B, V-Vn, C, h, w], [B, Vn, C, h, w]
        if noise is not None:
            z_new = signal.view(b, 1, 1, 1, 1) * z_new + sigma.view(b, 1, 1, 1, 1) * noise
        z_in = torch.cat([z_ref, z_new], dim=1).flatten(0, 1)  # [B*V, C, h, w]
        if self.config.seen_mask:
            z_in = torch.cat([z_in, self._seen_channel(seen, b, v, vn, h, w, dtype)], dim=1)
        prompt = self.prompt_embeds.to(dtype).unsqueeze(0).expand(b * v, -1, -1)  # [B*V, L, D]
        kwargs = {"num_views": v, "prepared": fast}
        if ref is None:
            kwargs["reference_kv"] = "use"  # v counts the novel views; the reference keys/values are cached
        pred = self.unet(z_in, self._timestep, encoder_hidden_states=prompt, cross_attention_kwargs=kwargs, return_dict=False)[0]
        pred = pred.unflatten(0, (b, v))[:, v - vn :]  # novel views only: [B, Vn, C, h, w]
        if self.config.edit_unseen_only and seen is not None:
            gate = 1.0 - F.avg_pool2d(seen.to(dtype).flatten(0, 1), self.factor).unflatten(0, (b, vn))  # [B, Vn, 1, h, w]
            pred = pred * gate
        z0 = self._x0(z_new, pred)
        if skips is not None:
            skips = [s.unflatten(0, (b, v))[:, v - vn :].flatten(0, 1) for s in skips]
        out = self.codec.decode(z0.flatten(0, 1), skips)  # [B*Vn, 3, H, W] in about [-1, 1]
        return ((out + 1) / 2).clamp(0, 1).unflatten(0, (b, vn))

    def _step_fast(self, ref, views, seen, noise, signal, sigma) -> Tensor:
        return self._step(ref, views, seen, noise, signal, sigma, fast=True)

    # ---- training entry point -----------------------------------------------------------
    def forward(
        self,
        ref: Tensor,
        views: Tensor,
        seen: Tensor | None = None,
        noise_level: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Refine novel views (differentiable; training calls this).

        ref [B, 3, H, W] in [0, 1]: the clean reference frame.
        views [B, V, 3, H, W] in [0, 1]: the avatar's renders at the novel cameras.
        seen [B, V, 1, H, W] in [0, 1] or None (all seen); only with config.seen_mask.
        noise_level: None (config default), a float, or [B] per-sample levels in [0, 1].
        generator: for the noise (on the model's device).
        Returns the refined views [B, V, 3, H, W] in [0, 1] (model dtype), clamped
        as pix2pix-turbo does (zero gradient where the prediction leaves [0, 1]).
        """
        if ref is None:
            raise ValueError("expected ref [B, 3, H, W], got None (a cached reference is for refine(None, views))")
        b, vn, h, w = self._check_inputs(ref, views, seen)
        s = self._noise_levels(noise_level, b)
        noise, signal, sigma = self._noise(s, b, vn, h, w, generator, self.dtype)
        return self._step(ref, views, seen, noise, signal, sigma, fast=False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """All parameters without LoRA; with LoRA: adapters, skip convs, conv_in (seen mask), learned prompt."""
        if not self.has_lora:
            return list(self.parameters())
        return [p for _, p in self._adapter_parameters()]

    # ---- inference -----------------------------------------------------------------------
    def prepare(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        channels_last: bool = True,
        merge_lora: bool = True,
        fuse_qkv: bool = True,
        compile_mode: str | None = None,
    ) -> "Refiner":
        """One-time work for refine(): device/dtype, eval, merged LoRA, channels_last,
        cached prompt keys/values, fused self-attention q/k/v, torch.compile and/or
        CUDA graphs (captured per input shape - i.e. per view count - on first use
        and reused).

        compile + cuda_graphs uses torch.compile(mode="reduce-overhead");
        cuda_graphs alone captures the eager step with torch.cuda.CUDAGraph.
        Call again after changing weights (caches hold derived tensors).
        """
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"expected a CUDA device for cuda_graphs, got {device}")
        self.eval()
        if merge_lora and self.has_lora:
            for module in self._lora_modules().values():
                lora.merge_lora(module)
        self.to(device=device, dtype=dtype)
        self._noise_table = self._noise_table.to(device)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.codec.to(memory_format=torch.channels_last)
        clear_caches(self.unet)
        self._reference_key = None
        # fused q/k/v copies the projection weights: only valid with no adapters or merged ones
        fuse_qkv = fuse_qkv and (not self.has_lora or lora.is_merged(self.unet))
        prepare_caches(self.unet, self.prompt_embeds.detach().to(dtype).unsqueeze(0), fuse_qkv=fuse_qkv)
        self._runners = {}
        self._compiled = None
        if compile:
            mode = compile_mode or ("reduce-overhead" if cuda_graphs else None)
            self._compiled = torch.compile(self._step_fast, mode=mode, dynamic=False)
        self._prepared = _Prepared(device, dtype, compile, cuda_graphs)
        logger.info("refiner prepared: device=%s dtype=%s compile=%s cuda_graphs=%s", device, dtype, compile, cuda_graphs)
        return self

    @torch.no_grad()
    def set_reference(self, ref: Tensor) -> None:
        """Cache the reference view's self-attention keys/values (view_attention="ref_isolated").

        ref [B, 3, H, W] in [0, 1]. Afterwards refine(None, views) skips the
        reference's encode and U-Net pass; the result equals refine(ref, views).
        """
        if self.config.view_attention != "ref_isolated":
            raise ValueError(f"expected view_attention='ref_isolated' to cache the reference, got {self.config.view_attention!r}")
        if ref.ndim != 4 or ref.shape[1] != 3 or ref.shape[2] % self.factor or ref.shape[3] % self.factor:
            raise ValueError(f"expected ref [B, 3, H, W] with H, W multiples of {self.factor}, got {tuple(ref.shape)}")
        b, _, h, w = ref.shape
        dtype = self.dtype
        fast = self._prepared is not None
        x = ref.to(device=self.device, dtype=dtype) * 2 - 1
        z, _ = self.codec.encode(x)  # [B, C, h, w]
        if self.config.seen_mask:
            z = torch.cat([z, self._seen_channel(None, b, 1, 1, h, w, dtype)], dim=1)
        prompt = self.prompt_embeds.to(dtype).unsqueeze(0).expand(b, -1, -1)
        kwargs = {"num_views": 1, "reference_kv": "record", "prepared": fast}
        self.unet(z, self._timestep, encoder_hidden_states=prompt, cross_attention_kwargs=kwargs, return_dict=False)
        key = (b, h, w, dtype)
        if key != self._reference_key:  # cache tensors were reallocated: graphs holding the old ones are stale
            self._runners = {k: r for k, r in self._runners.items() if not k[4]}
        self._reference_key = key

    def clear_reference(self) -> None:
        for processor in self_attn_processors(self.unet):
            processor.clear_reference()
        self._runners = {k: r for k, r in self._runners.items() if not k[4]}
        self._reference_key = None

    @torch.no_grad()
    def refine(
        self,
        ref: Tensor | None,
        views: Tensor,
        seen: Tensor | None = None,
        noise_level: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Fast inference entry point; same tensor contract as forward().

        ref may be None after set_reference() (cached reference, "ref_isolated"
        models only). Inputs must be on the prepared device; output is in the
        prepared dtype. Uses the caches/compile/graphs set up by prepare().
        """
        b, vn, h, w = self._check_inputs(ref, views, seen)
        if ref is None:
            if self._reference_key is None:
                raise ValueError("expected a reference image, got None and no cached reference (call set_reference)")
            if self._reference_key[:3] != (b, h, w):
                raise ValueError(f"expected views matching the cached reference (B, H, W) = {self._reference_key[:3]}, got {(b, h, w)}")
        prepared = self._prepared
        s = self._noise_levels(noise_level, b)
        noise, signal, sigma = self._noise(s, b, vn, h, w, generator, self.dtype)
        args = (ref, views, seen, noise, signal, sigma)
        if prepared is None:
            return self._step(*args)
        if self._compiled is not None:
            if prepared.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
                return self._compiled(*args).clone()
            return self._compiled(*args)
        if prepared.cuda_graphs:
            key = (b, vn, h, w, ref is None, seen is None, noise is None, views.dtype)
            runner = self._runners.get(key)
            if runner is None:
                logger.info("capturing a CUDA graph for B=%d V=%d %dx%d", b, vn, h, w)
                runner = self._runners[key] = _CudaGraphStep(self._step_fast, args)
            return runner(*args)
        return self._step_fast(*args)

    # ---- LoRA ------------------------------------------------------------------------------
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
        targets: tuple[str, ...] = lora.UNET_LORA_TARGETS,
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
        unet_spec = lora.LoraSpec(rank=rank, alpha=float(alpha if alpha is not None else rank), targets=tuple(targets))
        decoder = self.codec.decoder_module()
        if decoder_rank and decoder is None:
            raise ValueError(f"expected a codec with a decoder for decoder LoRA, got {self.codec.kind!r}")
        if skip_convs and not isinstance(self.codec, VAECodec):
            raise ValueError(f"expected the 'vae' codec for skip convs, got {self.codec.kind!r}")
        lora.add_lora(self.unet, unet_spec)
        meta["unet"] = unet_spec.to_dict()
        if decoder_rank:
            decoder_spec = lora.LoraSpec(rank=decoder_rank, alpha=float(decoder_rank), targets=lora.conv_and_linear_names(decoder))
            lora.add_lora(decoder, decoder_spec)
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
            state.update({f"{prefix}.{k}": v for k, v in lora.lora_state_dict(module).items()})
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
        unet_spec = lora.LoraSpec.from_dict(meta["unet"])
        decoder_spec = lora.LoraSpec.from_dict(meta["decoder"]) if meta.get("decoder") else None
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
        if any(lora.is_merged(m) for m in self._lora_modules().values()):
            raise RuntimeError("adapters are merged (prepare): load adapters before prepare()")
        state = load_file(directory / LORA_WEIGHTS_NAME)
        for prefix, module in self._lora_modules().items():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".") and ".lora_" in k}
            lora.load_lora_state_dict(module, part, prefix)
        others = dict(self._adapter_parameters())
        rest = {k: v for k, v in state.items() if ".lora_" not in k}
        if set(rest) != {k for k in others if ".lora_" not in k}:
            raise ValueError(f"expected adapter tensors {sorted(k for k in others if '.lora_' not in k)}, got {sorted(rest)}")
        with torch.no_grad():
            for k, v in rest.items():
                others[k].copy_(v)

    # ---- saving and loading --------------------------------------------------------------------
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
        **config_overrides,
    ) -> "Refiner":
        """Load a refiner folder, or build one on an SD-Turbo-style diffusers folder.

        src: a refiner folder (refiner.json), a diffusers SD folder (unet/,
        vae/, text_encoder/, tokenizer/; e.g. a local copy of stabilityai/sd-turbo)
        or a hub id of either (needs the hub; raises MissingModelError offline).
        For an SD folder: codec "vae" or "tiny" (from codec_model, default
        madebyollin/taesd), the prompt embedding from ``prompt`` through its text
        encoder (or given as prompt_embeds [L, D]), RefinerConfig.sd_turbo(**config_overrides).
        """
        root = _resolve(src, local_files_only)
        if (root / CONFIG_NAME).is_file():
            if config_overrides or prompt_embeds is not None:
                raise ValueError(f"expected no config overrides for a saved refiner, got {sorted(config_overrides)}")
            model = cls._load_refiner_folder(root, local_files_only)
        elif (root / UNET_DIR / "config.json").is_file():
            model = cls._load_sd_folder(root, str(src), codec, codec_model, prompt, prompt_embeds, local_files_only, config_overrides)
        else:
            raise MissingModelError(str(src), f"{root} holds neither {CONFIG_NAME} nor {UNET_DIR}/config.json")
        model.eval()  # like diffusers' from_pretrained (train-mode dropout(p=0) kernels differ in the last bits)
        return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model

    @classmethod
    def _load_refiner_folder(cls, root: Path, local_files_only: bool) -> "Refiner":
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        config = RefinerConfig.from_json((root / CONFIG_NAME).read_text())
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
        prompt_embeds = prompt_embeds.reshape(-1, prompt_embeds.shape[-1])[: config.prompt_tokens]
        return cls(config, unet, codec_obj, prompt_embeds)


# ---- module helpers ------------------------------------------------------------------------------
def _build_codec(config: RefinerConfig, preset: str | dict | None) -> Codec:
    if config.codec == "pixel_unshuffle":
        return PixelUnshuffleCodec(config.pixel_unshuffle_factor)
    model = presets.build_codec_model(config.codec, preset)
    return VAECodec(model) if config.codec == "vae" else TinyCodec(model)


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


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _resolve(src: str | Path, local_files_only: bool = False) -> Path:
    """A local folder, or a hub snapshot of the files the refiner may need."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    text = str(src)
    if not _HUB_ID.fullmatch(text):
        raise MissingModelError(text, f"no folder at {path}")
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
