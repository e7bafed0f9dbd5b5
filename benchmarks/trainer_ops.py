"""What one optimizer step of the refiner trainer costs the host: the torch ops it dispatches and the
times it reads a tensor's value (``.item()``, ``float(t)``, ``.tolist()``), counted on the CPU.

    python -m benchmarks.trainer_ops --out benchmarks/results/trainer_ops_cpu.json

On a GPU nearly every op that computes is one kernel launch, and a read of a device tensor waits for
everything queued before it, so these counts are the step's fixed host cost: the part that does not
shrink with a smaller batch. Steps with 1 and 2 micro-batches (grad_accum) are counted: the
difference is what a micro-batch adds (forward, backward, losses, the gradient accumulation itself);
the rest is per step (optimizer, clipping, EMA, discriminator power iteration). Ops that only make
views or empty tensors (no kernel) are left out; a multi-tensor op (_foreach_, _fused_) counts once.
Reads are listed by call site: on the CPU every tensor is a host tensor, so which of them would wait
for a GPU is for the reader to judge (torch.optim's are the step counters, CPU tensors unless the
optimizer is fused; the sampler's and data's are the loader's tensors).
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
"""Leaf ops that launch no kernel (views, allocation, no-op casts, scalar reads)."""
MULTI_TENSOR = ("aten::_foreach_", "aten::_fused_")
"""Multi-tensor ops count once: on CUDA each is one (chunked) kernel; the CPU runs them as a loop of per-tensor ops."""


def _kernel_ops(prof) -> collections.Counter:
    """Ops of a profile that would launch kernels: aten leaves, a multi-tensor op standing for all below it."""
    counts: collections.Counter = collections.Counter()

    def walk(event, inside_multi: bool) -> None:
        children = [c for c in event.cpu_children if c.name.startswith("aten::")]
        multi = event.name.startswith(MULTI_TENSOR)
        if event.name.startswith("aten::") and not inside_multi and (multi or not children) and event.name not in NO_KERNEL:
            counts[event.name] += 1
        for child in event.cpu_children:
            walk(child, inside_multi or multi)

    for event in prof.events():
        if event.cpu_parent is None:
            walk(event, False)
    return counts


class _HostReads:
    """Counts reads of tensor values by the host (.item(), float(t), bool(t), .tolist()) by call site:
    on CUDA a read of a device tensor waits for everything queued before it."""

    def __init__(self):
        self.sites: collections.Counter = collections.Counter()

    def _site(self) -> str:
        import traceback

        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/optim/" in f.filename or "/models/" in f.filename]
        if not frames:
            return "other"
        f = frames[-1]
        return f"{'torch.optim' if '/torch/optim/' in f.filename else f.filename.split('/models/')[-1]}:{f.name}"

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    reads.sites[reads._site()] += 1
                return func(*args, **(kwargs or {}))

        self._tolist = torch.Tensor.tolist

        def tolist(t):
            reads.sites[reads._site()] += 1
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        self._mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist


def count_step(trainer) -> dict:
    """One profiled train_step (kernel-launching ops) and one more with its host reads counted by call site."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    ops = _kernel_ops(prof)
    with _HostReads() as reads:
        trainer.train_step()
    return {"kernel_ops": sum(ops.values()), "host_reads": sum(reads.sites.values()),
            "top_ops": dict(ops.most_common(12)), "host_reads_by_site": dict(reads.sites.most_common())}


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
    second = {k: counts[2][k] - counts[1][k] for k in ("kernel_ops", "host_reads")}
    results = {"grad_accum_1": counts[1], "grad_accum_2": counts[2], "added_by_second_micro_batch": second}
    for accum in (1, 2):
        print(f"grad_accum {accum}: {counts[accum]['kernel_ops']} kernel ops, {counts[accum]['host_reads']} host reads "
              f"{counts[accum]['host_reads_by_site']}", flush=True)
    if args.out is not None:
        write_json(args.out, document(run_metadata("cpu", benchmark="trainer_ops"), vars(args) | {"out": str(args.out)}, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
