"""Refiner speed: encode + U-Net + decode per call, random weights (timing only).

Cases are the product of --configs x --codecs x --variants x --modes x --size x --views:
- configs: "sdturbo" (SD-Turbo U-Net, 865.9 M) with each of --codecs ("vae": SD VAE,
  "tiny": TAESD-size AutoencoderTiny); "small" (the from-scratch refiner, its own
  pixel-unshuffle codec; --codecs does not apply).
- variants: "stock" = joint attention over all views, 77-token prompt (SD-Turbo) and
  the reference encoded every call; "live" = reference attends only to itself, 1-token
  prompt (cross-attention is a cached constant), a new reference on every call, as in
  the live sender (its reference is the newest camera frame); "live-pairs" = "live" with each
  novel view attending only to the reference and itself (view_attention "ref_pairs"); "fast" = the same model
  with the reference's keys/values cached once (set_reference): a still-image source
  only. All three are the same code with different RefinerConfig fields.
- modes: "eager"; "graphs" (eager step captured as a CUDA graph per view count);
  "compiled" (torch.compile); "compiled-graphs" (the compiled step captured as a CUDA graph per view count,
  as the sender runs it with --compile-refiner).
  Graph modes need CUDA and are skipped elsewhere.
- views: total views V including the reference (2 = ref + 1 novel view).

Each case: warm-up calls (the first one, which compiles/captures, is timed as
first_call_s), then --iters timed calls with device sync; benchmarks.common.timing_stats
in ms; peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS so far).
Results go to stdout and, after every case, to the --out JSON (benchmarks.common layout;
meta: commit, versions, device, host, load average at the start and the end). A case
that fails is recorded with its error.

Run from the repository root (no install needed):
  python -m benchmarks.refiner --device cuda --out out/refiner_h100.json
  python -m benchmarks.refiner --configs small --device cpu --size 256 --views 2 5 --dtype fp32
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

from benchmarks.common import document, sync, timing_stats, write_json
from models.refiner import Refiner
from models.refiner.graphs import COMPILE_OPTIONS
from models.runinfo import run_metadata

logger = logging.getLogger("benchmarks.refiner")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("eager", "graphs", "compiled", "compiled-graphs")
VARIANTS = {
    "stock": {"view_attention": "joint"},
    "live": {"view_attention": "ref_isolated", "prompt_tokens": 1},
    "live-pairs": {"view_attention": "ref_pairs", "prompt_tokens": 1},
    "fast": {"view_attention": "ref_isolated", "prompt_tokens": 1},
}
CACHED_REFERENCE = {"fast"}  # variants whose reference is encoded once, not per call


def build(config: str, codec: str, variant: str, device: torch.device) -> Refiner:
    overrides = dict(VARIANTS[variant])
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: SD-Turbo size is slow to init on a CPU
        if config == "sdturbo":
            return Refiner.sd_turbo_random(codec=codec, **overrides)
        if config == "small":
            overrides.pop("prompt_tokens", None)  # the small config has a 1-token prompt already
            return Refiner.small(**overrides)
    raise ValueError(f"expected config 'sdturbo' or 'small', got {config!r}")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_case(model: Refiner, variant: str, views: int, size: int, args, device, dtype) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    ref = torch.rand(1, 3, size, size, generator=g, device=device).to(dtype)
    novel = torch.rand(1, views - 1, 3, size, size, generator=g, device=device).to(dtype)
    cached = variant in CACHED_REFERENCE
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if cached:
        model.set_reference(ref)  # once per session, not per frame

    def call():
        return model.refine(None if cached else ref, novel)

    sync(device)
    start = time.perf_counter()
    out = call()
    sync(device)
    first_call_s = time.perf_counter() - start
    for _ in range(args.warmup):
        call()
    sync(device)
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        out = call()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if not torch.isfinite(out.float()).all():
        logger.warning("non-finite output (random weights) in this case")
    result = {"ms": timing_stats(times), "first_call_s": first_call_s, "peak_mem_mb": peak_memory_mb(device)}
    if args.profile:
        result["profile"] = profile_calls(call, args.profile, device)
    return result


def _kernel_class(name: str) -> str:
    """What a profiled op or kernel is, by its name: attention, convolution, matrix product, fused (Triton) or other."""
    low = name.lower()
    for cls, keys in (("attention", ("attention", "sdpa", "flash", "fmha")), ("convolution", ("conv", "fprop", "dgrad")),
                      ("matmul", ("mm", "gemm", "matmul", "linear", "nvjet")), ("fused", ("triton",))):
        if any(k in low for k in keys):
            return cls
    return "other"


def profile_calls(call, n: int, device: torch.device, top: int = 25) -> dict:
    """Where a call's device time goes: n calls under torch.profiler, the ops with their input shapes (a compiled
    step's convolutions, matrix products and attention are ATen calls from inductor's code, so their shapes tell the
    codec's from the U-Net's) and the kernels by class. Inside a CUDA graph the profiler sees the replay alone, so
    profile the "compiled" or "eager" mode."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(n):
            call()
        sync(device)
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    self_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if getattr(e, attr, 0) > 0]
    leaf = sorted((e for e in ops if e.key.startswith(("aten::convolution", "aten::mm", "aten::addmm", "aten::bmm",
                                                        "aten::_scaled_dot_product", "triton_"))),
                  key=lambda e: -getattr(e, attr))
    kernels = [e for e in prof.key_averages() if getattr(e, self_attr, 0) > 0 and not e.key.startswith(("aten::", "cuda", "Torch", "Memcpy", "Memset", "## "))]
    classes: dict[str, float] = {}
    for e in kernels:
        classes[_kernel_class(e.key)] = classes.get(_kernel_class(e.key), 0.0) + getattr(e, self_attr) / 1e3 / n
    total = sum(classes.values())
    print(f"  profile ({n} calls): device {total:.2f} ms a call; by class " +
          ", ".join(f"{k} {v:.2f}" for k, v in sorted(classes.items(), key=lambda kv: -kv[1])))
    rows = []
    for e in leaf[:top]:
        rows.append({"op": e.key, "shapes": str(e.input_shapes)[:160], "ms": round(getattr(e, attr) / 1e3 / n, 3),
                     "count": e.count // n})
        print(f"    {rows[-1]['ms']:7.3f} ms x{rows[-1]['count']:<3} {e.key[:50]:50} {rows[-1]['shapes']}")
    return {"calls": n, "device_ms": round(total, 3), "by_class_ms": {k: round(v, 3) for k, v in classes.items()},
            "top_ops": rows}


def pin_attention_kernel(sdpa: str, compiled: bool) -> None:
    """Only scaled-dot-product attention's ``sdpa`` kernel ("cudnn", "flash" or "efficient") from now on. Inductor
    picks the attention kernel when it compiles, and its caches' keys leave these switches out: a warm cache replays
    the kernel of an earlier compile (seen on an H200: "flash" and "efficient" ran in 16.7 ms from the cache, 18.3 and
    23.7 compiled afresh), so with ``compiled`` its caches are turned off and every compile starts afresh."""
    for name in ("cudnn", "flash", "mem_efficient"):
        getattr(torch.backends.cuda, f"enable_{name}_sdp")(sdpa == name.replace("mem_", ""))
    if compiled:
        inductor_config.force_disable_caches = True
        logger.info("--sdpa %s: inductor's caches are off for this run (they do not key on the attention kernel), "
                    "so each compiled case compiles afresh", sdpa)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="sdturbo,small", help="comma list: sdturbo, small")
    p.add_argument("--codecs", default="vae,tiny", help="comma list for sdturbo: vae, tiny")
    p.add_argument("--variants", default="stock,live,fast", help=f"comma list: {', '.join(VARIANTS)}")
    p.add_argument("--modes", default=None, help=f"comma list of {MODES} (default: all on CUDA, eager on CPU)")
    p.add_argument("--views", type=int, nargs="+", default=[2, 3, 5], help="total views including the reference")
    p.add_argument("--size", type=int, nargs="+", default=[512], help="image side(s) in pixels")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls after the first (compiling) call")
    p.add_argument("--iters", type=int, default=30, help="timed calls per case (>= 20 for a p90)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="JSON results path")
    p.add_argument("--sdpa", default="auto", choices=("auto", "cudnn", "flash", "efficient"),
                   help="scaled-dot-product attention kernel on CUDA (auto: torch's choice; else only that one)")
    p.add_argument("--compile-dynamic", action="store_true",
                   help="compiled modes: the view count symbolic after the second one (as send --compile-refiner)")
    p.add_argument("--compile-options", default="default", choices=sorted(COMPILE_OPTIONS),
                   help="compiled modes: inductor's settings (models.refiner.graphs.COMPILE_OPTIONS)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timing, N calls under torch.profiler: device time by op (with shapes) and kernel class "
                        "(in the eager or compiled modes; a CUDA graph's replay hides its kernels)")
    p.add_argument("--cudnn-benchmark-limit", type=int, default=None,
                   help="CUDA: cuDNN algorithms each convolution tries when it is first run (torch's default 10; 0: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = (args.modes or (",".join(MODES) if device.type == "cuda" else "eager")).split(",")
    for name, values, allowed in (("mode", modes, MODES), ("variant", args.variants.split(","), VARIANTS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"expected {name}s from {list(allowed)}, got {bad}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        if args.cudnn_benchmark_limit is not None:
            torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
        if args.sdpa != "auto":
            pin_attention_kernel(args.sdpa, compiled=any(mode.startswith("compiled") for mode in modes))

    meta = run_metadata(device, benchmark="refiner", argv=sys.argv)
    report = document(meta, vars(args), [])
    print(f"{'config':8} {'codec':15} {'variant':10} {'mode':16} {'V':>2} {'size':>5} {'median':>9} {'p90':>9} {'peak MB':>8} {'first s':>8}")
    for config in args.configs.split(","):
        codecs = args.codecs.split(",") if config == "sdturbo" else ["pixel_unshuffle"]
        for codec in codecs:
            for variant in args.variants.split(","):
                for mode in modes:
                    if mode in ("graphs", "compiled-graphs") and device.type != "cuda":
                        logger.info("skipping %s on %s (needs CUDA)", mode, device)
                        continue
                    model = None
                    try:
                        model = build(config, codec, variant, device)
                        params_m = sum(p.numel() for p in model.parameters()) / 1e6
                        model.prepare(
                            device,
                            dtype,
                            compile=mode.startswith("compiled"),
                            cuda_graphs=mode in ("graphs", "compiled-graphs"),
                            compile_dynamic=None if args.compile_dynamic else False,
                            compile_options=args.compile_options,
                        )
                    except Exception as exc:  # record and go on with the other cases
                        logger.error("build/prepare failed for %s/%s/%s/%s: %s", config, codec, variant, mode, exc)
                        report["results"].append(
                            dict(config=config, codec=codec, variant=variant, mode=mode, error=traceback.format_exc(limit=5))
                        )
                        continue
                    for size in args.size:
                        for views in args.views:
                            case = dict(
                                config=config, codec=codec, variant=variant, mode=mode, views=views, size=size,
                                dtype=str(dtype).removeprefix("torch."), params_m=round(params_m, 2),
                            )
                            try:
                                case.update(time_case(model, variant, views, size, args, device, dtype))
                                print(
                                    f"{config:8} {codec:15} {variant:10} {mode:16} {views:>2} {size:>5} "
                                    f"{case['ms']['median']:8.2f}ms {case['ms']['p90']:8.2f}ms {case['peak_mem_mb']:8.0f} {case['first_call_s']:8.1f}",
                                    flush=True,
                                )
                            except Exception:
                                case["error"] = traceback.format_exc(limit=8)
                                logger.error("case failed: %s\n%s", {k: case[k] for k in ("config", "codec", "variant", "mode", "views", "size")}, case["error"])
                            report["results"].append(case)
                            if args.out:
                                write_json(args.out, report)
                    del model
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    torch._dynamo.reset()
    report["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        write_json(args.out, report)
        logger.info("wrote %s", args.out)
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
