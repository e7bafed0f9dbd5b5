"""What one optimizer step of the refiner trainer costs the host: the torch ops it dispatches and the
times it waits for the device (``.item()``-style syncs), counted by the profiler on the CPU.

    python -m benchmarks.trainer_ops --out benchmarks/results/trainer_ops_cpu.json

On a GPU nearly every op that computes is one kernel launch, and every sync drains the queue, so
these counts are the step's fixed host cost: the part that does not shrink with a smaller batch.
Two profiled steps, with 1 and 2 micro-batches (grad_accum), split the count into a per-step part
(optimizer, clipping, EMA, discriminator power iteration) and a per-micro-batch part (forward,
backward, losses). Ops that only make views or empty tensors (no kernel) are counted apart.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import document, write_json  # noqa: E402

NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::as_strided_", "aten::view",
    "aten::_unsafe_view", "aten::_reshape_alias", "aten::reshape", "aten::detach", "aten::alias", "aten::resolve_conj",
    "aten::resolve_neg", "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::slice", "aten::select",
    "aten::unsqueeze", "aten::squeeze", "aten::unflatten", "aten::flatten", "aten::resize_", "aten::lift_fresh",
    "aten::to", "aten::_to_copy", "aten::contiguous", "aten::numpy_T", "aten::split", "aten::chunk", "aten::unbind",
    "aten::set_", "aten::result_type", "aten::is_nonzero", "aten::_local_scalar_dense", "aten::item",
}
"""Leaf ops that launch no kernel (views, allocation, no-op casts); syncs are counted on their own."""
SYNC = "aten::_local_scalar_dense"
"""What .item(), float(t), bool(t) and .tolist() dispatch: a device->host read (a sync on CUDA)."""


def count_step(trainer) -> dict:
    """Profile one train_step: leaf ops that compute, view/alloc ops, syncs, and the most frequent ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    leaves = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children)]
    compute = collections.Counter(e.name for e in leaves if e.name not in NO_KERNEL)
    return {
        "compute_ops": sum(compute.values()),
        "view_alloc_ops": sum(e.name in NO_KERNEL for e in leaves),
        "syncs": sum(e.name == SYNC for e in aten),
        "top": dict(compute.most_common(12)),
    }


def build(args: argparse.Namespace, grad_accum: int):
    import torch

    from models.training.data import TensorPairDataset, synthetic_pairs
    from models.training.families import build_refiner
    from models.training.trainer import TrainConfig, Trainer

    config = TrainConfig(
        model_preset=args.preset, resolution=args.resolution, batch_size=args.batch, grad_accum=grad_accum,
        stage1_steps=10, warmup_steps=0, gan_weight=0.05, gan_start_step=0, num_workers=0, log_every=1,
        image_every=0, ckpt_every=0, progress=False, identity_metric=False, seed=0,
    )
    torch.manual_seed(0)
    data = TensorPairDataset.from_samples(synthetic_pairs(8, args.resolution, views=1, seed=0), augment=True)
    return Trainer(build_refiner(config), config, tempfile.mkdtemp(prefix="trainer_ops_"), data, device="cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="small", choices=("small", "compact", "tiny"))
    parser.add_argument("--resolution", type=int, default=64, help="small: the op count does not depend on it")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch (the op count does not depend on it)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: print only)")
    args = parser.parse_args()

    import torch

    from models.runinfo import run_metadata

    torch.set_num_threads(1)
    counts = {}
    for accum in (1, 2):
        trainer = build(args, accum)
        for _ in range(2):  # warm-up: optimizer state, first GAN steps
            trainer.train_step()
        counts[accum] = count_step(trainer)
    per_micro = {k: counts[2][k] - counts[1][k] for k in ("compute_ops", "view_alloc_ops", "syncs")}
    per_step = {k: counts[1][k] - per_micro[k] for k in per_micro}
    results = {"per_step_fixed": per_step, "per_micro_batch": per_micro, "steps": {str(a): c for a, c in counts.items()}}
    print(f"per step: {per_step}\nper micro-batch: {per_micro}", flush=True)
    if args.out is not None:
        write_json(args.out, document(run_metadata("cpu"), vars(args) | {"out": str(args.out)}, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
