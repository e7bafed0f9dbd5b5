"""Multi-process data parallelism (torch DDP launched by torchrun) and the step sampler.

The same script runs on one device or on N: ``python -m telepresence.cli.train``
or ``torchrun --nproc_per_node N -m telepresence.cli.train``. torchrun sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`init_distributed`
reads them and starts the process group (NCCL on CUDA, gloo on CPU).

Sampling (:class:`StepSampler`): per stage, one endless stream of sample
indices, a fresh permutation of the dataset per pass (seeded by seed, stage and
pass). Optimizer step s consumes stream[s G : (s + 1) G], G = B x ranks x
accumulation (the effective batch); micro-batch m of rank r takes the slice
[(m ranks + r) B : (m ranks + r + 1) B] of it. So

* ranks see different samples (like torch's DistributedSampler),
* the samples of an optimizer step depend on G only, not on how G is split
  over ranks and accumulation (a 2-rank run matches a 1-rank run with twice
  the accumulation), and
* a resumed run starts at any step without replaying data.

Each draw carries a seed (a hash of seed, stage and stream position) that
fixes its augmentation and its noise level (models.training.data.KeyedDataset).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly one-process) data-parallel job."""

    rank: int
    """Global rank of this process."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this host (picks the GPU)."""
    device: torch.device
    """Device this process trains on."""

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, saves and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_device(device: str | torch.device | None, local_rank: int = 0) -> torch.device:
    """"auto" / None: cuda:LOCAL_RANK when CUDA is available, else cpu; "cuda" gets the local rank's GPU."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"expected a CUDA device to be available for --device {device}, got none")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: str | torch.device | None = "auto") -> DistContext:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); else a one-process context."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
            logger.info("process group: backend %s, rank %d of %d, device %s", backend, rank, world, dev)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def mean_over_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average a dict of floats over ranks (every rank gets the result)."""
    if not ctx.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    t /= ctx.world_size
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's obj on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- sampling -------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (SplitMix64 finaliser over the sequence)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 27
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & 0x7FFF_FFFF_FFFF_FFFF


class StepSampler(Sampler):
    """Yields this rank's micro-batches of keys (index, draw_seed) for optimizer steps
    [start_step, end_step) of one stage (see module docstring)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        grad_accum: int,
        ctx: DistContext | None = None,
        seed: int = 0,
        stage: int = 0,
        start_step: int = 0,
        end_step: int = 0,
        shuffle: bool = True,
    ):
        if num_samples < 1:
            raise ValueError(f"expected a dataset with at least one sample, got {num_samples}")
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"expected batch_size and grad_accum >= 1, got {batch_size} and {grad_accum}")
        if not 0 <= start_step <= end_step:
            raise ValueError(f"expected 0 <= start_step <= end_step, got {start_step} and {end_step}")
        self.n = num_samples
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.rank = ctx.rank if ctx else 0
        self.world = ctx.world_size if ctx else 1
        self.seed, self.stage = seed, stage
        self.start_step, self.end_step = start_step, end_step
        self.shuffle = shuffle
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.grad_accum

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.stage, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][i])

    def keys(self, step: int, micro: int) -> list[tuple[int, int]]:
        """Keys of micro-batch ``micro`` of optimizer step ``step`` on this rank."""
        first = step * self.effective_batch + (micro * self.world + self.rank) * self.batch_size
        return [(self._index(q), mix_seed(self.seed, self.stage, q, 1)) for q in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start_step, self.end_step):
            for micro in range(self.grad_accum):
                yield self.keys(step, micro)
