"""A start with warm caches: how long the avatar's compile takes when it is traced again from inductor's disk cache
(what `send` does at every start) and when it is loaded whole from the store of `--precompiled-avatar`
(models/avatar/precompiled.py).

    python benchmarks/precompiled.py --device cpu --size 128 --views 1      # about 7 minutes on 2 cores
    python benchmarks/precompiled.py --device cuda --size 512 --views 4

Each step runs in a fresh process, on one cache folder (TORCHINDUCTOR_CACHE_DIR: a new temporary one unless
--cache-dir names one). "fill-inductor" and "fill-store" compile cold (minutes) and fill the two caches; "inductor"
and "store" are the later starts. Each reports the compile worker's seconds (BackgroundCompiler.seconds: the time in
which a sender's frames share Python's lock with the compile), the process's seconds from the engine's making to its
compiled graphs in use, and the largest difference of the compiled views from an eager engine's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere as `python benchmarks/precompiled.py`

STEPS = ("fill-inductor", "fill-store", "inductor", "store")


def run_step(args: argparse.Namespace) -> dict:
    """One step in this process: the engine's first frame with compiling asked, the compiles waited for, the compiled
    graphs swapped in by the next frame, then the views against an eager engine's."""
    import torch

    from benchmarks.avatar import load_case
    from models.avatar import AvatarConfig
    from models.avatar.compiling import compile_fixed
    from models.avatar.engine import AvatarEngine
    from models.avatar.precompiled import PrecompiledStore
    from models.geometry.camera import OrbitPose

    torch.set_num_threads(1 if args.device == "cpu" else 2)  # as the senders run torch
    image, obs = load_case()
    poses = [OrbitPose(yaw_deg=-30 + 60 * i / max(1, args.views - 1)) for i in range(args.views)]
    store = PrecompiledStore() if args.step.endswith("store") else None
    t0 = time.perf_counter()
    engine = AvatarEngine(AvatarConfig(), args.device, args.size, fixed_shapes=True, compile=True,
                          compile_fn=store or compile_fixed)
    engine.build(image, obs)
    engine.render(poses)
    if not engine.wait_compiled(3600):
        raise TimeoutError("the compiles took more than an hour")
    engine.build(image, obs)  # captures the compiled graphs in place of the plain ones
    out = engine.render(poses)
    in_use_s = time.perf_counter() - t0
    eager = AvatarEngine(AvatarConfig(), args.device, args.size, cuda_graphs=False)
    eager.build(image, obs)
    reference = eager.render(poses)
    plain = AvatarEngine(AvatarConfig(), args.device, args.size, fixed_shapes=True)  # the graphs before the compile
    plain.build(image, obs)
    diff, plain_diff = ((o.rgb.float() - reference.rgb.float()).abs() for o in (out, plain.render(poses)))
    return {"step": args.step, "compile_state": engine.compile_state, "compile_s": round(engine.compiler.seconds, 2),
            "compiled_in_use_s": round(in_use_s, 2),
            "max_abs_diff_from_eager": float(diff.max()), "mean_abs_diff_from_eager": float(diff.mean()),
            # a few pixels where a triangle's edge or a depth tie falls the other way differ by much; the rest by
            # rounding: the share of values off by more than 2/255, against the uncompiled fixed-shape graphs'
            "share_off_from_eager": float((diff > 2 / 255).float().mean()),
            "plain_graphs": {"max_abs_diff_from_eager": float(plain_diff.max()),
                             "share_off_from_eager": float((plain_diff > 2 / 255).float().mean())},
            "store": None if store is None else {"loaded": store.loaded, "saved": store.saved,
                                                 "fell_back": store.fell_back, "unsaved": store.unsaved}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="default: 512 on cuda, 128 on cpu")
    parser.add_argument("--views", type=int, default=None, help="views rendered (default: 4 on cuda, 1 on cpu)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="inductor's cache folder, the store's beside it (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # one step, in a child process
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.size = args.size or (512 if cuda else 128)
    args.views = args.views or (4 if cuda else 1)
    if args.step:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        print("RESULT " + json.dumps(run_step(args)), flush=True)
        return 0
    from benchmarks.common import child_result, document, write_json
    from models.runinfo import run_metadata

    cache = args.cache_dir or Path(tempfile.mkdtemp(prefix="precompiled-bench-"))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results = []
    for step in args.steps:
        print(f"{step}: ...", end=" ", flush=True)
        result, child = child_result([sys.executable, str(Path(__file__).resolve()), "--step", step, "--device",
                                      args.device, "--size", str(args.size), "--views", str(args.views)],
                                     f"{step} step", env=env, cwd=ROOT, timeout=4000)
        if result is None:
            return 1
        log = child.stderr.splitlines()
        result["log_warnings"] = [ln for ln in log if ln.startswith(("WARNING", "ERROR")) or "Traceback" in ln][-10:]
        result["log_precompiled"] = [ln for ln in log if "models.avatar.precompiled" in ln][:20]
        results.append(result)
        print(f"compile {result['compile_s']} s (the worker), compiled graphs in use {result['compiled_in_use_s']} s "
              f"after the engine was made, {result['compile_state']}, max |compiled - eager| "
              f"{result['max_abs_diff_from_eager']:.1e} ({100 * result['share_off_from_eager']:.3f} % of values off by "
              f"> 2/255; uncompiled graphs {100 * result['plain_graphs']['share_off_from_eager']:.3f} %)"
              + (f", store {result['store']}" if result["store"] else ""))
    config = {"device": args.device, "size": args.size, "views": args.views, "cache_dir": str(cache)}
    if args.out:
        write_json(args.out, document(run_metadata(args.device, benchmark="precompiled"), config, results))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
