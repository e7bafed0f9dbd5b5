"""torch.compile of the whole refinement step (CPU inductor; minutes on 2 cores, hence slow)."""

import pytest
import torch

from models.refiner import Refiner

pytestmark = pytest.mark.slow


def test_compiled_step_equals_eager_without_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = Refiner.tiny(view_attention="ref_isolated", prompt_tokens=1).eval()
    g = torch.Generator().manual_seed(0)
    ref, views = torch.rand(1, 3, 32, 32, generator=g), torch.rand(1, 2, 3, 32, 32, generator=g)
    with torch.no_grad():
        plain = model(ref, views)
    model.prepare("cpu", torch.float32, compile=True)
    model.set_reference(ref)
    compiled = model.refine(None, views)  # cached reference + 1-token constant cross-attention, compiled
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_compile_options_are_named_and_exclude_a_mode():
    model = Refiner.tiny()
    with pytest.raises(ValueError, match="compile_options"):
        model.prepare("cpu", torch.float32, compile=True, compile_options="fastest")
    with pytest.raises(ValueError, match="compile_mode or compile_options"):
        model.prepare("cpu", torch.float32, compile=True, compile_mode="max-autotune", compile_options="light")

