"""benchmarks.refiner: the attention-kernel switch holds for compiled cases too."""
import pytest
import torch
import torch._inductor.config as inductor_config

from benchmarks.refiner import pin_attention_kernel

SWITCHES = ("cudnn", "flash", "mem_efficient")


@pytest.fixture
def restored():
    before = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in SWITCHES}
    caches = inductor_config.force_disable_caches
    yield
    for name, on in before.items():
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(on)
    inductor_config.force_disable_caches = caches


@pytest.mark.parametrize("sdpa, on", [("flash", "flash"), ("efficient", "mem_efficient"), ("cudnn", "cudnn")])
def test_only_the_chosen_attention_kernel_stays_on(restored, sdpa, on):
    inductor_config.force_disable_caches = False
    pin_attention_kernel(sdpa, compiled=False)
    assert {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled")() for name in SWITCHES} == \
        {name: name == on for name in SWITCHES}
    assert inductor_config.force_disable_caches is False  # eager cases have no compiled kernel to replay


def test_a_compiled_run_compiles_afresh_instead_of_replaying_a_cached_kernel(restored):
    inductor_config.force_disable_caches = False
    pin_attention_kernel("flash", compiled=True)
    assert inductor_config.force_disable_caches is True
