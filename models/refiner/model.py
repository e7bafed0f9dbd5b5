"""The refiner network (TurboPortrait3D, Kim et al. 2025): codec + multi-view U-Net + one-step x0,
its forward/refine, and refine_views, the one refine entry point of the pipeline, CLI, evaluation and figures.

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
noise of timestep round(s (T + 1)) - 1, and s = 0 adds none (models.refiner.schedule).

Components (diffusers-style separation): a codec (models.refiner.codecs), a diffusers
``UNet2DConditionModel`` with multi-view attention processors
(models.refiner.attention), a fixed prompt embedding stored with the weights (no text
encoder at run time), optional LoRA adapters (models.refiner.lora). The Refiner class
gathers its other concerns from mixins: adapters (lora.LoraMixin), the prepared fast
path (graphs.FastPathMixin) and saving/loading (io.PretrainedMixin).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import presets
from .attention import set_view_attention
from .codecs import Codec, PixelUnshuffleCodec, TinyCodec, VAECodec
from .config import RefinerConfig
from .graphs import FastPathMixin
from .io import PretrainedMixin
from .lora import LoraMixin
from .schedule import OneStepSchedule

logger = logging.getLogger(__name__)


class Refiner(LoraMixin, FastPathMixin, PretrainedMixin, nn.Module):
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

        self.schedule = OneStepSchedule(config)  # noise table and x0 coefficients at T
        self.register_buffer("_timestep", torch.tensor(config.timestep, dtype=torch.long), persistent=False)
        self._lora: dict | None = None  # lora.json content once add_lora ran
        self._prepared = None  # what prepare() fixed (graphs._Prepared)
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
            s = noise_level.to(dtype=torch.float32)  # checked where it lives: a CPU tensor costs the GPU no sync
            if s.ndim == 0:
                s = s.expand(b)
            if tuple(s.shape) != (b,):
                raise ValueError(f"expected noise_level [B] = ({b},), got {tuple(noise_level.shape)}")
            if bool(((s < 0) | (s > 1)).any()):
                raise ValueError(f"expected noise_level in [0, 1], got values in [{s.min().item()}, {s.max().item()}]")
            return s.to(self.device, non_blocking=True)
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
        signal, sigma = self.schedule.noise_coefficients(s)  # [B] float32 each
        shape = (b, vn, self.codec.latent_channels, h // self.factor, w // self.factor)
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=dtype)
        return noise, signal.to(dtype), sigma.to(dtype)

    # ---- the step ------------------------------------------------------------------
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
        z0 = self.schedule.x0(z_new, pred)
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
            self._check_cached_reference(b, h, w)
        s = self._noise_levels(noise_level, b)
        noise, signal, sigma = self._noise(s, b, vn, h, w, generator, self.dtype)
        return self._run_step((ref, views, seen, noise, signal, sigma))

    @staticmethod
    def fit_prompt(embeds: Tensor, tokens: int) -> Tensor:
        """A prompt embedding [..., L, D] (e.g. a text encoder's [1, 77, D]) flattened to
        [N, D] rows -> its first `tokens` rows [tokens, D] (the constructor checks the count)."""
        return embeds.reshape(-1, embeds.shape[-1])[:tokens]


def _build_codec(config: RefinerConfig, preset: str | dict | None) -> Codec:
    if config.codec == "pixel_unshuffle":
        return PixelUnshuffleCodec(config.pixel_unshuffle_factor)
    model = presets.build_codec_model(config.codec, preset)
    return VAECodec(model) if config.codec == "vae" else TinyCodec(model)


def refine_views(
    refiner: Refiner,
    reference: Tensor,  # [B, 3, H, W] or [3, H, W] (one reference for every sample), in [0, 1]
    views: Tensor,  # [B, V, 3, H, W] in [0, 1]: the avatar's renders
    seen: Tensor | None = None,  # [B, V, 1, H, W] in [0, 1]: the avatar's seen-texture mask
    noise_level: float | Tensor | None = None,
    batch: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:  # [B, V, 3, H, W] in [0, 1], the refiner's dtype
    """refiner.refine on renders as the avatar gives them: the one refine entry point.

    The glue every caller needs, written once: the seen mask goes in only when the refiner
    was trained with one (config.seen_mask; otherwise it is dropped), every input is cast to
    the refiner's dtype (it must already be on the refiner's device), a [3, H, W] reference
    is expanded over the batch, and with ``batch`` the B samples are refined ``batch`` at a
    time (one refine call per chunk, in order, so a generator draws the same noise as one
    loop would). noise_level and generator go to refine() only when given (None: its defaults).
    """
    if reference.ndim not in (3, 4):
        raise ValueError(f"expected reference [B, 3, H, W] or [3, H, W], got {tuple(reference.shape)}")
    if batch is not None and batch < 1:
        raise ValueError(f"expected batch >= 1 or None, got {batch}")
    dtype = refiner.dtype
    if not refiner.config.seen_mask:
        seen = None
    kwargs = {}
    if noise_level is not None:
        kwargs["noise_level"] = noise_level
    if generator is not None:
        kwargs["generator"] = generator
    n = views.shape[0]
    if batch is None or batch >= n:  # one call (the streaming path): no slicing
        return _refine_chunk(refiner, reference, views, seen, dtype, kwargs)
    chunks = [
        _refine_chunk(
            refiner,
            reference if reference.ndim == 3 else reference[i : i + batch],
            views[i : i + batch],
            None if seen is None else seen[i : i + batch],
            dtype,
            kwargs,
        )
        for i in range(0, n, batch)
    ]
    return torch.cat(chunks)


def _refine_chunk(refiner, reference, views, seen, dtype, kwargs) -> Tensor:
    """One refine call: reference [b, 3, H, W] or [3, H, W] (expanded to b), everything cast to dtype."""
    if reference.ndim == 3:
        reference = reference[None].expand(views.shape[0], -1, -1, -1)
    return refiner.refine(reference.to(dtype), views.to(dtype), None if seen is None else seen.to(dtype), **kwargs)


def compile_views(
    refiner: Refiner,
    size: int,
    view_counts: Sequence[int] = (1, 2),
    noise_level: float | Tensor | None = None,
) -> None:
    """refine_views once at each of ``view_counts`` on blank inputs shaped as a live sender's (one sample, a
    [1, 3, size, size] reference, V views with their seen masks), so that a refiner prepared with compile=True
    compiles, and captures its CUDA graph for, those view counts now rather than in front of viewers."""
    if size < 1 or not view_counts or min(view_counts) < 1:
        raise ValueError(f"expected size >= 1 and view counts >= 1, got {size} and {tuple(view_counts)}")
    reference = torch.zeros(1, 3, size, size, device=refiner.device)
    for v in view_counts:
        views = torch.zeros(1, v, 3, size, size, device=refiner.device)
        refine_views(refiner, reference, views, torch.ones(1, v, 1, size, size, device=refiner.device), noise_level)
