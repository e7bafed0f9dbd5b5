"""Where the weights this project ships (and trains) live, and how a CLI spec
("default" | "none" | a folder) becomes a ready refiner.

One setting: the environment variable TELEPRESENCE_WEIGHTS overrides the
weights folder (default: models/refiner/weights, beside this file, inside the installed package).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_REFINER = "refiner-small"

SD_TURBO_LORA = "sd-turbo-lora:"
"""--refiner sd-turbo-lora:PATH: our LoRA adapter at PATH on SD-Turbo, the base read through the model hub's cache
(HF_HUB_CACHE sets that folder; HF_HUB_OFFLINE=1 uses it alone). TELEPRESENCE_SD_TURBO names another base (a local
copy of stabilityai/sd-turbo, or another hub id)."""


def sd_turbo_base() -> str:
    return os.environ.get("TELEPRESENCE_SD_TURBO") or "stabilityai/sd-turbo"


def weights_dir() -> Path:
    env = os.environ.get("TELEPRESENCE_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parent / "weights"


def default_refiner_path() -> Path:
    return weights_dir() / DEFAULT_REFINER


def load_refiner(
    spec: str | None, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, cuda_graphs: bool = False,
    compile: bool = False,
):
    """spec: None/"none" -> None; "default" -> the shipped small refiner; "sd-turbo-lora:PATH" -> our LoRA adapter
    at PATH on SD-Turbo (:func:`sd_turbo_base`); else a folder or hub id.

    Returns a prepared ``models.refiner.Refiner`` (inference mode) or None. cuda_graphs:
    capture one CUDA graph per view count (CUDA only; the eager step is launch-bound). compile:
    torch.compile the step as well (fused kernels; the view count symbolic after the second one seen,
    so two compiles serve viewers coming and going: minutes for the SD-Turbo-size U-Net, logged).
    """
    if spec is None or str(spec).lower() == "none":
        return None
    device = torch.device(device)
    if str(spec) == "default":
        path = default_refiner_path()
        if not (path / "refiner.json").exists():
            log.warning("no shipped refiner weights at %s: showing raw avatar renders", path)
            return None
        spec = str(path)
    t0 = time.perf_counter()
    log.info("refiner: loading %s on %s (diffusers' import and the model: seconds)", spec, device)
    from models.refiner.model import Refiner

    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if str(spec).startswith(SD_TURBO_LORA):
        adapter, base = str(spec)[len(SD_TURBO_LORA):], sd_turbo_base()
        log.info("refiner: the LoRA adapter %s on %s", adapter, base)
        refiner = Refiner.from_pretrained(adapter, device=device, dtype=dtype, base_model=base)
    else:
        refiner = Refiner.from_pretrained(spec, device=device, dtype=dtype)
    cuda_graphs = cuda_graphs and device.type == "cuda"
    if compile:
        log.info("the refiner is compiled on its first two view counts (torch.compile; minutes for a large U-Net, "
                 "once per start)")
    refiner.prepare(device, dtype, cuda_graphs=cuda_graphs, compile=compile, compile_dynamic=None if compile else False)
    log.info("refiner: loaded in %.1f s", time.perf_counter() - t0)
    return refiner
