"""What a training run is made of: TrainConfig (saved as train_config.json beside the checkpoints),
the file names of a run folder, and the choices the trainer knows."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .discriminator import DiscriminatorConfig

CONFIG_NAME = "train_config.json"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FILE = "trainer.pt"
TRAINING_JSON = "training.json"
FORMAT_VERSION = 1
FAMILIES = ("small", "lora")
PRESETS = ("small", "compact", "tiny")
LR_SCHEDULES = ("constant", "cosine")
STAGE_NAMES = ("synthetic", "real")
D_BETAS = (0.5, 0.999)  # pix2pix's Adam betas for the discriminator


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run is made of; saved as train_config.json beside the checkpoints."""

    # ---- model -----------------------------------------------------------------------------------
    family: str = "small"
    """"small": the from-scratch refiner, every parameter trained; "lora": SD-Turbo base + LoRA (adapters and skip convs trained)."""
    base: str | None = None
    """lora: SD-Turbo-style diffusers folder or hub id (stabilityai/sd-turbo), or a refiner folder to continue; small: optional refiner folder to continue."""
    model_preset: str = "small"
    """small family architecture when starting from scratch: "small" (~17 M parameters), "compact" (~10 M) or "tiny" (tests, --smoke)."""
    codec: str = "vae"
    """lora family on an SD base: "vae" (the SD VAE) or "tiny" (TAESD, from codec_model)."""
    codec_model: str | None = None
    """Folder or hub id of the tiny codec (lora family, codec "tiny"); None: madebyollin/taesd."""
    prompt: str = ""
    """lora family on an SD base: text of the fixed prompt embedding (needs the base's text encoder once)."""
    timestep: int | None = None
    """U-Net timestep T of the single step; None: the family default (small 199, SD-Turbo 999)."""
    seen_mask: bool = False
    """Feed the sample's "seen" mask to the refiner as an extra input channel."""
    edit_unseen_only: bool = False
    """small family with the seen mask: the refiner may only repaint unseen texture (RefinerConfig.edit_unseen_only)."""
    lora_rank: int = 8
    """U-Net LoRA rank (pix2pix-turbo: 8)."""
    lora_decoder_rank: int = 4
    """VAE-decoder LoRA rank, 0 for none (pix2pix-turbo: 4; needs a codec with a decoder)."""
    skip_convs: bool = True
    """pix2pix-turbo encoder->decoder skip convs (lora family with the "vae" codec only)."""
    # ---- data and batches ---------------------------------------------------------------------------
    resolution: int = 256
    """Side S of the square training samples, pixels (a multiple of the codec factor)."""
    batch_size: int = 4
    """Samples per micro-batch per rank (B)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; effective batch = B x ranks x grad_accum."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    # ---- optimisation --------------------------------------------------------------------------------
    lr: float = 1e-4
    """Peak AdamW learning rate of the refiner (stage 1)."""
    lr_d: float = 1e-4
    """AdamW learning rate of the discriminator (betas 0.5, 0.999), constant."""
    weight_decay: float = 1e-2
    """AdamW weight decay of the refiner."""
    warmup_steps: int = 500
    """Linear learning-rate warm-up at the start of each stage, optimizer steps."""
    lr_schedule: str = "constant"
    """After warm-up: "constant" or "cosine" (to 0 at the end of each stage)."""
    max_grad_norm: float = 1.0
    """Gradient clipping of the refiner (global L2 norm); 0 disables."""
    stage1_steps: int = 10_000
    """Optimizer steps of stage 1 (synthetic pairs)."""
    stage2_steps: int = 0
    """Optimizer steps of stage 2 (real pairs); 0: no stage 2."""
    stage2_lr_scale: float = 0.3
    """Stage-2 learning rate as a fraction of lr (fine-tuning)."""
    noise_min: float = 0.0
    """Lower end of the per-sample noise level s ~ U[noise_min, noise_max] (fraction of T)."""
    noise_max: float = 0.5
    """Upper end of the noise level range; noise_min = noise_max = 0 trains without noise."""
    # ---- losses ----------------------------------------------------------------------------------------
    l2_weight: float = 1.0
    """Weight of the masked L2 loss."""
    ssim_weight: float = 0.5
    """Weight of the masked (1 - SSIM) / 2 loss."""
    gan_weight: float = 0.05
    """Weight of the generator hinge loss; 0 turns the discriminator off (unless feature matching is on)."""
    feature_matching_weight: float = 0.0
    """Weight of discriminator feature matching (a perceptual stand-in, not an identity loss)."""
    identity_weight: float = 0.0
    """Weight of the identity loss: dlib face-descriptor distance of refined view and target (models.face.identity)."""
    face_feature_weight: float = 0.0
    """Weight of feature matching in dlib's face network (a face-specific perceptual loss)."""
    gan_start_step: int = 2000
    """Optimizer step from which the discriminator trains and the adversarial terms count (GAN warm-up)."""
    d_scales: int = 2
    """Discriminator image scales."""
    d_channels: int = 64
    """Discriminator base width."""
    d_layers: int = 3
    """Stride-2 layers per discriminator scale."""
    # ---- EMA, precision, reproducibility ---------------------------------------------------------------
    ema_decay: float = 0.999
    """EMA decay of the exported weights (with a (1 + t) / (10 + t) warm-up)."""
    bf16: bool = True
    """bf16 autocast on CUDA devices (ignored on CPU); master weights stay float32."""
    seed: int = 0
    """Seed of initialisation, data order, augmentation and noise."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (exact CUDA resume, slower)."""
    # ---- logging and checkpoints ---------------------------------------------------------------------------
    log_every: int = 10
    """Optimizer steps between scalar logs (averaged over the window and the ranks)."""
    image_every: int = 500
    """Steps between image grids (ref | input | output | target) in TensorBoard; 0: never."""
    ckpt_every: int = 1000
    """Steps between checkpoints (also written at the end of each stage); 0: only at stage ends."""
    keep_checkpoints: int = 3
    """Checkpoints kept (oldest removed first)."""
    val_every: int = 1000
    """Steps between validations of the EMA weights (when a validation set is given); 0: at the end only."""
    val_samples: int = 32
    """Validation samples evaluated (the first ones of the set)."""
    identity_metric: bool = True
    """Report the dlib identity distance in validation (a metric, no gradient; off without dlib)."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    max_wall_s: float = 0.0
    """Stop early (validate, checkpoint, export as at the end) once fit() has run this many seconds
    (training steps, validations and checkpoints all count); 0: no limit."""
    keep_best: bool = False
    """Also export the EMA weights of the best validation (highest val/psnr) to OUT/best: model
    selection on the validation set (keep its clips out of any later evaluation)."""
    export_base: bool = False
    """lora family: also write the frozen base (unet/, vae/) into the export; default: adapters on top of base."""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"expected family in {FAMILIES}, got {self.family!r}")
        if self.model_preset not in PRESETS:
            raise ValueError(f"expected model_preset in {PRESETS}, got {self.model_preset!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"expected lr_schedule in {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.resolution < 8 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"expected resolution >= 8, batch_size >= 1, grad_accum >= 1, got {self.resolution}, {self.batch_size}, {self.grad_accum}")
        if self.stage1_steps < 0 or self.stage2_steps < 0 or self.stage1_steps + self.stage2_steps < 1:
            raise ValueError(f"expected stage steps >= 0 and at least one step in all, got {self.stage1_steps} and {self.stage2_steps}")
        if not 0.0 <= self.noise_min <= self.noise_max <= 1.0:
            raise ValueError(f"expected 0 <= noise_min <= noise_max <= 1, got {self.noise_min} and {self.noise_max}")
        for name in ("lr", "lr_d", "l2_weight", "ssim_weight", "gan_weight", "feature_matching_weight", "identity_weight",
                     "face_feature_weight", "weight_decay", "max_grad_norm", "stage2_lr_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"expected {name} >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"expected ema_decay in [0, 1), got {self.ema_decay}")
        if self.log_every < 1 or self.keep_checkpoints < 1:
            raise ValueError(f"expected log_every >= 1 and keep_checkpoints >= 1, got {self.log_every} and {self.keep_checkpoints}")
        if min(self.image_every, self.ckpt_every, self.val_every, self.val_samples, self.gan_start_step, self.warmup_steps, self.num_workers) < 0:
            raise ValueError("expected image_every, ckpt_every, val_every, val_samples, gan_start_step, warmup_steps, num_workers >= 0")

    # ---- derived ------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    @property
    def uses_discriminator(self) -> bool:
        return self.gan_weight > 0 or self.feature_matching_weight > 0

    @property
    def discriminator(self) -> DiscriminatorConfig:
        return DiscriminatorConfig(scales=self.d_scales, channels=self.d_channels, layers=self.d_layers)

    def stage_of(self, step: int) -> tuple[int, int, int]:
        """(stage 0 | 1, step within the stage, stage length) of global optimizer step ``step``."""
        if step < self.stage1_steps:
            return 0, step, self.stage1_steps
        return 1, step - self.stage1_steps, self.stage2_steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at ``step``: per-stage linear warm-up, then constant or cosine; x stage2_lr_scale in stage 2."""
        stage, local, length = self.stage_of(step)
        factor = min(1.0, (local + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * local / max(length, 1)))
        return factor * (self.stage2_lr_scale if stage == 1 else 1.0)

    # ---- json ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"expected train config format_version {FORMAT_VERSION}, got {version}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"expected train config fields from {sorted(known)}, got unknown {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))
