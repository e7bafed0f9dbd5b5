"""Multi-view attention processors against the stock diffusers ones."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from models.refiner import presets as architectures
from models.refiner.attention import (
    MultiViewSelfAttnProcessor,
    PromptCrossAttnProcessor,
    prepare_caches,
    self_attn_processors,
    set_view_attention,
)


def _attn(dim=32, heads=2, cross_dim=None):
    torch.manual_seed(0)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads, cross_attention_dim=cross_dim).eval()


def _unet():
    torch.manual_seed(0)
    return architectures.build_unet("tiny", in_channels=4, out_channels=4).eval()


def _unet_inputs(batch, tokens=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor(199),
        torch.randn(batch, tokens, 32, generator=g),
    )


@pytest.mark.parametrize("mode", ["joint", "ref_isolated", "ref_pairs", "per_view"])
def test_unet_with_one_view_equals_stock_unet_exactly(mode):
    unet = _unet()
    z, t, prompt = _unet_inputs(3)
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        stock = unet(z, t, prompt).sample
        set_view_attention(unet, mode)
        ours = unet(z, t, prompt, cross_attention_kwargs={"num_views": 1}).sample
    assert torch.equal(stock, ours)


def test_self_attention_one_view_equals_stock_exactly():
    attn = _attn()
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        ours = MultiViewSelfAttnProcessor("joint")(attn, x, num_views=1)
    assert torch.equal(stock, ours)


@pytest.mark.parametrize("views", [1, 2, 3, 4, 5])
def test_joint_attention_is_attention_over_the_concatenated_views(views):
    attn = _attn()
    b, n, d = 2, 6, 32
    x = torch.randn(b * views, n, d)
    with torch.no_grad():
        ours = MultiViewSelfAttnProcessor("joint")(attn, x, num_views=views)
        # plain twin: the stock processor on [B, V*N, D]
        stock = AttnProcessor2_0()(attn, x.reshape(b, views * n, d)).reshape(b * views, n, d)
    assert ours.shape == (b * views, n, d)
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-6)


def test_ref_isolated_equals_masked_attention():
    attn = _attn()
    b, v, n, d, heads = 2, 3, 5, 32, 2
    x = torch.randn(b * v, n, d)
    with torch.no_grad():
        ours = MultiViewSelfAttnProcessor("ref_isolated")(attn, x, num_views=v)
        # plain twin: one attention with a block mask (reference rows see only the reference)
        q, k, vv = (f(x).reshape(b, v * n, heads, d // heads).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        mask = torch.ones(v * n, v * n, dtype=torch.bool)
        mask[:n, n:] = False
        out = F.scaled_dot_product_attention(q, k, vv, attn_mask=mask)
        out = attn.to_out[0](out.transpose(1, 2).reshape(b, v * n, d)).reshape(b * v, n, d)
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b", [1, 2])
def test_ref_pairs_equals_masked_attention(b):
    attn = _attn()
    v, n, d, heads = 4, 5, 32, 2
    x = torch.randn(b * v, n, d)
    with torch.no_grad():
        ours = MultiViewSelfAttnProcessor("ref_pairs")(attn, x, num_views=v)
        # plain twin: one attention with a block mask: the reference sees itself, each view the reference and itself
        q, k, vv = (f(x).reshape(b, v * n, heads, d // heads).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
        view = torch.arange(v * n) // n
        mask = (view[:, None] == view[None, :]) | (view[None, :] == 0)
        mask[:n] = view[None, :] == 0
        out = F.scaled_dot_product_attention(q, k, vv, attn_mask=mask)
        out = attn.to_out[0](out.transpose(1, 2).reshape(b, v * n, d)).reshape(b * v, n, d)
    torch.testing.assert_close(ours, out, rtol=1e-5, atol=1e-6)


def test_ref_pairs_views_do_not_depend_on_each_other():
    """A viewer's view is the same whoever else watches (ref_isolated mixes the views)."""
    attn = _attn()
    ref, a, other1, other2 = torch.randn(4, 1, 5, 32).unbind(0)
    for mode, independent in (("ref_pairs", True), ("ref_isolated", False)):
        with torch.no_grad():
            one = MultiViewSelfAttnProcessor(mode)(attn, torch.cat([ref, a, other1]), num_views=3)
            two = MultiViewSelfAttnProcessor(mode)(attn, torch.cat([ref, a, other2, other1]), num_views=4)
        assert torch.allclose(one[:2], two[:2], rtol=1e-5, atol=1e-6) == independent, mode


def test_per_view_mode_ignores_other_views():
    attn = _attn()
    x = torch.randn(6, 5, 32)
    with torch.no_grad():
        ours = MultiViewSelfAttnProcessor("per_view")(attn, x, num_views=3)
        stock = AttnProcessor2_0()(attn, x)
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("mode", ["ref_isolated", "ref_pairs"])
def test_cached_reference_keys_values_equal_the_plain_pass(mode):
    attn = _attn()
    b, v, n, d = 2, 3, 5, 32
    x = torch.randn(b, v, n, d)
    proc = MultiViewSelfAttnProcessor(mode)
    with torch.no_grad():
        plain = proc(attn, x.flatten(0, 1), num_views=v).unflatten(0, (b, v))
        proc(attn, x[:, 0], num_views=1, reference_kv="record")
        cached = proc(attn, x[:, 1:].flatten(0, 1), num_views=v - 1, reference_kv="use").unflatten(0, (b, v - 1))
    torch.testing.assert_close(cached, plain[:, 1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 4])
def test_cached_prompt_equals_plain_cross_attention(tokens):
    attn = _attn(cross_dim=16)
    x = torch.randn(3, 7, 32)
    prompt = torch.randn(1, tokens, 16)
    proc = PromptCrossAttnProcessor()
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x, encoder_hidden_states=prompt.expand(3, -1, -1))
        plain = proc(attn, x, encoder_hidden_states=prompt.expand(3, -1, -1))
        proc.cache_prompt(attn, prompt)
        assert (proc.constant is not None) == (tokens == 1)
        cached = proc(attn, x, encoder_hidden_states=None, prepared=True)
    assert torch.equal(plain, stock)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)


def test_fused_qkv_equals_separate_projections():
    attn = _attn()
    x = torch.randn(4, 6, 32)
    proc = MultiViewSelfAttnProcessor("joint")
    with torch.no_grad():
        plain = proc(attn, x, num_views=2)
        proc.fuse_qkv(attn)
        fused = proc(attn, x, num_views=2, prepared=True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_installed_processors_and_prepared_unet(fuse_qkv):
    unet = _unet()
    set_view_attention(unet, "joint")
    procs = unet.attn_processors
    assert sum(isinstance(p, MultiViewSelfAttnProcessor) for p in procs.values()) == len(procs) // 2
    assert len(self_attn_processors(unet)) == len(procs) // 2
    z, t, prompt = _unet_inputs(4)
    prompt = prompt[:1]
    with torch.no_grad():
        plain = unet(z, t, prompt.expand(4, -1, -1), cross_attention_kwargs={"num_views": 2}).sample
        prepare_caches(unet, prompt, fuse_qkv=fuse_qkv)
        fast = unet(z, t, prompt.expand(4, -1, -1), cross_attention_kwargs={"num_views": 2, "prepared": True}).sample
    assert all((p.qkv_weight is not None) == fuse_qkv for p in self_attn_processors(unet))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_bad_view_counts_raise():
    attn = _attn()
    with pytest.raises(ValueError, match="expected a batch divisible by num_views=2, got 3"):
        MultiViewSelfAttnProcessor("joint")(attn, torch.randn(3, 4, 32), num_views=2)
    with pytest.raises(ValueError, match="expected view attention mode"):
        MultiViewSelfAttnProcessor("both")
    with pytest.raises(ValueError, match="expected view attention in \\('ref_isolated', 'ref_pairs'\\) for reference_kv='use'"):
        MultiViewSelfAttnProcessor("joint")(attn, torch.randn(2, 4, 32), num_views=1, reference_kv="use")
