"""Data parallelism on CPU: two gloo processes (what torchrun starts), compared with one process.

Everything runs in float64: the two layouts sum the same gradients in a different order, and Adam's
normalisation turns float32 rounding of near-zero gradients into differences of a few percent of an update
(how large depends on the CPU's reduction order). In float64 that legitimate difference is ~1e-12 of an
update, so a tight bound still separates "same effective batch" from "half the batch" (~100 % of an update).
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from models.refiner import Refiner
from models.training.distributed import cleanup_distributed, init_distributed
from models.training.trainer import Trainer
from tests.models.training.test_trainer import _config, _pairs, _Recording

STEPS = 3


def _ddp_config(**overrides):
    return _config(stage1_steps=STEPS, gan_weight=0.1, gan_start_step=1, ema_decay=0.5, **overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank, set up the way torchrun sets it up (environment variables)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    ctx = init_distributed("cpu")
    try:
        torch.manual_seed(rank)  # different initial weights per rank: DDP must start everyone from rank 0's
        data = _Recording(_pairs(8, augment=True))
        trainer = Trainer(Refiner.tiny(), _ddp_config(batch_size=2), os.path.join(out, "run"), data, ctx=ctx)
        data.read.clear()
        logs = [trainer.train_step() for _ in range(STEPS)]
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                "ema": trainer.ema.state_dict(),
                "discriminator": trainer.discriminator.state_dict(),
                "read": data.read,
                "effective_batch": trainer.effective_batch,
                "has_d_loss": "d_loss" in logs[-1],
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        cleanup_distributed()


def _single(tmp_path, name, **overrides):
    torch.manual_seed(0)
    data = _Recording(_pairs(8, augment=True))
    trainer = Trainer(Refiner.tiny(), _ddp_config(**overrides), tmp_path / name, data)
    data.read.clear()
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(STEPS):
        trainer.train_step()
    return trainer, data.read, initial


def _max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture
def _float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


@pytest.mark.slow
@pytest.mark.usefixtures("_float64")
def test_two_ranks_match_each_other_and_one_rank_with_the_same_effective_batch(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["effective_batch"] == r1["effective_batch"] == 4 and r0["has_d_loss"]
    # both ranks end with identical weights (model, EMA, discriminator)
    for key in ("params", "ema", "discriminator"):
        for n, t in r0[key].items():
            assert torch.equal(t, r1[key][n]), f"{key} {n}"
    # the ranks read different samples, 2 per step each
    assert len(r0["read"]) == len(r1["read"]) == 2 * STEPS
    for step in range(STEPS):
        assert not set(r0["read"][2 * step : 2 * step + 2]) & set(r1["read"][2 * step : 2 * step + 2])

    # effective batch = the sum of the ranks' batches: one process with batch 4, or batch 2 x 2 accumulation,
    # reads the same samples per step and ends with the same weights up to float64 summation order
    # (bound: 1e-6 of an update, ~1e5 above what that order costs), while effective batch 2 differs by ~1 update
    big, read_big, initial = _single(tmp_path, "big", batch_size=4)
    accum, read_accum, _ = _single(tmp_path, "accum", batch_size=2, grad_accum=2)
    half, _, _ = _single(tmp_path, "half", batch_size=2)
    for step in range(STEPS):
        both = r0["read"][2 * step : 2 * step + 2] + r1["read"][2 * step : 2 * step + 2]
        assert read_big[4 * step : 4 * step + 4] == both == read_accum[4 * step : 4 * step + 4]
    params = {n: p.detach() for n, p in big.model.named_parameters()}
    assert all(p.dtype == torch.float64 for p in params.values())
    update = _max_diff(params, initial)
    wrong = _max_diff({n: p.detach() for n, p in half.model.named_parameters()}, r0["params"])
    for trainer in (big, accum):
        assert trainer.effective_batch == 4
        diff = _max_diff({n: p.detach() for n, p in trainer.model.named_parameters()}, r0["params"])
        assert wrong > 0.1 * update, (wrong, update)
        assert diff < 1e-6 * update, (diff, update, wrong)
        # EMA shadows are float32 by design: equal to float32 rounding of weights of size ~1
        assert _max_diff(trainer.ema.state_dict(), r0["ema"]) < 1e-3 * update
