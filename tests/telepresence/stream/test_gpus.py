"""Spreading a call's pipelines over the host's GPUs (telepresence.stream.gpus, CallHost.device_for): counted
without CUDA in the server, each new pipeline on the GPU with the fewest."""
import asyncio
import types

import pytest

from telepresence.pipeline import PipelineConfig
from telepresence.stream.call import CallConfig, CallHost
from telepresence.stream.gpus import gpu_count, least_loaded
from tests.helpers import async_test


def test_the_gpus_are_counted_from_cuda_visible_devices_when_it_is_set():
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "2,3"}, smi="no-such-nvidia-smi") == 2
    assert gpu_count({"CUDA_VISIBLE_DEVICES": "GPU-8d3b,GPU-11aa,GPU-9c"}, smi="no-such-nvidia-smi") == 3
    assert gpu_count({"CUDA_VISIBLE_DEVICES": ""}, smi="no-such-nvidia-smi") == 0  # CUDA sees none


def test_else_from_nvidia_smi_and_zero_when_it_cannot_say(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = --query-gpu=index ] && printf '0\\n1\\n' || exit 9\n")
    smi.chmod(0o755)
    assert gpu_count({}, smi=str(smi)) == 2
    broken = tmp_path / "broken-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert gpu_count({}, smi=str(broken)) == 0
    assert gpu_count({}, smi=str(tmp_path / "absent")) == 0


def test_a_new_pipeline_goes_to_the_gpu_with_the_fewest():
    assert least_loaded(2, []) == 0 and least_loaded(2, [0]) == 1 and least_loaded(2, [0, 1]) == 0
    assert least_loaded(3, [0, 0, 2]) == 1
    with pytest.raises(ValueError):
        least_loaded(0, [])


async def _devices(host: CallHost, names: list[str], leave: tuple[str, ...] = ()) -> list[str]:
    got = []
    for name in names:
        if name in leave:
            del host.participants[name]
            continue
        p = types.SimpleNamespace(gpu=None, __repr__=lambda: name)
        host.participants[name] = p
        got.append(await host.device_for(p))
    return got


@async_test(timeout_s=30)
async def test_the_host_spreads_the_pipelines_and_fills_a_gpu_that_frees_up_first():
    host = CallHost(CallConfig(pipeline=PipelineConfig(device="cuda"), gpus=2, mps=False))
    assert await _devices(host, ["a", "b", "c"]) == ["cuda:0", "cuda:1", "cuda:0"]
    assert await _devices(host, ["b", "d"], leave=("b",)) == ["cuda:1"]  # b left GPU 1 with one pipeline fewer
    # asked at once (several people joining), each still gets its own place
    many = CallHost(CallConfig(pipeline=PipelineConfig(device="cuda"), gpus=2, mps=False))
    people = [types.SimpleNamespace(gpu=None) for _ in range(4)]
    for i, p in enumerate(people):
        many.participants[str(i)] = p
    assert sorted(await asyncio.gather(*(many.device_for(p) for p in people))) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


@async_test(timeout_s=30)
async def test_one_gpu_a_numbered_device_or_the_cpu_keep_the_device_as_given(monkeypatch):
    for device, gpus, expected in (("cuda", 1, "cuda"), ("cuda:1", None, "cuda:1"), ("cpu", None, "cpu")):
        host = CallHost(CallConfig(pipeline=PipelineConfig(device=device), gpus=gpus, mps=False))
        assert await _devices(host, ["a", "b"]) == [expected, expected]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")  # --gpus unset: every GPU the host's processes see
    host = CallHost(CallConfig(pipeline=PipelineConfig(device="cuda"), mps=False))
    assert await _devices(host, ["a", "b", "c", "d"]) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0"]


def test_gpus_must_be_at_least_one():
    with pytest.raises(ValueError, match="gpus"):
        CallConfig(gpus=0)
