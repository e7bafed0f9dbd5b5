"""Data-parallel scaling of the refiner trainer: the same `telepresence train` command on 1 GPU and on
N GPUs (torchrun) at the same effective batch and the same per-GPU micro-batch (weak scaling), then a
checkpoint of the N-GPU run resumed on 1 GPU.

    python -m benchmarks.ddp --gpus 2 --resolution 512 --micro-batch 64 --steps 50 --skip 5 \\
        --time-limit 330 --out benchmarks/results/ddp_h200x2_512.json

Micro-batch M per GPU, effective batch N M: the 1-GPU run takes N micro-batches per optimizer step
(grad_accum N), each of the N GPUs one. Every GPU does the same work per micro-batch, so a perfect
data-parallel run takes a step in 1/N of the time: scaling = samples/s(N) / samples/s(1), ideal N.
Both runs see the same samples at every step (models.training.distributed.StepSampler).

Reports per run: samples per second (median over the logged steps after --skip warm-up steps, and
over all of them together), step time, the share of each step spent waiting for the data loader;
across runs: the scaling ratio, how far the loss curves are apart (mean |difference| against the
curve's own step-to-step noise), and the next-step loss of the N-GPU checkpoint resumed on 1 GPU
against the N-GPU run's own. Pairs are made here (models.training.data.synthetic_pairs), so the job
needs no video or MediaPipe.

--time-limit bounds the whole job: each run gets a share as its --time-budget (it stops early,
checkpoints and exports) and is killed past it; the JSON is rewritten after every phase, so whatever
ran is on disk. Every process started keeps NVLink multicast off (MULTICAST_OFF, the device
machines' rule). `--device cpu` runs the same with gloo processes: it checks the script, it
measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import document, timing_stats, write_json  # noqa: E402

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Kept in every process started here (the device machines' rule: NVLink multicast stays off)."""
KILL_GRACE_S = 20.0
"""After --time-limit's share: SIGTERM to the run's process group, SIGKILL this long after."""


def make_pairs(path: Path, n: int, size: int) -> None:
    from models.training.data import TensorPairDataset, synthetic_pairs

    TensorPairDataset.from_samples(synthetic_pairs(n, size, views=1, seed=0), augment=True).save(path)


def train_command(gpus: int, args: argparse.Namespace, out: Path, data: Path, *extra: str) -> list[str]:
    """The `telepresence train` command of one run: micro-batch M per GPU, grad_accum args.gpus / gpus."""
    cmd = ["-m", "telepresence.cli.train", "--family", "small", "--preset", args.preset, "--data", str(data),
           "--resolution", str(args.resolution), "--batch", str(args.micro_batch), "--grad-accum", str(args.gpus // gpus),
           "--steps", str(args.steps), "--lr", str(args.lr), "--warmup", str(args.warmup), "--gan", "0.05",
           "--gan-start", str(args.gan_start), "--workers", str(args.workers), "--log-every", "1",
           "--ckpt-every", str(checkpoint_step(args)), "--image-every", "0", "--val-every", "0", "--no-identity",
           "--no-progress", "--seed", "0", "--device", args.device, "--out", str(out), *shlex.split(args.extra), *extra]
    if gpus > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *cmd]
    return [sys.executable, *cmd]


def checkpoint_step(args: argparse.Namespace) -> int:
    """The N-GPU run's checkpoint that the resume check starts from: half-way through the measured steps."""
    return args.skip + max(1, (args.steps - args.skip) // 2)


def run(cmd: list[str], timeout_s: float) -> dict:
    """Run one command in its own process group (torchrun and its ranks; the same session, so the
    machine's clean-up still reaches it); past timeout_s, or when this script is stopped, SIGTERM the
    group, then SIGKILL it. Returns its wall time, exit status and whether it was stopped."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    print(f"$ {shlex.join(cmd)}   (limit {timeout_s:.0f} s)", flush=True)
    start = time.perf_counter()
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, **group)
    stopped = False
    try:
        proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        stopped = True
    finally:
        if proc.poll() is None:
            _stop(proc)
    return {"wall_s": time.perf_counter() - start, "returncode": proc.returncode, "stopped_at_limit": stopped}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of ``proc`` (torchrun passes it on to its ranks), SIGKILL after a grace."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(records: list[dict], skip: int, effective_batch: int) -> dict:
    """Throughput, step time and data-wait share over the steps after ``skip``; the loss curve."""
    steady = [r for r in records if r["step"] > skip and "samples_per_s" in r]
    step_s = [r["step_s"] for r in steady]
    return {
        "steps_logged": max((r["step"] for r in records if "loss" in r), default=0),
        "samples_per_s": timing_stats([r["samples_per_s"] for r in steady]),
        "samples_per_s_overall": effective_batch * len(step_s) / sum(step_s) if step_s else None,
        "step_ms": timing_stats([1000 * s for s in step_s]),
        "data_wait_share": timing_stats([r["data_s"] / r["step_s"] for r in steady if r.get("step_s")]),
        "loss": {r["step"]: r["loss"] for r in records if "loss" in r},
    }


def compare(runs: dict[int, dict], gpus: int) -> dict:
    """Scaling ratio and loss-curve agreement of the 1-GPU and N-GPU runs."""
    out: dict = {"scaling": None, "scaling_overall": None, "loss_curves": None}
    if 1 not in runs or gpus not in runs:
        return out
    one, many = runs[1], runs[gpus]
    if one["samples_per_s"]["median"] and many["samples_per_s"]["median"]:
        out["scaling"] = many["samples_per_s"]["median"] / one["samples_per_s"]["median"]
    if one["samples_per_s_overall"] and many["samples_per_s_overall"]:
        out["scaling_overall"] = many["samples_per_s_overall"] / one["samples_per_s_overall"]
    common = sorted(set(one["loss"]) & set(many["loss"]))
    noise = [abs(many["loss"][s] - many["loss"][s - 1]) for s in common if s - 1 in many["loss"]]
    if common and noise:
        out["loss_curves"] = {
            "steps_compared": len(common),
            "mean_abs_diff": float(np.mean([abs(one["loss"][s] - many["loss"][s]) for s in common])),
            "step_to_step_noise": float(np.mean(noise)),
            "curves": {str(g): runs[g]["loss"] for g in (1, gpus)},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel run")
    parser.add_argument("--micro-batch", type=int, default=64, help="samples per GPU per micro-batch (effective batch: x --gpus)")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the statistics")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--preset", default="small", choices=("small", "compact", "tiny"))
    parser.add_argument("--pairs", type=int, default=256, help="synthetic training pairs")
    parser.add_argument("--workers", type=int, default=10, help="data-loader workers per GPU")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=5, help="learning-rate warm-up steps (the curves should move)")
    parser.add_argument("--gan-start", type=int, default=2, help="the discriminator trains from this step on")
    parser.add_argument("--extra", default="", help="more `telepresence train` arguments for every run (one string)")
    parser.add_argument("--time-limit", type=float, default=330.0, help="seconds for the whole job, startups included")
    parser.add_argument("--startup", type=float, default=40.0, help="expected seconds from a run's start to its first step")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (gloo processes: checks the script, measures nothing)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddp_bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp.json"))
    args = parser.parse_args(argv)
    if args.gpus < 2 or args.skip >= args.steps - 1:
        parser.error(f"expected --gpus >= 2 and --skip below --steps - 1, got {args.gpus} and {args.skip}, {args.steps}")
    deadline = time.monotonic() + args.time_limit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer `timeout`: stop the run in flight too
    os.environ.update(MULTICAST_OFF)  # this process too, and whatever it starts

    import torch

    from models.runinfo import run_metadata

    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        print(f"error: {args.gpus} GPUs asked for, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    meta = run_metadata(args.device, benchmark="ddp", argv=sys.argv, gpus=torch.cuda.device_count(),
                        env={k: os.environ.get(k) for k in MULTICAST_OFF})
    config = vars(args) | {"work": str(args.work), "out": str(args.out), "effective_batch": args.micro_batch * args.gpus,
                           "checkpoint_step": checkpoint_step(args)}
    results: dict = {"complete": False, "phases": {}, "runs": {}}
    runs: dict[int, dict] = {}

    def save() -> None:
        results.update(compare(runs, args.gpus))
        results["runs"] = {str(g): {k: v for k, v in r.items() if k != "loss"} for g, r in runs.items()}
        write_json(args.out, document(meta, config, results))

    def left() -> float:
        return deadline - time.monotonic()

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "pairs.safetensors"
    start = time.perf_counter()
    make_pairs(data, args.pairs, args.resolution)
    results["phases"]["pairs_s"] = time.perf_counter() - start
    save()

    # Fit-time budgets: the 1-GPU run's steps take about N times the N-GPU run's; the resume check takes a few.
    resume_s = args.startup + 15.0
    for gpus in (1, args.gpus):
        later = (args.startup + resume_s) if gpus == 1 else resume_s  # what the phases after this one need
        share = (args.gpus / (args.gpus + 1)) if gpus == 1 else 1.0
        budget = max(10.0, (left() - later - args.startup - 10.0) * share)
        out = args.work / f"run_{gpus}gpu"
        shutil.rmtree(out, ignore_errors=True)  # log.jsonl is appended to: no earlier job's steps
        status = run(train_command(gpus, args, out, data, "--time-budget", f"{budget:.0f}"),
                     min(budget + args.startup + 45.0, left() - later))
        runs[gpus] = {**status, "fit_budget_s": budget, **summarise(read_log(out), args.skip, args.micro_batch * args.gpus)}
        r = runs[gpus]
        print(f"{gpus} GPU(s): exit {r['returncode']}, {r['steps_logged']} steps, {r['samples_per_s']['median'] or 0:.1f} samples/s, "
              f"data wait {100 * (r['data_wait_share']['median'] or 0):.1f} % of a step", flush=True)
        save()

    # The N-GPU run's mid-run checkpoint, resumed on one GPU for one step.
    first = checkpoint_step(args)
    ckpt = args.work / f"run_{args.gpus}gpu" / "checkpoints" / f"step_{first:07d}"
    multi_loss = runs[args.gpus]["loss"]
    resume = {"checkpoint_step": first, "next_step": first + 1, "loss_multi_gpu": multi_loss.get(first + 1),
              "loss_resumed_1gpu": None, "abs_diff": None}
    if (ckpt / "trainer.pt").is_file() and left() > 10.0:
        resumed = args.work / "resumed_1gpu"
        shutil.rmtree(resumed, ignore_errors=True)
        status = run(train_command(1, args, resumed, data, "--resume", str(ckpt), "--steps", str(first + 1)), left() - 5.0)
        resume |= {"run": status, "loss_resumed_1gpu": {r["step"]: r["loss"] for r in read_log(resumed) if "loss" in r}.get(first + 1)}
        a, b = resume["loss_multi_gpu"], resume["loss_resumed_1gpu"]
        resume["abs_diff"] = None if a is None or b is None else abs(a - b)
    else:
        resume["skipped"] = "no checkpoint" if left() > 10.0 else "out of time"
    results["resume"] = resume
    results["complete"] = all(not r["stopped_at_limit"] and r["steps_logged"] == args.steps for r in runs.values()) \
        and resume["abs_diff"] is not None
    results["phases"]["total_s"] = time.perf_counter() - start
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "loss_curves"} | {"loss_curves": {
        k: v for k, v in (results["loss_curves"] or {}).items() if k != "curves"}}, indent=1, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
