"""`telepresence train`: train the refiner (docs/training.md).

One process:      python -m telepresence.cli.train --data PAIRS --out runs/x
N GPUs, one host: torchrun --standalone --nproc_per_node N -m telepresence.cli.train --data PAIRS --out runs/x

Every TrainConfig field left off the command line keeps its TrainConfig default.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from telepresence.cli.console import HelpFormatter, add_verbosity, configure_logging

log = logging.getLogger("telepresence.train")

PROG = "telepresence train"


class TrainInputError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


# argparse dest -> TrainConfig field (only flags given on the command line are passed on)
_CONFIG_FLAGS = {
    "family": "family", "base": "base", "preset": "model_preset", "codec": "codec", "codec_model": "codec_model",
    "prompt": "prompt", "timestep": "timestep", "seen_mask": "seen_mask", "lora_rank": "lora_rank",
    "decoder_rank": "lora_decoder_rank", "skip_convs": "skip_convs", "resolution": "resolution", "batch": "batch_size",
    "grad_accum": "grad_accum", "workers": "num_workers", "lr": "lr", "lr_d": "lr_d", "weight_decay": "weight_decay",
    "warmup": "warmup_steps", "schedule": "lr_schedule", "max_grad_norm": "max_grad_norm", "steps": "stage1_steps",
    "stage2_steps": "stage2_steps", "stage2_lr_scale": "stage2_lr_scale", "l2": "l2_weight", "ssim": "ssim_weight",
    "gan": "gan_weight", "fm": "feature_matching_weight", "gan_start": "gan_start_step", "ema_decay": "ema_decay",
    "bf16": "bf16", "seed": "seed", "deterministic": "deterministic", "log_every": "log_every",
    "image_every": "image_every", "ckpt_every": "ckpt_every", "keep_checkpoints": "keep_checkpoints",
    "val_every": "val_every", "val_samples": "val_samples", "identity_metric": "identity_metric",
    "progress": "progress", "export_base": "export_base", "d_scales": "d_scales", "d_channels": "d_channels",
    "d_layers": "d_layers", "max_wall_s": "max_wall_s", "edit_unseen_only": "edit_unseen_only",
    "keep_best": "keep_best", "identity_weight": "identity_weight", "face_feature_weight": "face_feature_weight",
}
# --smoke: a few steps of the tiny model on synthetic 32 x 32 pairs, every feature switched on
_SMOKE = dict(
    model_preset="tiny", resolution=32, batch_size=2, stage1_steps=6, stage2_steps=4, warmup_steps=2, lr=1e-3,
    gan_start_step=3, d_channels=8, d_layers=2, feature_matching_weight=1.0, noise_max=0.3, num_workers=0,
    log_every=2, image_every=5, ckpt_every=5, val_every=5, val_samples=4, lora_rank=4, lora_decoder_rank=2,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Train the one-step refiner: stage 1 on synthetic pairs (--data), stage 2 on real pairs "
        "(--stage2-data, --captures). Effective batch = --batch x GPUs x --grad-accum. For several GPUs launch "
        "with `torchrun --standalone --nproc_per_node N -m telepresence.cli.train ...`.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--family", choices=("small", "lora"), help="small: from scratch, all weights; lora: SD-Turbo base + LoRA")
    g.add_argument("--base", help="lora: SD-Turbo folder or stabilityai/sd-turbo (or a refiner folder); small: a refiner folder to continue")
    g.add_argument("--preset", choices=("small", "compact", "tiny"), help="small family architecture when starting from scratch")
    g.add_argument("--codec", choices=("vae", "tiny"), help="lora: SD VAE or TAESD")
    g.add_argument("--codec-model", help="lora with --codec tiny: TAESD folder or hub id")
    g.add_argument("--prompt", help="lora: text of the fixed prompt embedding")
    g.add_argument("--timestep", type=int, help="U-Net timestep of the single step (default: family's)")
    g.add_argument("--seen-mask", dest="seen_mask", action="store_true", default=None, help="feed the seen mask to the refiner")
    g.add_argument("--edit-unseen-only", dest="edit_unseen_only", action="store_true", default=None, help="with --seen-mask: repaint only unseen texture")
    g.add_argument("--lora-rank", type=int, help="U-Net LoRA rank")
    g.add_argument("--decoder-rank", type=int, help="VAE decoder LoRA rank (0: none)")
    g.add_argument("--no-skip-convs", dest="skip_convs", action="store_false", default=None, help="no encoder->decoder skip convs")

    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="PATH", help="stage-1 (synthetic) pair files (.safetensors from TensorPairDataset.save) or folders of them")
    g.add_argument("--stage2-data", nargs="+", metavar="PATH", help="stage-2 (real) pair files or folders")
    g.add_argument("--captures", nargs="+", metavar="DIR", help="calibrated multi-view capture folders -> stage-2 pairs (needs MediaPipe)")
    g.add_argument("--capture-reference", metavar="CAM", help="reference camera of the captures (default: cameras.json's, else the first id)")
    g.add_argument("--prepare-only", metavar="FILE", help="write the stage-2 pairs built from --captures (and --stage2-data) to FILE (.safetensors) and exit")
    g.add_argument("--val", nargs="+", metavar="PATH", help="validation pair files or folders")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no flip / colour jitter")

    g = p.add_argument_group("run")
    g.add_argument("--out", help="run folder: checkpoints/, logs/ (TensorBoard), log.jsonl, train_config.json")
    g.add_argument("--export", metavar="DIR", help="where the EMA refiner is exported (default: OUT/refiner)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH", help="continue from the newest checkpoint in OUT (auto) or from PATH")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda (torchrun: each rank takes cuda:LOCAL_RANK)")
    g.add_argument("--smoke", action="store_true", help="a few steps of a tiny model on synthetic 32x32 pairs (checks the machinery)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="stage-1 optimizer steps")
    g.add_argument("--stage2-steps", type=int, help="stage-2 optimizer steps")
    g.add_argument("--batch", type=int, help="samples per GPU per micro-batch")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    g.add_argument("--resolution", type=int, help="sample side in pixels")
    g.add_argument("--lr", type=float, help="refiner learning rate")
    g.add_argument("--lr-d", type=float, help="discriminator learning rate")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup", type=int, help="warm-up steps per stage")
    g.add_argument("--schedule", choices=("constant", "cosine"))
    g.add_argument("--max-grad-norm", type=float, help="gradient clipping (0: off)")
    g.add_argument("--stage2-lr-scale", type=float, help="stage-2 learning rate as a fraction of --lr")
    g.add_argument("--noise", type=float, nargs=2, metavar=("LO", "HI"), help="per-sample noise level range (fractions of T)")
    g.add_argument("--l2", type=float, help="masked L2 weight")
    g.add_argument("--ssim", type=float, help="masked SSIM weight")
    g.add_argument("--gan", type=float, help="adversarial weight (0: no discriminator)")
    g.add_argument("--fm", type=float, help="discriminator feature-matching weight")
    g.add_argument("--identity", dest="identity_weight", type=float,
                   help="identity loss weight: dlib face-descriptor distance of refined view and target, through the "
                   "torch port of dlib's network (reads face_recognition_models' .dat file)")
    g.add_argument("--face-features", dest="face_feature_weight", type=float,
                   help="feature matching in dlib's face network (a face-specific perceptual loss)")
    g.add_argument("--gan-start", type=int, help="step from which the GAN is on")
    g.add_argument("--d-scales", type=int, help="discriminator image scales")
    g.add_argument("--d-channels", type=int, help="discriminator base width")
    g.add_argument("--d-layers", type=int, help="stride-2 layers per discriminator scale (input must be >= ~24 x 2^(layers-1+scales-1) px)")
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--no-bf16", dest="bf16", action="store_false", default=None, help="float32 on CUDA too")
    g.add_argument("--seed", type=int)
    g.add_argument("--deterministic", action="store_true", default=None, help="deterministic CUDA kernels (slower)")
    g.add_argument("--workers", type=int, help="data-loader workers per GPU")

    g = p.add_argument_group("logging")
    g.add_argument("--log-every", type=int)
    g.add_argument("--image-every", type=int)
    g.add_argument("--ckpt-every", type=int)
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--val-every", type=int)
    g.add_argument("--val-samples", type=int)
    g.add_argument("--no-identity", dest="identity_metric", action="store_false", default=None, help="no dlib identity metric")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g.add_argument("--keep-best", dest="keep_best", action="store_true", default=None,
                   help="also export the EMA weights of the best validation PSNR to OUT/best (model selection)")
    g.add_argument("--time-budget", dest="max_wall_s", type=float, help="stop early after this many seconds of training (then validate and export)")
    g.add_argument("--export-base", action="store_true", default=None, help="lora: also export the frozen base weights")
    add_verbosity(p)
    return p


# ---- inputs ------------------------------------------------------------------------------------------------
def _load_pairs(paths: list[str] | None, flag: str, augment: bool):
    from models.training.data import PairFormatError, TensorPairDataset

    if not paths:
        return None
    parts = []
    for path in paths:
        if not Path(path).exists():
            raise TrainInputError(f"{flag} {path!r}: no such file or folder")
        try:
            parts.append(TensorPairDataset.load(path, augment=False))
        except PairFormatError as exc:
            raise TrainInputError(f"{flag} {path!r}: {exc}") from exc
    try:
        return TensorPairDataset.concat(parts, augment=augment)
    except PairFormatError as exc:
        raise TrainInputError(f"{flag}: {exc}") from exc


def _capture_pairs(dirs: list[str] | None, size: int, reference: str | None, augment: bool):
    from models.training.captures import CaptureFormatError, CaptureSampleConfig, build_capture_samples, load_capture
    from models.training.data import TensorPairDataset

    if not dirs:
        return None
    captures = []
    for d in dirs:
        try:
            captures.append(load_capture(d))
        except CaptureFormatError as exc:
            raise TrainInputError(f"--captures {d!r}: {exc}") from exc
    try:
        from models.face.analysis import FaceAnalyzer, FaceConfig
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise TrainInputError(f"--captures needs MediaPipe ({exc}); build the pairs with --prepare-only where it is installed") from exc
    samples = []
    config = CaptureSampleConfig(size=size, reference_camera=reference)
    try:
        with FaceAnalyzer(FaceConfig(static_image=True)) as analyzer:
            for capture in captures:
                samples += build_capture_samples(capture, analyzer, config)
    except ImportError as exc:  # mediapipe itself is imported by FaceAnalyzer
        raise TrainInputError(f"--captures needs MediaPipe ({exc}); build the pairs with --prepare-only where it is installed") from exc
    except CaptureFormatError as exc:
        raise TrainInputError(f"--captures: {exc}") from exc
    if not samples:
        raise TrainInputError(f"--captures {' '.join(dirs)}: no pairs (no face found in the reference pictures?)")
    return TensorPairDataset.from_samples(samples, augment=augment)


def _join(parts):
    from models.training.data import TensorPairDataset

    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else TensorPairDataset.concat(parts, augment=parts[0].augment)


def _config(args: argparse.Namespace):
    from models.training.trainer import TrainConfig

    values = dict(_SMOKE) if args.smoke else {}
    for dest, field in _CONFIG_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[field] = value
    if args.noise is not None:
        values["noise_min"], values["noise_max"] = args.noise
    return TrainConfig(**values)


def _smoke_refiner(config):
    """--smoke without --base: the tiny test refiner (lora: a tiny SD-VAE refiner with adapters)."""
    from models.refiner import Refiner

    if config.family == "small":
        return Refiner.tiny(seen_mask=config.seen_mask).train()
    model = Refiner.tiny(codec="vae", seen_mask=config.seen_mask)
    model.add_lora(rank=config.lora_rank, decoder_rank=config.lora_decoder_rank, skip_convs=config.skip_convs)
    return model.train()


def _run(args: argparse.Namespace) -> int:
    import torch

    from models.training import distributed
    from models.training.data import TensorPairDataset, synthetic_pairs
    from models.training.families import build_refiner
    from models.training.trainer import Trainer, latest_checkpoint

    config = _config(args)
    if args.out is None and not args.smoke and args.prepare_only is None:
        raise TrainInputError("expected --out DIR (the run folder), got none")
    if args.smoke:
        size = config.resolution
        stage1 = TensorPairDataset.from_samples(synthetic_pairs(8, size, seed=1), augment=args.augment)
        stage2 = TensorPairDataset.from_samples(synthetic_pairs(8, size, seed=2, stage="real", background_weight=0.0), augment=args.augment)
        val = TensorPairDataset.from_samples(synthetic_pairs(4, size, seed=3), augment=False)
    else:
        stage1 = _load_pairs(args.data, "--data", args.augment)
        stage2 = _join([
            _load_pairs(args.stage2_data, "--stage2-data", args.augment),
            _capture_pairs(args.captures, config.resolution, args.capture_reference, args.augment),
        ])
        val = _load_pairs(args.val, "--val", False)
        if args.prepare_only is not None:
            if stage2 is None:
                raise TrainInputError("--prepare-only: expected --captures (or --stage2-data) to write, got none")
            stage2.save(args.prepare_only)
            log.info("wrote %d pairs to %s", len(stage2), args.prepare_only)
            return 0
        if config.stage1_steps and stage1 is None:
            raise TrainInputError(f"expected --data (stage-1 pairs) for {config.stage1_steps} stage-1 steps, got none (or pass --steps 0)")
        if config.stage2_steps and stage2 is None:
            raise TrainInputError(f"expected --stage2-data or --captures for {config.stage2_steps} stage-2 steps, got none")

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="telepresence-smoke-"))
    ctx = distributed.init_distributed(args.device)
    try:
        torch.manual_seed(config.seed)
        model = _smoke_refiner(config) if (args.smoke and config.base is None) else build_refiner(config)
        trainer = Trainer(model, config, out, stage1, stage2, val, ctx=ctx)
        if args.resume is not None:
            path = latest_checkpoint(out) if args.resume == "auto" else Path(args.resume)
            if path is None:
                log.info("no checkpoint in %s: starting from step 0", out)
            else:
                trainer.load_checkpoint(path)
        losses = trainer.fit()
        export = trainer.export(Path(args.export) if args.export else out / "refiner")
        trainer.close()
        if ctx.is_main:
            log.info("done: %d steps, final losses %s, refiner in %s", trainer.step, {k: round(v, 5) for k, v in losses.items()}, export)
    finally:
        distributed.cleanup_distributed()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `telepresence train` (argv without the subcommand). Returns the exit status."""
    from models.face.identity import MissingEvalExtraError
    from models.refiner import MissingModelError
    from models.training.captures import CaptureFormatError
    from models.training.data import PairFormatError

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return _run(args)
    except (TrainInputError, MissingModelError, MissingEvalExtraError, PairFormatError, CaptureFormatError,
            FileNotFoundError, ValueError) as exc:
        log.debug("training stopped", exc_info=True)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
