"""Refiner: tensor contract, multi-view mixing, noise, fast paths against their plain twins."""

import copy

import pytest
import torch

from models.refiner.attention import self_attn_processors
from models.refiner import Refiner, RefinerConfig, refine_views

H = W = 32


def _inputs(b=1, v=2, seed=0, seen=False):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(b, 3, H, W, generator=g)
    views = torch.rand(b, v, 3, H, W, generator=g)
    mask = torch.rand(b, v, 1, H, W, generator=g) if seen else None
    return ref, views, mask


def _model(codec="pixel_unshuffle", **overrides):
    torch.manual_seed(0)
    return Refiner.tiny(codec=codec, **overrides).eval()


@pytest.mark.parametrize("views", [1, 2, 3, 4, 5])
def test_shapes_and_range_for_one_to_five_novel_views(views):
    model = _model()
    ref, novel, _ = _inputs(b=2, v=views)
    with torch.no_grad():
        out = model(ref, novel)
    assert out.shape == (2, views, 3, H, W)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("codec", ["vae", "tiny"])
def test_shapes_with_autoencoder_codecs(codec):
    model = _model(codec)
    ref, novel, _ = _inputs(b=1, v=3)
    with torch.no_grad():
        assert model(ref, novel).shape == (1, 3, 3, H, W)


def test_joint_attention_mixes_views():
    model = _model()
    ref, novel, _ = _inputs(v=2)
    with torch.no_grad():
        out = model(ref, novel)
        out_new_ref = model(torch.rand_like(ref), novel)
        novel2 = novel.clone()
        novel2[:, 1] = torch.rand_like(novel2[:, 1])
        out_new_view2 = model(ref, novel2)
    assert not torch.allclose(out_new_ref[:, 0], out[:, 0], atol=1e-4)  # the reference changes novel view 1
    assert not torch.allclose(out_new_view2[:, 0], out[:, 0], atol=1e-4)  # view 2 changes view 1


def test_per_view_attention_does_not_mix_views():
    """Control for the test above: without joint attention the other views have no effect."""
    model = _model(view_attention="per_view")
    ref, novel, _ = _inputs(v=2)
    with torch.no_grad():
        out = model(ref, novel)
        out_new_ref = model(torch.rand_like(ref), novel)
        novel2 = novel.clone()
        novel2[:, 1] = torch.rand_like(novel2[:, 1])
        out_new_view2 = model(ref, novel2)
    torch.testing.assert_close(out_new_ref, out)
    torch.testing.assert_close(out_new_view2[:, 0], out[:, 0])


def test_batch_samples_do_not_mix():
    model = _model()
    ref, novel, _ = _inputs(b=2, v=2)
    with torch.no_grad():
        out = model(ref, novel)
        ref2 = ref.clone()
        ref2[1] = torch.rand_like(ref2[1])
        out2 = model(ref2, novel)
    torch.testing.assert_close(out2[0], out[0])
    assert not torch.allclose(out2[1], out[1], atol=1e-4)


def test_noise_level_zero_is_deterministic_and_noise_uses_generator():
    model = _model()
    ref, novel, _ = _inputs(v=2)
    with torch.no_grad():
        a = model(ref, novel, noise_level=0.0, generator=torch.Generator().manual_seed(1))
        b = model(ref, novel, noise_level=0.0, generator=torch.Generator().manual_seed(2))
        c = model(ref, novel, noise_level=0.7, generator=torch.Generator().manual_seed(1))
        d = model(ref, novel, noise_level=0.7, generator=torch.Generator().manual_seed(1))
        e = model(ref, novel, noise_level=0.7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert torch.equal(c, d)
    assert not torch.allclose(a, c, atol=1e-4) and not torch.allclose(c, e, atol=1e-4)


def test_per_sample_noise_levels():
    model = _model()
    ref, novel, _ = _inputs(b=2, v=1)
    with torch.no_grad():
        clean = model(ref, novel, noise_level=0.0)
        mixed = model(ref, novel, noise_level=torch.tensor([0.0, 1.0]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mixed[0], clean[0])  # level 0: no noise for that sample
    assert not torch.allclose(mixed[1], clean[1], atol=1e-4)


def test_noise_schedule_ends():
    model = _model()
    assert model.schedule.noise_table[0] == 1.0  # s = 0: clean
    ab_t = model.schedule.noise_table[-1].item()  # s = 1: timestep T of the schedule
    assert ab_t == pytest.approx(model.schedule.sqrt_a_t**2, rel=1e-6)


def test_seen_mask_channel_changes_output():
    model = _model(seen_mask=True)
    assert model.unet.config.in_channels == model.codec.latent_channels + 1
    ref, novel, seen = _inputs(v=2, seen=True)
    with torch.no_grad():
        a = model(ref, novel, seen)
        b = model(ref, novel, torch.zeros_like(seen))
        c = model(ref, novel, None)  # None: everything seen
        d = model(ref, novel, torch.ones_like(seen))
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(c, d)


def test_forward_is_differentiable_and_trainable_parameters():
    model = _model(learned_prompt=True).train()
    ref, novel, _ = _inputs(b=2, v=2)
    out = model(ref, novel, noise_level=torch.tensor([0.2, 0.9]))
    # a loss on unclamped pixels; clamp has gradient 1 inside (0, 1)
    (out - 0.5).square().mean().backward()
    params = model.trainable_parameters()
    assert len(params) == len(list(model.parameters()))
    assert model.prompt_embeds.grad is not None and model.prompt_embeds.grad.abs().sum() > 0
    assert model.unet.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, r, v: m(r, v[:, :, :, :30]), r"expected H and W multiples of 4 \(the codec factor\), got 30x32"),
        (lambda m, r, v: m(r, v[0]), r"expected views \[B, V, 3, H, W\], got \(2, 3, 32, 32\)"),
        (lambda m, r, v: m(r[:, :, :16], v), r"expected ref \[B, 3, H, W\] = \(1, 3, 32, 32\), got \(1, 3, 16, 32\)"),
        (lambda m, r, v: m(r, v, torch.rand(1, 2, 1, 32, 32)), r"expected seen=None \(config.seen_mask is off\)"),
        (lambda m, r, v: m(r, v, noise_level=1.5), r"expected noise_level in \[0, 1\], got 1.5"),
        (lambda m, r, v: m(r, v, noise_level=torch.rand(3)), r"expected noise_level \[B\] = \(1,\), got \(3,\)"),
        (lambda m, r, v: m(r, v[:, :0]), r"expected at least one novel view, got V=0"),
        (lambda m, r, v: m(None, v), r"expected ref \[B, 3, H, W\], got None"),
    ],
)
def test_input_errors(call, match):
    model = _model()
    ref, novel, _ = _inputs(v=2)
    with pytest.raises(ValueError, match=match):
        call(model, ref, novel)


def test_config_validation_errors():
    with pytest.raises(ValueError, match="expected codec in"):
        RefinerConfig(codec="jpeg")
    with pytest.raises(ValueError, match="expected view_attention in"):
        RefinerConfig(view_attention="all")
    with pytest.raises(ValueError, match=r"expected 0 <= timestep < 1000, got 1000"):
        RefinerConfig(timestep=1000)


@pytest.mark.parametrize("tokens", [1, 4])
@pytest.mark.parametrize("codec", ["pixel_unshuffle", "vae"])
def test_refine_fast_path_equals_forward(codec, tokens):
    """prepare(): channels_last, cached prompt keys/values (constant for 1 token), vs the plain forward."""
    model = _model(codec, prompt_tokens=tokens)
    ref, novel, _ = _inputs(b=2, v=3)
    with torch.no_grad():
        plain = model(ref, novel, noise_level=0.5, generator=torch.Generator().manual_seed(3))
    model.prepare("cpu", torch.float32)
    fast = model.refine(ref, novel, noise_level=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_vae_skip_convs_in_the_refiner():
    model = _model("vae")
    ref, novel, _ = _inputs(v=2)
    with torch.no_grad():
        plain = model(ref, novel)
        model.add_lora(rank=2, skip_convs=True)
        with_skips = model(ref, novel)
        for conv in model.codec.skip_convs:
            conv.weight.normal_()
        changed = model(ref, novel)
    torch.testing.assert_close(with_skips, plain, atol=1e-3, rtol=0)  # skip weights start at 1e-5
    assert not torch.allclose(changed, plain, atol=1e-3)


@pytest.mark.parametrize("seen,view_attention", [(False, "ref_isolated"), (True, "ref_isolated"), (True, "ref_pairs")])
def test_cached_reference_equals_plain_pass(seen, view_attention):
    model = _model(view_attention=view_attention, seen_mask=seen)
    ref, novel, mask = _inputs(b=2, v=3, seen=seen)
    with torch.no_grad():
        plain = model(ref, novel, mask)
    model.prepare("cpu", torch.float32)
    model.set_reference(ref)
    cached = model.refine(None, novel, mask)
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="matching the cached reference"):
        model.refine(None, novel[:1], None if mask is None else mask[:1])


def test_cached_reference_needs_ref_isolated():
    model = _model()
    with pytest.raises(ValueError, match="expected view_attention in \\('ref_isolated', 'ref_pairs'\\) to cache"):
        model.set_reference(torch.rand(1, 3, H, W))
    with pytest.raises(ValueError, match="no cached reference"):
        model.refine(None, torch.rand(1, 1, 3, H, W))


def test_bf16_agrees_with_fp32():
    model = _model()
    ref, novel, _ = _inputs(b=1, v=3)
    with torch.no_grad():
        fp32 = model(ref, novel)
    low = copy.deepcopy(model).prepare("cpu", torch.bfloat16)
    bf16 = low.refine(ref, novel)
    assert bf16.dtype == torch.bfloat16
    diff = (bf16.float() - fp32).abs()
    assert diff.mean() < 0.005 and diff.max() < 0.05, (diff.mean(), diff.max())


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="expected a CUDA device for cuda_graphs, got cpu"):
        _model().prepare("cpu", cuda_graphs=True)


def test_small_config_size():
    model = Refiner.small()
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert 15 < n < 20
    assert model.factor == 8 and model.config.view_attention == "ref_isolated"


def test_prepare_merges_lora_and_matches_the_unmerged_forward():
    model = _model("vae")
    model.add_lora(rank=4, decoder_rank=2, skip_convs=True)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref, novel, _ = _inputs(v=2)
    with torch.no_grad():
        plain = model.eval()(ref, novel)
    model.prepare("cpu", torch.float32)  # merges adapters, then fuses q/k/v from the merged weights
    assert all(p.qkv_weight is not None for p in self_attn_processors(model.unet))
    torch.testing.assert_close(model.refine(ref, novel), plain, rtol=1e-4, atol=1e-4)


def test_new_residual_refiner_starts_as_the_identity():
    """prediction_type "residual": x0 = z_t - U(...), with U's output layer zeroed at
    construction, so an untrained model returns the renders unchanged (no noise)."""
    torch.manual_seed(0)
    model = Refiner.tiny(prediction_type="residual").eval()
    ref = torch.rand(1, 3, 32, 32)
    views = torch.rand(1, 2, 3, 32, 32)
    with torch.no_grad():
        out = model(ref, views, noise_level=0.0)
    assert torch.allclose(out, views, atol=1e-5)
    assert Refiner.small().config.prediction_type == "residual"


def test_edit_unseen_only_keeps_seen_texture():
    """With the gate on, fully seen views pass through unchanged whatever the weights."""
    torch.manual_seed(0)
    model = Refiner.tiny(prediction_type="residual", seen_mask=True, edit_unseen_only=True).eval()
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)  # a model that does edit
    ref, views = torch.rand(1, 3, 32, 32), torch.rand(1, 2, 3, 32, 32)
    seen = torch.ones(1, 2, 1, 32, 32)
    seen[:, 1, :, :16] = 0.0  # view 2: top half unseen
    with torch.no_grad():
        out = model(ref, views, seen, noise_level=0.0)
    assert torch.allclose(out[:, 0], views[:, 0], atol=1e-5)
    assert torch.allclose(out[:, 1, :, 16:], views[:, 1, :, 16:], atol=1e-5)
    assert not torch.allclose(out[:, 1, :, :16], views[:, 1, :, :16], atol=1e-3)
    with pytest.raises(ValueError, match="edit_unseen_only"):
        Refiner.tiny(edit_unseen_only=True)


def test_refine_views_batches_expands_the_reference_and_casts():
    """refine_views in chunks, with one [3, H, W] reference, equals one refine call on the expanded batch."""
    model = _model(seen_mask=True).prepare("cpu", torch.float32)
    ref, novel, mask = _inputs(b=5, v=2, seen=True)
    one = ref[0]
    whole = model.refine(one[None].expand(5, -1, -1, -1), novel, mask, noise_level=0.3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    chunked = torch.cat([
        model.refine(one[None].expand(n, -1, -1, -1), novel[i : i + n], mask[i : i + n], noise_level=0.3, generator=g)
        for i, n in ((0, 2), (2, 2), (4, 1))
    ])
    got = refine_views(model, one, novel, mask, noise_level=0.3, batch=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, chunked)  # same calls, same noise draws
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-4)
    assert torch.equal(refine_views(model, ref, novel, mask), model.refine(ref, novel, mask))
    low = copy.deepcopy(model).prepare("cpu", torch.bfloat16)
    assert refine_views(low, ref, novel, mask).dtype == torch.bfloat16  # float32 inputs cast to the refiner's dtype


def test_refine_views_drops_the_seen_mask_of_a_refiner_without_one():
    model = _model()
    ref, novel, mask = _inputs(b=2, v=2, seen=True)
    with torch.no_grad():
        assert torch.equal(refine_views(model, ref, novel, mask), model.refine(ref, novel))
    with pytest.raises(ValueError, match=r"expected reference \[B, 3, H, W\] or \[3, H, W\]"):
        refine_views(model, ref[None], novel)

