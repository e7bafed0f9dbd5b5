"""A training run's checkpoints (exact resume: weights, buffers, EMA, optimizers, discriminator,
RNG state, step) and its export (the EMA refiner + training.json, the model card's facts)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.runinfo import run_metadata

from .config import CHECKPOINT_DIR, CHECKPOINT_FILE, FORMAT_VERSION, STAGE_NAMES, TRAINING_JSON, TrainConfig
from .distributed import DistContext, barrier

logger = logging.getLogger("models.training.trainer")


def hardware_info(ctx: DistContext) -> dict:
    """What the run ran on: models.runinfo's record (commit, versions, device, host) and the world size."""
    return run_metadata(ctx.device, world_size=ctx.world_size)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint folder under out_dir/checkpoints, or None."""
    found = sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step_*"))
    found = [p for p in found if (p / CHECKPOINT_FILE).is_file()]
    return found[-1] if found else None


class CheckpointsMixin:
    """Trainer's save/load/export; it reads the trainer's model, optimizers, EMA, step and context."""

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "wall_s": self.wall_s,
            "config": self.config.to_dict(),
            "model": {n: p.detach().cpu().clone() for n, p in self.named_trainable},
            "buffers": self._buffers(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "discriminator": self.discriminator.state_dict() if self.discriminator is not None else None,
            "optimizer_d": self.optimizer_d.state_dict() if self.optimizer_d is not None else None,
            "rng": rng,
            "last_losses": self.last_losses,
            "last_val": self.last_val,
            "best_val": self.best_val,
        }

    def _buffers(self) -> dict[str, Tensor]:
        """The refiner's saved buffers (e.g. a fixed random prompt embedding): not trained, but part of the model."""
        state = self.model.state_dict()
        return {n: state[n].detach().cpu().clone() for n, _ in self.model.named_buffers() if n in state}

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step_NNNNNNN/trainer.pt (rank 0; atomically), drop old ones; every rank waits."""
        path = self.out_dir / CHECKPOINT_DIR / f"step_{self.step:07d}"
        if self.ctx.is_main:
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(self.state_dict(), tmp / CHECKPOINT_FILE)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
            kept = sorted(p for p in path.parent.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in kept[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("checkpoint %s", path)
        barrier(self.ctx)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a checkpoint folder (or its trainer.pt); every rank loads it."""
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"expected a checkpoint folder with {CHECKPOINT_FILE} (or the file), got {path}")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"expected checkpoint format_version {FORMAT_VERSION}, got {state.get('format_version')}")
        saved = TrainConfig.from_dict(state["config"])
        changed = {f.name for f in dataclasses.fields(TrainConfig) if getattr(saved, f.name) != getattr(self.config, f.name)}
        if changed:
            logger.warning("resuming with changed settings: %s", ", ".join(f"{k}: {getattr(saved, k)!r} -> {getattr(self.config, k)!r}" for k in sorted(changed)))
        params = dict(self.named_trainable)
        if set(state["model"]) != set(params):
            missing, extra = sorted(set(params) - set(state["model"])), sorted(set(state["model"]) - set(params))
            raise ValueError(
                f"expected checkpoint tensors for the {len(params)} trained parameters, got {len(missing)} missing "
                f"(e.g. {missing[:2]}) and {len(extra)} unknown (e.g. {extra[:2]}): same family/base/LoRA settings?"
            )
        with torch.no_grad():
            for n, t in state["model"].items():
                if t.shape != params[n].shape:
                    raise ValueError(f"expected checkpoint tensor {n} of shape {tuple(params[n].shape)}, got {tuple(t.shape)}")
                params[n].copy_(t)
            buffers = dict(self.model.named_buffers())
            for n, t in state.get("buffers", {}).items():
                if n not in buffers or buffers[n].shape != t.shape:
                    raise ValueError(f"expected checkpoint buffer {n} to match the refiner's, got shape {tuple(t.shape)}")
                buffers[n].copy_(t)
        self.ema.load_state_dict(state["ema"])
        self._load_optimizer(self.optimizer, state["optimizer"])
        if self.discriminator is not None:
            if state["discriminator"] is None:
                logger.warning("checkpoint has no discriminator: it starts from scratch")
            else:
                self.discriminator.load_state_dict(state["discriminator"])
                self._load_optimizer(self.optimizer_d, state["optimizer_d"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step = int(state["step"])
        self.wall_s = float(state["wall_s"])
        self.last_losses = dict(state.get("last_losses", {}))
        self.last_val = dict(state.get("last_val", {}))
        self.best_val = dict(state.get("best_val", {}))
        self._batches, self._loader_stage = None, None
        logger.info("resumed from %s at step %d", file, self.step)

    # ---- export -------------------------------------------------------------------------------------------------
    def export(self, directory: str | Path, extra: dict | None = None) -> Path:
        """EMA weights -> refiner.save_pretrained(directory) + training.json (rank 0); every rank waits.

        lora family with a named base: only the adapters (lora/) and refiner.json
        pointing at the base, unless export_base; otherwise the whole refiner.
        """
        directory = Path(directory)
        if self.ctx.is_main:
            self._write_export(directory, extra)
        barrier(self.ctx)
        return directory

    def _write_export(self, directory: Path, extra: dict | None = None) -> None:
        """Write the EMA refiner and training.json into ``directory`` (this process only)."""
        model = self.model
        include_base = not (model.has_lora and model.config.base_model is not None and not self.config.export_base)
        with self.ema.swapped():
            model.save_pretrained(directory, include_base=include_base)
        stage1_done = min(self.step, self.config.stage1_steps)
        info = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "refiner": json.loads(model.config.to_json()),
            "steps": {"stage1": stage1_done, "stage2": self.step - stage1_done, "total": self.step},
            "effective_batch": self.effective_batch,
            "wall_time_s": round(self.wall_s, 2),
            "hardware": hardware_info(self.ctx),
            "datasets": {STAGE_NAMES[i]: (len(d) if d is not None else 0) for i, d in enumerate(self.datasets)},
            "parameters": {
                "trained": sum(p.numel() for _, p in self.named_trainable),
                "total": sum(p.numel() for p in model.parameters()),
            },
            "final_losses": self.last_losses,
            "final_validation": self.last_val,
            "weights": "EMA",
            "includes_base": include_base,
            **(extra or {}),
        }
        (directory / TRAINING_JSON).write_text(json.dumps(info, indent=2))
        logger.info("exported EMA refiner to %s", directory)
