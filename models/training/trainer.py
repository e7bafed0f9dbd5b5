"""Refiner training loop: two stages, EMA, checkpoints with exact resume, DDP, logs.

Per optimizer step t (G = batch_size x ranks x grad_accum samples):

    for each of grad_accum micro-batches (this rank's B samples):
        s_i ~ U[noise_min, noise_max]                per sample (variable-noise regime;
                                                     the reference latent stays clean)
        y   = refiner(ref, views, seen, s)           [B, V, 3, S, S]
        L_G = w_l2 L2_w(y, target) + w_ssim SSIM_w(y, target)
              + [t >= gan_start] (w_gan hinge_G(D(y)) + w_fm FM(D(y), D(target)))
        backward(L_G / grad_accum)
        [t >= gan_start]: backward(hinge_D(D(target), D(y.detach())) / grad_accum)
    clip, AdamW step(s), EMA update

The discriminator does one spectral-norm power iteration at the start of the
step and runs every pass in eval mode, so splitting the batch over ranks or
micro-batches changes nothing but float summation order.

(``_w``: per-pixel weighted by the sample's "weight", see models.training.losses.)
Stage 1 (synthetic pairs) runs steps [0, stage1_steps), stage 2 (real pairs)
the next stage2_steps, each with its own dataset, learning-rate warm-up and
scale; the optimizer state carries over. The EMA weights are what gets exported.

Determinism: data order, augmentation, noise levels and noise tensors are
functions of (seed, stage, step, rank, micro-batch) - no hidden RNG state - so
a resumed run repeats the uninterrupted one bit for bit on CPU (on CUDA up to
non-deterministic kernels unless ``deterministic`` is set).

Outputs under ``out_dir``: train_config.json, checkpoints/step_NNNNNNN/
(trainer.pt), logs/ (TensorBoard events), log.jsonl (the same scalars, one JSON
object per log step), and whatever export() is pointed at.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from models.face.identity import IdentityEmbedder, load_face_net

from . import losses
from .config import CONFIG_NAME, D_BETAS, STAGE_NAMES, TrainConfig
from .data import KeyedDataset, check_sample, collate, draw_generator
from .discriminator import MultiScaleDiscriminator, check_input_size
from .distributed import DistContext, StepSampler, barrier, mean_over_ranks, mix_seed
from .ema import EMA
from .checkpoints import CheckpointsMixin, hardware_info, latest_checkpoint
from .runlog import PERF_KEYS, RunLog, Window, image_grid

logger = logging.getLogger(__name__)

class Trainer(CheckpointsMixin):
    """Trains a refiner (models.refiner.Refiner) on pair datasets (models.training.data).

    refiner: its trainable_parameters() are trained (all of them for a model
        without adapters; adapters, skip convs, seen-mask conv_in and a learned
        prompt with LoRA).
    stage1 / stage2: datasets of the sample format (stage2 may be None when
        stage2_steps is 0); val: optional validation pairs.
    ctx: the data-parallel context (models.training.distributed.init_distributed);
        None: one process on ``device`` (default cpu).
    """

    def __init__(
        self,
        refiner: nn.Module,
        config: TrainConfig,
        out_dir: str | Path,
        stage1: Dataset | None,
        stage2: Dataset | None = None,
        val: Dataset | None = None,
        ctx: DistContext | None = None,
        device: str | torch.device = "cpu",
    ):
        self.config = config
        self.ctx = ctx or DistContext(rank=0, world_size=1, local_rank=0, device=torch.device(device))
        self.device = self.ctx.device
        self.out_dir = Path(out_dir)
        self.datasets = (stage1, stage2)
        self.val = val
        for i, (ds, steps) in enumerate(((stage1, config.stage1_steps), (stage2, config.stage2_steps))):
            if steps and ds is None:
                raise ValueError(f"expected a stage-{i + 1} ({STAGE_NAMES[i]}) dataset for stage{i + 1}_steps={steps}, got none")
            if steps and len(ds) == 0:
                raise ValueError(f"expected a non-empty stage-{i + 1} ({STAGE_NAMES[i]}) dataset, got 0 samples")
            if ds is not None and len(ds):
                check_sample(KeyedDataset(ds)[(0, 0)], config.resolution)  # seeded: no global RNG draw
        factor = getattr(refiner, "factor", 1)
        if config.resolution % factor:
            raise ValueError(f"expected a resolution that is a multiple of the codec factor {factor}, got {config.resolution}")
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (before the model meets the GPU)
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        # ---- refiner, EMA, optimizer --------------------------------------------------------------
        self.model = refiner.to(self.device)
        # Master weights' dtype (float32 unless the caller built the model otherwise): inputs and losses use it,
        # so bf16 autocast outputs are upcast and a float64 model (the DDP test) stays float64 throughout.
        self.dtype = next(self.model.parameters()).dtype
        self.model.train()
        trainable = {id(p) for p in refiner.trainable_parameters()}
        self.named_trainable = [(n, p) for n, p in refiner.named_parameters() if id(p) in trainable]
        if not self.named_trainable:
            raise ValueError("expected a refiner with trainable parameters, got none")
        for _, p in self.named_trainable:
            p.requires_grad_(True)
        self.ddp_model = self._wrap(self.model)  # DDP broadcasts rank 0's weights: the EMA starts from those
        self.ema = EMA(self.named_trainable, config.ema_decay)
        self.optimizer = self._adamw([p for _, p in self.named_trainable], lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))

        # ---- discriminator -------------------------------------------------------------------------------
        self.discriminator: MultiScaleDiscriminator | None = None
        self.optimizer_d = None
        self.ddp_discriminator = None
        if config.uses_discriminator:
            check_input_size(config.discriminator, config.resolution)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(config.seed, 0xD15C))
                self.discriminator = MultiScaleDiscriminator(config.discriminator).to(self.device)
            self.optimizer_d = self._adamw(self.discriminator.parameters(), lr=config.lr_d, betas=D_BETAS, weight_decay=0.0)
            self.ddp_discriminator = self._wrap(self.discriminator)

        self.step = 0
        self.wall_s = 0.0
        self.last_losses: dict[str, float] = {}
        self.last_val: dict[str, float] = {}
        self.best_val: dict[str, float] = {}
        self._window = Window()
        self._loader_stage: int | None = None
        self._batches = None
        self.log = RunLog(self.out_dir, self.ctx.is_main)
        self._identity = None
        self._face_net = load_face_net(device=self.device) if config.identity_weight or config.face_feature_weight else None
        self._last_images: list[Tensor] | None = None
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / CONFIG_NAME).write_text(config.to_json())
        n_train = sum(p.numel() for _, p in self.named_trainable)
        n_all = sum(p.numel() for p in refiner.parameters())
        if self.ctx.is_main:
            logger.info(
                "trainer: %s family, %.2f M of %.2f M parameters trained, effective batch %d (%d x %d ranks x %d), device %s",
                config.family, n_train / 1e6, n_all / 1e6, self.effective_batch, config.batch_size, self.ctx.world_size, config.grad_accum, self.device,
            )

    # ---- setup helpers -------------------------------------------------------------------------------------
    def _optimizer_kind(self) -> dict[str, bool]:
        """AdamW's implementation: fused on CUDA (one kernel for every tensor), else foreach (one
        multi-tensor op per update term instead of a Python loop over the parameters). Same update."""
        fused = self.device.type == "cuda"
        return {"fused": fused, "foreach": not fused}

    def _adamw(self, params, **kwargs) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, **kwargs, **self._optimizer_kind())

    def _load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """load_state_dict, keeping this trainer's implementation (the saved one may be another
        device's): fused AdamW keeps its step counts on the parameters' device, the others on the CPU."""
        optimizer.load_state_dict(state)
        kind = self._optimizer_kind()
        for group in optimizer.param_groups:
            group.update(kind)
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if isinstance(step, Tensor):
                    optimizer.state[p]["step"] = step.to(p.device, torch.float32) if kind["fused"] else step.cpu()

    def _wrap(self, module: nn.Module) -> nn.Module:
        if not self.ctx.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    @property
    def effective_batch(self) -> int:
        return self.config.batch_size * self.ctx.world_size * self.config.grad_accum

    @property
    def stage(self) -> int:
        return self.config.stage_of(self.step)[0]

    @property
    def gan_active(self) -> bool:
        return self.discriminator is not None and self.step >= self.config.gan_start_step

    def _loader(self, stage: int, start_local: int, length: int):
        cfg = self.config
        sampler = StepSampler(
            len(self.datasets[stage]), cfg.batch_size, cfg.grad_accum, self.ctx, seed=cfg.seed, stage=stage,
            start_step=start_local, end_step=length,
        )
        loader = DataLoader(
            KeyedDataset(self.datasets[stage]),
            batch_sampler=sampler,
            num_workers=cfg.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    def _next_batch(self) -> dict:
        stage, local, length = self.config.stage_of(self.step)
        if self._loader_stage != stage or self._batches is None:
            self._batches = self._loader(stage, local, length)
            self._loader_stage = stage
        return next(self._batches)

    def _autocast(self):
        if self.config.bf16 and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _noise_levels(self, draws: Tensor) -> Tensor | float:
        """Per-sample noise level s_i ~ U[noise_min, noise_max] from each draw's seed: [B], or 0.0 for none."""
        lo, hi = self.config.noise_min, self.config.noise_max
        if hi == 0.0:
            return 0.0
        u = torch.stack([torch.rand((), generator=draw_generator(mix_seed(int(d), 2))) for d in draws])
        s = lo + (hi - lo) * u  # [B] on the CPU: the refiner checks the range there and copies it without a sync
        return s.pin_memory() if self.device.type == "cuda" else s

    def _noise_generator(self, micro: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(self.config.seed, self.step, self.ctx.rank, micro, 3))
        return g

    # ---- one optimizer step --------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step (grad_accum micro-batches on every rank); returns this rank's losses."""
        cfg = self.config
        if self.step >= cfg.total_steps:
            raise RuntimeError(f"expected a step below total_steps={cfg.total_steps}, got step {self.step} (training is done)")
        t0 = time.perf_counter()
        gan = self.gan_active
        self.model.train()
        lr = cfg.lr * cfg.lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        pending: list[tuple[str, Tensor]] = []  # logged values as device tensors: read back once, at the end
        if gan:
            self.discriminator.power_iteration()  # once per step; every pass below is in eval mode
            self.discriminator.eval()
        data_s = 0.0
        for micro in range(cfg.grad_accum):
            t_data = time.perf_counter()
            batch = self._next_batch()
            data_s += time.perf_counter() - t_data  # waiting for the loader: the share data loading costs
            last = micro == cfg.grad_accum - 1
            with ExitStack() as stack:
                if not last and self.ctx.distributed:
                    stack.enter_context(self.ddp_model.no_sync())
                    if gan:
                        stack.enter_context(self.ddp_discriminator.no_sync())
                pending += self._micro_step(batch, micro, gan).items()

        params = [p for _, p in self.named_trainable]
        if cfg.max_grad_norm > 0:
            pending.append(("grad_norm", torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if gan:
            self.optimizer_d.step()
            self.optimizer_d.zero_grad(set_to_none=True)
        self.ema.update(self.step)
        logs = self._read_back(pending)  # the step's one device sync
        self.step += 1
        logs["lr"] = lr
        dt = time.perf_counter() - t0
        self.wall_s += dt
        logs["step_s"] = dt
        logs["data_s"] = data_s
        logs["samples_per_s"] = self.effective_batch / dt
        return logs

    def _read_back(self, pending: list[tuple[str, Tensor]]) -> dict[str, float]:
        """Logged tensors -> floats with one device->host copy: a value with several entries (one per
        discriminator scale) is their mean; a per-micro-batch value is averaged over the micro-batches."""
        flat = torch.cat([t.detach().reshape(-1).to(self.device) for _, t in pending]).double().tolist()
        logs: dict[str, float] = {}
        i = 0
        for name, t in pending:
            n = t.numel()
            value = sum(flat[i : i + n]) / n
            i += n
            logs[name] = value if name == "grad_norm" else logs.get(name, 0.0) + value / self.config.grad_accum
        return logs

    def _micro_step(self, batch: dict, micro: int, gan: bool) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch; returns its losses as detached device tensors."""
        cfg = self.config
        dev = self.device
        dt = self.dtype
        ref = batch["ref"].to(dev, dt, non_blocking=True)  # [B, 3, S, S]
        views = batch["views"].to(dev, dt, non_blocking=True)  # [B, V, 3, S, S]
        target = batch["target"].to(dev, dt, non_blocking=True)
        weight = batch["weight"].to(dev, dt, non_blocking=True)  # [B, V, 1, S, S]
        seen = batch["seen"].to(dev, dt, non_blocking=True) if self.model.config.seen_mask else None
        s = self._noise_levels(batch["draw"])
        with self._autocast():
            out = self.ddp_model(ref, views, seen, noise_level=s, generator=self._noise_generator(micro))  # [B, V, 3, S, S]
        y = out.flatten(0, 1).to(dt)  # [B V, 3, S, S]
        t = target.flatten(0, 1)
        w = weight.flatten(0, 1)
        l2 = losses.masked_l2(y, t, w)
        ssim = losses.masked_ssim_loss(y, t, w)
        total = cfg.l2_weight * l2 + cfg.ssim_weight * ssim
        logs = {"l2": l2.detach(), "ssim": ssim.detach()}
        if self._face_net is not None:
            id_loss, face_fm = losses.face_prior_losses(self._face_net, y, t)
            total = total + cfg.identity_weight * id_loss + cfg.face_feature_weight * face_fm
            logs.update(id=id_loss.detach(), face_fm=face_fm.detach())
        if gan:
            d = self.discriminator  # the module itself, not DDP: no gradient reaches its weights here
            d.requires_grad_(False)
            with self._autocast():
                fake_logits, fake_feats = d(y)
                g_adv = losses.g_hinge_loss([x.to(dt) for x in fake_logits], w)
                total = total + cfg.gan_weight * g_adv
                logs["g_adv"] = g_adv.detach()
                if cfg.feature_matching_weight > 0:
                    with torch.no_grad():
                        _, real_feats = d(t)
                    fm = losses.feature_matching_loss(
                        [[f.to(dt) for f in fs] for fs in fake_feats], [[f.to(dt) for f in fs] for fs in real_feats], w
                    )
                    total = total + cfg.feature_matching_weight * fm
                    logs["fm"] = fm.detach()
            d.requires_grad_(True)
        (total / cfg.grad_accum).backward()
        logs["loss"] = total.detach()
        if gan:
            with self._autocast():
                logits, _ = self.ddp_discriminator(torch.cat([t, y.detach()]))  # one pass: real then fake
            n = t.shape[0]
            real = [x[:n].to(dt) for x in logits]
            fake = [x[n:].to(dt) for x in logits]
            d_loss = losses.d_hinge_loss(real, fake, w)
            (d_loss / cfg.grad_accum).backward()
            logs["d_loss"] = d_loss.detach()
            logs["d_real"] = torch.stack([x.detach().mean() for x in real])  # [scales]: logged as their mean
            logs["d_fake"] = torch.stack([x.detach().mean() for x in fake])
        if self.ctx.is_main and micro == cfg.grad_accum - 1:
            k = min(4, ref.shape[0])
            self._last_images = [ref[:k].detach(), views[:k, 0].detach(), out[:k, 0].detach(), target[:k, 0].detach()]
        return logs

    # ---- the loop --------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        """Train from the current step to the end of stage 2; returns the last logged losses."""
        cfg = self.config
        bar = None
        if self.ctx.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.total_steps, initial=self.step, desc="train", unit="it", dynamic_ncols=True)
        t0 = time.monotonic()
        try:
            while self.step < cfg.total_steps:
                # The budget counts everything this call does (steps, validations, checkpoints).
                if cfg.max_wall_s and time.monotonic() - t0 >= cfg.max_wall_s:
                    if self.ctx.is_main:
                        logger.info("time budget of %.0f s reached at step %d: stopping early", cfg.max_wall_s, self.step)
                    if self.val is not None:
                        self.validate()
                    self.save_checkpoint()
                    break
                stage, local, length = cfg.stage_of(self.step)
                if local == 0 and self.ctx.is_main:
                    logger.info("stage %d (%s): %d steps, %d pairs", stage + 1, STAGE_NAMES[stage], length, len(self.datasets[stage]))
                values = self.train_step()
                self._window.add(values)
                step = self.step
                stage_end = cfg.stage_of(step - 1)[1] == length - 1
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    self._log_scalars(bar)
                if self.ctx.is_main and cfg.image_every and step % cfg.image_every == 0:
                    self._log_images()
                if self.val is not None and ((cfg.val_every and step % cfg.val_every == 0) or step == cfg.total_steps):
                    self.validate()
                if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or stage_end:
                    self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            self.log.flush()
        return dict(self.last_losses)

    # ---- logging ---------------------------------------------------------------------------------------------
    def _log_scalars(self, bar) -> None:
        means = mean_over_ranks(self._window.means(), self.ctx)
        self._window.clear()
        if not means:
            return
        self.last_losses = {k: v for k, v in means.items() if k not in PERF_KEYS}
        if not self.ctx.is_main:
            return
        stage = self.config.stage_of(self.step - 1)[0]
        record = self.log.scalars(self.step, stage, self.wall_s, means)
        if bar is not None:
            bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", stage=stage + 1)
        logger.debug("step %d: %s", self.step, record)

    def _log_images(self) -> None:
        if self._last_images is None:
            return
        stage = self.config.stage_of(self.step - 1)[0]
        self.log.images(f"samples/{STAGE_NAMES[stage]}", self._last_images, self.step)

    # ---- validation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Dataset, max_samples: int | None = None, use_ema: bool = True) -> dict[str, float]:
        """Masked PSNR / L2 / SSIM of the (EMA) refiner on the first samples of ``dataset``,
        the same for the unrefined input views (baseline), and the dlib identity distance
        when available. Runs on this process only (call it on rank 0)."""
        cfg = self.config
        n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
        if n < 1:
            raise ValueError("expected a validation set with at least one sample, got none")
        keyed = KeyedDataset(dataset)
        identity = None
        if cfg.identity_metric:
            if self._identity is None:
                self._identity = IdentityEmbedder.optional() or False  # False: dlib missing, said once
            identity = self._identity or None
        sums: dict[str, float] = {}
        count = 0
        was_training = self.model.training
        self.model.eval()
        try:
            with self.ema.swapped() if use_ema else nullcontext():
                for first in range(0, n, cfg.batch_size):
                    batch = collate([keyed[(i, mix_seed(cfg.seed, 0x7A1, i))] for i in range(first, min(n, first + cfg.batch_size))])
                    dev, dt = self.device, self.dtype
                    ref, views = batch["ref"].to(dev, dt), batch["views"].to(dev, dt)
                    seen = batch["seen"].to(dev, dt) if self.model.config.seen_mask else None
                    with self._autocast():
                        out = self.model(ref, views, seen)
                    y = out.flatten(0, 1).to(dt)
                    t = batch["target"].flatten(0, 1).to(dev, dt)
                    w = batch["weight"].flatten(0, 1).to(dev, dt)
                    x = views.flatten(0, 1)
                    metrics = {
                        "psnr": losses.masked_psnr(y, t, w),
                        "psnr_input": losses.masked_psnr(x, t, w),
                    }
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v.sum())
                    sums["l2"] = sums.get("l2", 0.0) + float(losses.masked_l2(y, t, w)) * y.shape[0]
                    sums["ssim"] = sums.get("ssim", 0.0) + float(losses.masked_ssim_loss(y, t, w)) * y.shape[0]
                    if identity is not None:
                        d = identity.batch_distance(y.cpu(), t.cpu())
                        sums["identity"] = sums.get("identity", 0.0) + sum(d)
                    count += y.shape[0]
        finally:
            self.model.train(was_training)
        return {k: v / count for k, v in sums.items()}

    def validate(self) -> dict[str, float]:
        """evaluate() on the validation set (rank 0), logged under val/; other ranks wait."""
        metrics: dict[str, float] = {}
        if self.ctx.is_main and self.val is not None:
            metrics = self.evaluate(self.val, self.config.val_samples)
            self.last_val = metrics
            self.log.validation(self.step, metrics)
            logger.info("step %d validation: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            if self.config.keep_best and metrics.get("psnr", -math.inf) > self.best_val.get("psnr", -math.inf):
                self.best_val = {"step": self.step, **metrics}
                self._write_export(self.out_dir / "best", {"selected": {"by": "val/psnr", **self.best_val}})
        barrier(self.ctx)
        return metrics

    def close(self) -> None:
        self.log.close()


__all__ = ["TrainConfig", "Trainer", "image_grid", "latest_checkpoint", "hardware_info"]
