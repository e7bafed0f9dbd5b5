"""The refiner's noise maths: the DDPM schedule its single step indexes, the "variable noise"
added to the novel views, and the one-step x0 prediction (a one-step scheduler, diffusers-style).

    a_t   = prod_{i <= t} (1 - beta_i)                  DDPM cumulative alpha (SD: scaled-linear betas)
    z_s'  = sqrt(a(s)) z + sqrt(1 - a(s)) e             s in [0, 1]: timestep round(s (T + 1)) - 1, a(0) = 1
    x0    = (z_t - sqrt(1 - a_T) e^) / sqrt(a_T)        epsilon prediction (DDPM x0) at the U-Net timestep T
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import RefinerConfig


def alphas_cumprod(config: RefinerConfig) -> Tensor:
    """DDPM cumulative alphas [num_train_timesteps] (float32), as diffusers' DDPMScheduler computes them."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
    )
    return scheduler.alphas_cumprod.to(torch.float32)


class OneStepSchedule:
    """The coefficients of the refiner's single step at timestep T = config.timestep.

    Plain Python floats and one float32 table (not module buffers, which .to(dtype) would round).
    """

    def __init__(self, config: RefinerConfig):
        ab = alphas_cumprod(config)
        a_t = float(ab[config.timestep])
        self.timestep = config.timestep
        self.prediction_type = config.prediction_type
        self.sqrt_a_t = a_t**0.5  # x0 coefficients at the U-Net timestep T
        self.sqrt_1m_a_t = (1.0 - a_t) ** 0.5
        # a(s) for s = i / (T + 1): index 0 is the clean latent, index T + 1 is timestep T.
        self.noise_table = torch.cat([torch.ones(1), ab[: config.timestep + 1]])  # [T + 2] float32

    def to(self, device: torch.device) -> "OneStepSchedule":
        """Move the noise table (done by Refiner.prepare, else on first use)."""
        self.noise_table = self.noise_table.to(device)
        return self

    def noise_coefficients(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """s [B] noise levels in [0, 1] -> (sqrt(a(s)), sqrt(1 - a(s))), each [B] float32 on s's device."""
        if self.noise_table.device != s.device:
            self.to(s.device)
        idx = torch.round(s * (self.timestep + 1)).long()  # [B] in 0..T+1
        a = self.noise_table[idx]  # [B] float32
        return a.sqrt(), (1.0 - a).sqrt()

    def x0(self, z_t: Tensor, pred: Tensor) -> Tensor:
        """One-step DDPM x0 from the U-Net output at timestep T. z_t, pred: [..., C, h, w]."""
        kind = self.prediction_type
        if kind == "epsilon":
            return (z_t - self.sqrt_1m_a_t * pred) / self.sqrt_a_t
        if kind == "v_prediction":
            return self.sqrt_a_t * z_t - self.sqrt_1m_a_t * pred
        if kind == "residual":
            return z_t - pred
        return pred
