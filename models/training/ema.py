"""Exponential moving average of the trained parameters (what gets exported).

    ema <- d_t ema + (1 - d_t) theta,   d_t = min(decay, (1 + t) / (10 + t))

t counts optimizer steps; the warm-up term (as in TensorFlow's
ExponentialMovingAverage with num_updates) lets the average follow the fast
early changes instead of holding on to the random initialisation. Only the
parameters the optimizer trains are averaged (for LoRA: the adapters); the
averages are float32 whatever the model's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """Shadow copies of named parameters; ``swapped(model)`` puts them into the model for a while."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"expected an EMA decay in [0, 1), got {decay}")
        if not named_params:
            raise ValueError("expected parameters to average, got none")
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in named_params}
        self._shadows = list(self.shadow.values())  # the same tensors, in params' order (load_state_dict copies in place)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current parameters in after optimizer step ``step`` (0-based)."""
        d = self.decay_at(step)
        # one multi-tensor op (a few kernels on CUDA) instead of one lerp per parameter
        torch._foreach_lerp_(self._shadows, [p.detach().float() for p in self.params.values()], 1.0 - d)

    @contextmanager
    @torch.no_grad()
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the EMA weights; the trained ones come back after."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        for n, p in self.params.items():
            p.copy_(self.shadow[n])
        try:
            yield
        finally:
            for n, p in self.params.items():
                p.copy_(backup[n])

    def state_dict(self) -> dict[str, Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"expected EMA tensors for the trained parameters, got {len(missing)} missing (e.g. {missing[:2]}) and {len(extra)} unknown (e.g. {extra[:2]})")
        for n, t in state.items():
            if t.shape != self.shadow[n].shape:
                raise ValueError(f"expected EMA tensor {n} of shape {tuple(self.shadow[n].shape)}, got {tuple(t.shape)}")
            self.shadow[n].copy_(t)
