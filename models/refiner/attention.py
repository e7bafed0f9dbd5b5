"""Multi-view attention for the refiner U-Net ("attention reshaping").

Difix3D and TurboPortrait3D turn a single-image U-Net into a multi-view one by
letting every self-attention (``attn1`` of each transformer block) attend over
all V views of a sample at once:

    tokens [B*V, N, D] -> [B, V*N, D] -> attention -> [B*V, N, D]

Cross-attention (``attn2``), ResBlocks and feed-forward layers stay per view.
With V = 1 the reshape is the identity and the block is the stock diffusers
block, bit for bit.

The processors below are installed with ``unet.set_attn_processor`` (no copy of
the U-Net) and read the view count from ``cross_attention_kwargs`` at run time,
so V can change from call to call (one novel view per connected viewer):

    unet(z, t, prompt, cross_attention_kwargs={"num_views": V})

View attention modes (``set_view_attention``):
- ``"joint"``: every token attends to every view (Difix3D).
- ``"ref_isolated"``: the reference view (view 0) attends only to itself; the
  novel views attend to all views. The reference pass then no longer depends on
  the novel views, so its keys/values can be computed once per reference and
  cached (``reference_kv="record"`` / ``"use"``).
- ``"ref_pairs"``: the reference attends only to itself and each novel view to
  the reference and itself. A viewer's view then does not depend on the other
  viewers' (a picture does not change when someone else joins or orbits), the
  attention's cost grows with the number of views instead of its square, and
  the reference's keys/values can be cached as for ``"ref_isolated"``.
- ``"per_view"``: no cross-view attention (ablation baseline; stock U-Net).

Fast paths, each with a plain twin (the same processor without the cache):
- cached reference keys/values for ``"ref_isolated"``;
- cached prompt keys/values for cross-attention (the prompt embedding is a
  constant); with a 1-token prompt the cross-attention output does not depend
  on the query at all (softmax over one key is 1), so the whole ``attn2`` output
  is a cached constant;
- one fused q/k/v projection for self-attention (one GEMM instead of three).
The prompt and q/k/v caches are built by ``prepare_caches`` and used when the
U-Net is called with ``prepared=True`` in its cross_attention_kwargs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

VIEW_ATTENTION_MODES = ("joint", "ref_isolated", "ref_pairs", "per_view")
REFERENCE_MODES = ("ref_isolated", "ref_pairs")  # the reference attends only to itself: its keys/values can be cached
REFERENCE_KV_MODES = (None, "record", "use")


def _split_heads(x: Tensor, batch: int, heads: int) -> Tensor:
    """[batch*?, S', heads*d] viewed as batch rows -> [batch, heads, S, d]."""
    head_dim = x.shape[-1] // heads
    return x.reshape(batch, -1, heads, head_dim).transpose(1, 2)


def _reference_pairs(query: Tensor, key: Tensor, value: Tensor, b: int, ref_k: Tensor | None = None,
                     ref_v: Tensor | None = None) -> Tensor:
    """Attention of view_attention "ref_pairs": query, key, value [B*V, heads, N, d], views of a sample
    contiguous. With ref_k/ref_v None view 0 of each sample is the reference, which attends to itself; else
    ref_k/ref_v [B, heads, N, d] are the reference's (cached) and every view is a novel one. Each novel view
    attends to the reference's tokens and its own. Returns [B*V, heads, N, d]."""
    bv, heads, n, d = query.shape
    q, k, v = (t.reshape(b, bv // b, heads, n, d) for t in (query, key, value))
    out_ref = None
    if ref_k is None:
        ref_k, ref_v = k[:, 0], v[:, 0]
        out_ref = F.scaled_dot_product_attention(q[:, 0], ref_k, ref_v, dropout_p=0.0, is_causal=False)
        q, k, v = q[:, 1:], k[:, 1:], v[:, 1:]
    m = q.shape[1]
    keys = torch.cat([ref_k[:, None].expand(b, m, heads, n, d), k], dim=3).reshape(b * m, heads, 2 * n, d)
    values = torch.cat([ref_v[:, None].expand(b, m, heads, n, d), v], dim=3).reshape(b * m, heads, 2 * n, d)
    out = F.scaled_dot_product_attention(q.reshape(b * m, heads, n, d), keys, values, dropout_p=0.0, is_causal=False)
    out = out.reshape(b, m, heads, n, d)
    if out_ref is not None:
        out = torch.cat([out_ref[:, None], out], dim=1)
    return out.reshape(bv, heads, n, d)


def _check_plain_attention(attn, name: str) -> None:
    """The processors support the attention layers of SD-style transformer blocks only."""
    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise ValueError(f"expected a transformer-block attention without spatial/group norm at {name}, got one with it")


class MultiViewSelfAttnProcessor:
    """Self-attention (``attn1``) that attends across the V views of each sample.

    Call contract (diffusers attention processor):
        hidden_states: [B*V, N, D] tokens, views of a sample contiguous (view-major)
        num_views: V (>= 1); B*V must be divisible by it
        reference_kv: None (compute everything), "record" (V must be 1: store this
            call's keys/values as the reference cache) or "use" (hidden_states
            holds the novel views only; the cached reference keys/values are
            prepended to the keys/values)
    Returns [B*V, N, D].
    """

    def __init__(self, mode: str = "joint"):
        if mode not in VIEW_ATTENTION_MODES:
            raise ValueError(f"expected view attention mode in {VIEW_ATTENTION_MODES}, got {mode!r}")
        self.mode = mode
        self.ref_k: Tensor | None = None  # [B, heads, N, d] cached reference keys
        self.ref_v: Tensor | None = None  # [B, heads, N, d] cached reference values
        self.qkv_weight: Tensor | None = None  # [3 heads*d, D] fused projection (prepare_caches)
        self.qkv_bias: Tensor | None = None  # [3 heads*d] or None

    def clear_reference(self) -> None:
        self.ref_k = None
        self.ref_v = None

    def clear(self) -> None:
        self.clear_reference()
        self.qkv_weight = self.qkv_bias = None

    @torch.no_grad()
    def fuse_qkv(self, attn) -> None:
        """Concatenate to_q/to_k/to_v into one projection (weights must not change afterwards)."""
        self.qkv_weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()
        biases = [attn.to_q.bias, attn.to_k.bias, attn.to_v.bias]
        self.qkv_bias = None if any(b is None for b in biases) else torch.cat(biases).detach()

    def _store_reference(self, k: Tensor, v: Tensor) -> None:
        # Copy in place when possible so captured CUDA graphs keep valid addresses.
        if self.ref_k is not None and self.ref_k.shape == k.shape and self.ref_k.dtype == k.dtype and self.ref_k.device == k.device:
            self.ref_k.copy_(k)
            self.ref_v.copy_(v)
        else:
            self.ref_k = k.detach().clone()
            self.ref_v = v.detach().clone()

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_views: int = 1,
        reference_kv: str | None = None,
        prepared: bool = False,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("expected plain self-attention (no encoder states, no mask), got encoder states or a mask")
        if hidden_states.ndim != 3:
            raise ValueError(f"expected hidden_states [B*V, N, D], got shape {tuple(hidden_states.shape)}")
        bv, n, _ = hidden_states.shape
        if num_views < 1 or bv % num_views:
            raise ValueError(f"expected a batch divisible by num_views={num_views}, got {bv}")
        mode = self.mode
        if reference_kv is not None and mode not in REFERENCE_MODES:
            raise ValueError(f"expected view attention in {REFERENCE_MODES} for reference_kv={reference_kv!r}, got {mode!r}")
        views = num_views if mode != "per_view" else 1
        b = bv // views
        heads = attn.heads

        if prepared and self.qkv_weight is not None:
            query, key, value = F.linear(hidden_states, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)  # [B*V, N, heads*d]
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)
        if mode == "ref_pairs" and reference_kv != "record" and (views > 1 or reference_kv == "use"):
            # Per view: [B*V, N, heads*d] -> [B*V, heads, N, d].
            query, key, value = (_split_heads(t, bv, heads) for t in (query, key, value))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if reference_kv == "use":
                self._check_cached(b, n)
                out = _reference_pairs(query, key, value, b, self.ref_k, self.ref_v)
            else:
                out = _reference_pairs(query, key, value, b)
            return self._project_out(attn, out, hidden_states, bv, n, query.dtype)
        # [B*V, N, heads*d] -> [B, heads, V*N, d]: view-major token order
        query = _split_heads(query, b, heads)
        key = _split_heads(key, b, heads)
        value = _split_heads(value, b, heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if reference_kv == "record":
            if views != 1:
                raise ValueError(f"expected num_views=1 when recording the reference, got {views}")
            self._store_reference(key, value)
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        elif reference_kv == "use":
            self._check_cached(b, n)
            key = torch.cat([self.ref_k, key], dim=2)  # [B, heads, (1+V)*N, d]
            value = torch.cat([self.ref_v, value], dim=2)
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        elif mode == "ref_isolated" and views > 1:
            # Block mask as two dense calls (keeps flash/efficient kernels):
            # the reference (first N tokens) attends to itself, novel views to all.
            out_ref = F.scaled_dot_product_attention(query[:, :, :n], key[:, :, :n], value[:, :, :n], dropout_p=0.0, is_causal=False)
            out_new = F.scaled_dot_product_attention(query[:, :, n:], key, value, dropout_p=0.0, is_causal=False)
            out = torch.cat([out_ref, out_new], dim=2)
        else:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

        return self._project_out(attn, out, hidden_states, bv, n, query.dtype)

    def _check_cached(self, b: int, n: int) -> None:
        if self.ref_k is None:
            raise RuntimeError("no cached reference keys/values: call Refiner.set_reference first")
        if self.ref_k.shape[0] != b or self.ref_k.shape[2] != n:
            raise ValueError(
                f"expected cached reference of batch {b} with {n} tokens, got {tuple(self.ref_k.shape)} (call set_reference again)"
            )

    @staticmethod
    def _project_out(attn, out: Tensor, hidden_states: Tensor, bv: int, n: int, dtype: torch.dtype) -> Tensor:
        """[B, heads, V*N, d] (or [B*V, heads, N, d]) -> [B*V, N, heads*d], then the output projection."""
        out = out.transpose(1, 2).reshape(bv, n, -1).to(dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class PromptCrossAttnProcessor:
    """Per-view cross-attention (``attn2``) to the fixed prompt embedding.

    Plain path: the stock computation. With ``prepared=True`` (set by
    ``Refiner.refine`` after ``prepare``) it uses keys/values computed once by
    ``cache_prompt`` (or, for a 1-token prompt, the cached output itself).
        hidden_states: [B*V, N, D]; encoder_hidden_states: [B*V, L, Dc]
    Returns [B*V, N, D].
    """

    def __init__(self):
        self.key: Tensor | None = None  # [1, heads, L, d]
        self.value: Tensor | None = None  # [1, heads, L, d]
        self.constant: Tensor | None = None  # [1, 1, D]: the whole output when L == 1

    def clear(self) -> None:
        self.key = self.value = self.constant = None

    @torch.no_grad()
    def cache_prompt(self, attn, prompt_embeds: Tensor) -> None:
        """Precompute keys/values (or the constant output) for prompt_embeds [1, L, Dc]."""
        if attn.norm_cross:
            prompt_embeds = attn.norm_encoder_hidden_states(prompt_embeds)
        key = _split_heads(attn.to_k(prompt_embeds), 1, attn.heads)
        value = _split_heads(attn.to_v(prompt_embeds), 1, attn.heads)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        self.key, self.value, self.constant = key, value, None
        if prompt_embeds.shape[1] == 1 and not attn.residual_connection:
            # softmax over a single key is exactly 1: the output is to_out(value) for every query
            out = value.transpose(1, 2).reshape(1, 1, -1)
            self.constant = attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        num_views: int = 1,
        reference_kv: str | None = None,
        prepared: bool = False,
    ) -> Tensor:
        if hidden_states.ndim != 3:
            raise ValueError(f"expected hidden_states [B*V, N, D], got shape {tuple(hidden_states.shape)}")
        batch, n, dim = hidden_states.shape
        if prepared and attention_mask is None:
            if self.key is None:
                raise RuntimeError("no cached prompt keys/values: call Refiner.prepare first")
            if self.constant is not None:
                return self.constant.expand(batch, n, dim)
            query = _split_heads(attn.to_q(hidden_states), batch, attn.heads)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            key = self.key.expand(batch, -1, -1, -1)
            value = self.value.expand(batch, -1, -1, -1)
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        else:
            if encoder_hidden_states is None:
                raise ValueError("expected encoder_hidden_states (the prompt embedding), got None")
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            if attention_mask is not None:
                attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
                attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
            query = _split_heads(attn.to_q(hidden_states), batch, attn.heads)
            key = _split_heads(attn.to_k(encoder_hidden_states), batch, attn.heads)
            value = _split_heads(attn.to_v(encoder_hidden_states), batch, attn.heads)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, n, -1).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _attention_modules(unet) -> dict[str, object]:
    """Name -> diffusers Attention module for every attn1/attn2 in the U-Net."""
    from diffusers.models.attention_processor import Attention

    found = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            if not (name.endswith(".attn1") or name.endswith(".attn2")):
                raise ValueError(f"expected only transformer-block attention (attn1/attn2) in the U-Net, got {name}")
            _check_plain_attention(module, name)
            found[name] = module
    return found


def set_view_attention(unet, mode: str = "joint") -> None:
    """Install multi-view processors on every attention of a diffusers U-Net.

    attn1 -> MultiViewSelfAttnProcessor(mode); attn2 -> PromptCrossAttnProcessor.
    Afterwards call the U-Net with ``cross_attention_kwargs={"num_views": V}``.
    """
    if mode not in VIEW_ATTENTION_MODES:
        raise ValueError(f"expected view attention mode in {VIEW_ATTENTION_MODES}, got {mode!r}")
    modules = _attention_modules(unet)
    if not any(name.endswith(".attn1") for name in modules):
        raise ValueError("expected a U-Net with transformer blocks (CrossAttn* blocks), got none")
    processors = {}
    for name in unet.attn_processors:
        module_name = name[: -len(".processor")]
        if module_name.endswith(".attn1"):
            processors[name] = MultiViewSelfAttnProcessor(mode)
        else:
            processors[name] = PromptCrossAttnProcessor()
    unet.set_attn_processor(processors)


def self_attn_processors(unet) -> list[MultiViewSelfAttnProcessor]:
    return [p for p in unet.attn_processors.values() if isinstance(p, MultiViewSelfAttnProcessor)]


def prepare_caches(unet, prompt_embeds: Tensor, fuse_qkv: bool = True) -> None:
    """Precompute every cross-attention's prompt keys/values (prompt_embeds [1, L, Dc])
    and, with fuse_qkv, every self-attention's fused q/k/v projection. Used by
    U-Net calls with ``prepared=True``; rebuild after any weight change."""
    for name, module in _attention_modules(unet).items():
        processor = module.processor
        if name.endswith(".attn2"):
            if not isinstance(processor, PromptCrossAttnProcessor):
                raise ValueError(f"expected PromptCrossAttnProcessor at {name}, got {type(processor).__name__}")
            processor.cache_prompt(module, prompt_embeds)
        else:
            if not isinstance(processor, MultiViewSelfAttnProcessor):
                raise ValueError(f"expected MultiViewSelfAttnProcessor at {name}, got {type(processor).__name__}")
            processor.qkv_weight = processor.qkv_bias = None
            if fuse_qkv:
                processor.fuse_qkv(module)


def clear_caches(unet) -> None:
    """Drop every cache (prompt and reference keys/values, fused q/k/v)."""
    for processor in unet.attn_processors.values():
        if isinstance(processor, (PromptCrossAttnProcessor, MultiViewSelfAttnProcessor)):
            processor.clear()
