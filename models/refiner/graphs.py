"""The refiner's fast inference path: prepare() (merged LoRA, channels_last, cached prompt and
reference keys/values, fused q/k/v, torch.compile), and one CUDA graph per input shape (view count)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from models.compile_threads import allow_compiles_beside_traces
from . import lora
from .attention import REFERENCE_MODES, clear_caches, prepare_caches, self_attn_processors

logger = logging.getLogger(__name__)

COMPILE_OPTIONS: dict[str, dict[str, bool] | None] = {
    "default": None,
    # from PyTorch's recipe for diffusion U-Nets ("Accelerating Generative AI Part III: Diffusion, Fast"): 1x1
    # convolutions as matrix products, no epilogue fusion. Its coordinate-descent tuning is left out: with it the
    # SD-Turbo-size step compiled for over 7 minutes on an H200 (2026-11-30), too long for a sender starting a call.
    "light": {"conv_1x1_as_mm": True, "epilogue_fusion": False},
}


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


class FastPathMixin:
    """prepare / set_reference / clear_reference and the step dispatch of Refiner.refine.

    Uses the Refiner's unet, codec, prompt_embeds, schedule, _timestep, _seen_channel,
    _step, _step_fast and _lora_modules; owns _prepared, _runners (one _CudaGraphStep per input
    shape), _compiled and _reference_key ((B, H, W, dtype) of the cached reference).
    """

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
        compile_dynamic: bool | None = False,
        compile_options: str = "default",
    ):
        """One-time work for refine(): device/dtype, eval, merged LoRA, channels_last,
        cached prompt keys/values, fused self-attention q/k/v, torch.compile and/or
        CUDA graphs (captured per input shape - i.e. per view count - on first use
        and reused).

        cuda_graphs captures the step (eager, or compiled with torch.compile(mode=compile_mode)) with
        torch.cuda.CUDAGraph, one graph per input shape.
        compile_dynamic: torch.compile's ``dynamic``. False compiles once per view count (fastest
        kernels; about 80 s each for the SD-Turbo-size U-Net); None compiles the first view count as it
        is and the second with the view count symbolic, which then serves every other count (two
        compiles in all: a live sender whose viewers come and go).
        compile_options: a name in COMPILE_OPTIONS, inductor's settings for this compile (not with compile_mode).
        Call again after changing weights (caches hold derived tensors).
        """
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        if compile_options not in COMPILE_OPTIONS:
            raise ValueError(f"expected compile_options in {sorted(COMPILE_OPTIONS)}, got {compile_options!r}")
        options = COMPILE_OPTIONS[compile_options]
        if options and compile_mode:
            raise ValueError(f"expected compile_mode or compile_options, got both ({compile_mode!r}, {compile_options!r})")
        if cuda_graphs and device.type != "cuda":
            raise ValueError(f"expected a CUDA device for cuda_graphs, got {device}")
        self.eval()
        if merge_lora and self.has_lora:
            for module in self._lora_modules().values():
                lora.merge_lora(module)
        self.to(device=device, dtype=dtype)
        self.schedule.to(device)
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
        if compile:  # with cuda_graphs, captured per shape below (as the eager step): not inductor's graph trees,
            # which refused to record beside the avatar's own CUDA graphs in the sender ("already recording to mempool")
            allow_compiles_beside_traces()  # the avatar's worker may compile while this step compiles or runs
            self._compiled = torch.compile(self._step_fast, mode=compile_mode, dynamic=compile_dynamic, options=options)
        self._prepared = _Prepared(device, dtype, compile, cuda_graphs)
        logger.info("refiner prepared: device=%s dtype=%s compile=%s cuda_graphs=%s", device, dtype, compile, cuda_graphs)
        return self

    @torch.no_grad()
    def set_reference(self, ref: Tensor) -> None:
        """Cache the reference view's self-attention keys/values (view_attention "ref_isolated" or "ref_pairs").

        ref [B, 3, H, W] in [0, 1]. Afterwards refine(None, views) skips the
        reference's encode and U-Net pass; the result equals refine(ref, views).
        """
        if self.config.view_attention not in REFERENCE_MODES:
            raise ValueError(f"expected view_attention in {REFERENCE_MODES} to cache the reference, got {self.config.view_attention!r}")
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

    def _check_cached_reference(self, b: int, h: int, w: int) -> None:
        """refine(None, views): a reference must be cached, for the same (B, H, W)."""
        if self._reference_key is None:
            raise ValueError("expected a reference image, got None and no cached reference (call set_reference)")
        if self._reference_key[:3] != (b, h, w):
            raise ValueError(f"expected views matching the cached reference (B, H, W) = {self._reference_key[:3]}, got {(b, h, w)}")

    def _run_step(self, args: tuple[Tensor | None, ...]) -> Tensor:
        """_step(*args) the way prepare() set up: plain, compiled, CUDA-graphed (one graph per shape) or fast eager."""
        prepared = self._prepared
        if prepared is None:
            return self._step(*args)
        step = self._step_fast if self._compiled is None else self._compiled
        if prepared.cuda_graphs:
            ref, views, seen, noise = args[:4]
            b, vn, _, h, w = views.shape
            key = (b, vn, h, w, ref is None, seen is None, noise is None, views.dtype)
            runner = self._runners.get(key)
            if runner is None:
                logger.info("%s a CUDA graph for B=%d V=%d %dx%d", "compiling and capturing" if self._compiled else "capturing",
                            b, vn, h, w)
                runner = self._runners[key] = _CudaGraphStep(step, args)
            return runner(*args)
        return step(*args)
