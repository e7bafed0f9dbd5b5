"""Data-parallel scaling of the refiner trainer: the same `telepresence train` command on 1 GPU and on
N GPUs (torchrun) with the same effective batch, then a checkpoint of the N-GPU run resumed on 1 GPU.

    python -m benchmarks.ddp --gpus 2 --steps 300 --batch 16 --resolution 256 --out benchmarks/results/ddp_h200x2.json

Reports per run: samples per second (median over the logged steps after --skip warm-up steps), the
share of each step spent waiting for the data loader, the loss curve; across runs: the scaling
ratio, how far the loss curves are apart (mean |difference| against the curve's own step-to-step
noise), and the next-step loss of the N-GPU checkpoint resumed on 1 GPU against the N-GPU run's own.
Pairs are made here (models.training.data.synthetic_pairs), so the job needs no video or MediaPipe.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import document, timing_stats, write_json  # noqa: E402

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""Kept in every process started here (the device machines' rule: NVLink multicast stays off)."""


def make_pairs(path: Path, n: int, size: int) -> None:
    from models.training.data import TensorPairDataset, synthetic_pairs

    TensorPairDataset.from_samples(synthetic_pairs(n, size, views=1, seed=0), augment=True).save(path)


def train(gpus: int, args: argparse.Namespace, out: Path, data: Path, *extra: str) -> float:
    """One `telepresence train` run; returns its wall time in seconds."""
    cmd = ["-m", "telepresence.cli.train", "--family", "small", "--preset", args.preset, "--data", str(data),
           "--resolution", str(args.resolution), "--batch", str(args.batch // gpus), "--steps", str(args.steps),
           "--gan", "0.05", "--gan-start", "20", "--workers", str(args.workers), "--log-every", "1",
           "--ckpt-every", str(args.steps // 2), "--image-every", "0", "--val-every", "0", "--no-identity",
           "--no-progress", "--seed", "0", "--device", args.device, "--out", str(out), *extra]
    if gpus > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *cmd]
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *cmd], check=True, env=env)
    return time.perf_counter() - start


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def summarise(records: list[dict], skip: int) -> dict:
    steady = [r for r in records if r["step"] > skip and "samples_per_s" in r]
    data_share = [r["data_s"] / r["step_s"] for r in steady if r.get("step_s")]
    return {
        "samples_per_s": timing_stats([r["samples_per_s"] for r in steady]),
        "step_ms": timing_stats([1000 * r["step_s"] for r in steady]),
        "data_wait_share": timing_stats(data_share),
        "loss": {r["step"]: r["loss"] for r in records if "loss" in r},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the data-parallel run")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=16, help="effective batch (split over the GPUs)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--preset", default="small", choices=("small", "compact", "tiny"))
    parser.add_argument("--pairs", type=int, default=2048, help="synthetic training pairs")
    parser.add_argument("--workers", type=int, default=4, help="data-loader workers per GPU")
    parser.add_argument("--skip", type=int, default=30, help="warm-up steps left out of the statistics")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (gloo processes: checks the script, measures nothing)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddp_bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp.json"))
    args = parser.parse_args()
    if args.batch % args.gpus:
        parser.error(f"--batch {args.batch} must split evenly over {args.gpus} GPUs")

    import torch

    from models.runinfo import run_metadata

    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        print(f"error: {args.gpus} GPUs asked for, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "pairs.safetensors"
    make_pairs(data, args.pairs, args.resolution)

    runs = {}
    for gpus in (1, args.gpus):
        out = args.work / f"run_{gpus}gpu"
        wall = train(gpus, args, out, data)
        runs[gpus] = {"wall_s": wall, **summarise(read_log(out), args.skip)}
        print(f"{gpus} GPU(s): {runs[gpus]['samples_per_s']['median']:.1f} samples/s, "
              f"data wait {100 * runs[gpus]['data_wait_share']['median']:.1f} % of a step", flush=True)

    # The N-GPU run's mid-run checkpoint, resumed on one GPU for a few steps.
    multi = args.work / f"run_{args.gpus}gpu"
    resumed = args.work / "resumed_1gpu"
    ckpt = sorted((multi / "checkpoints").glob("step_*"))[0]
    first = int(ckpt.name.split("_")[1])
    train(1, args, resumed, data, "--resume", str(ckpt))
    resumed_loss = {r["step"]: r["loss"] for r in read_log(resumed) if "loss" in r}
    multi_loss = runs[args.gpus]["loss"]
    next_step = first + 1

    one, many = runs[1]["loss"], multi_loss
    common = sorted(set(one) & set(many))
    diff = np.array([abs(one[s] - many[s]) for s in common])
    noise = np.array([abs(many[s] - many[s - 1]) for s in common if s - 1 in many])
    results = {
        "runs": {str(g): {k: v for k, v in r.items() if k != "loss"} for g, r in runs.items()},
        "scaling": runs[args.gpus]["samples_per_s"]["median"] / runs[1]["samples_per_s"]["median"],
        "loss_curves": {"mean_abs_diff": float(diff.mean()), "step_to_step_noise": float(noise.mean()),
                        "curves": {str(g): runs[g]["loss"] for g in runs}},
        "resume": {"checkpoint_step": first, "next_step": next_step,
                   "loss_multi_gpu": many.get(next_step), "loss_resumed_1gpu": resumed_loss.get(next_step)},
    }
    a, b = results["resume"]["loss_multi_gpu"], results["resume"]["loss_resumed_1gpu"]
    results["resume"]["abs_diff"] = None if a is None or b is None else abs(a - b)
    doc = document(run_metadata(args.device, gpus=torch.cuda.device_count()), vars(args) | {"work": str(args.work), "out": str(args.out)}, results)
    write_json(args.out, doc)
    print(json.dumps({k: v for k, v in results.items() if k != "loss_curves"} | {"loss_curves": {
        k: v for k, v in results["loss_curves"].items() if k != "curves"}}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
