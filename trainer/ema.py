"""Exponential moving average of the trained weights (SPEC §2 EMA).

Written here rather than with diffusers' EMAModel for two reasons: its decay warm-up returns 0
at the first update where the spec asks min((1 + t)/(10 + t), decay) at optimizer step t, and
it cannot average weights that live on the GPU into shadows kept in system memory (EMA CPU).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


class WeightEMA:
    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float,
                 device: torch.device | str):
        self.params = list(params)
        self.decay = decay
        # float32 shadows: an average of small updates vanishes in half precision
        self.shadow = [p.detach().to(device, torch.float32, copy=True) for p in self.params]

    def decay_at(self, step: int) -> float:
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend the current weights in, at optimizer step `step`: shadow = d·shadow +
        (1 − d)·weight. One foreach call over all tensors (not a Python loop of small
        kernels); weights on another device or in another dtype are copied over first, all
        copies issued before the one wait for them."""
        if not self.params:
            return
        decay = self.decay_at(step)
        params = [p.detach() for p in self.params]
        if any(p.device != s.device or p.dtype != s.dtype for p, s in zip(params, self.shadow)):
            non_blocking = self.shadow[0].device.type == "cpu" and params[0].device.type == "cuda"
            params = [p.to(s.device, torch.float32, non_blocking=non_blocking)
                      for p, s in zip(params, self.shadow)]
            if non_blocking:
                torch.cuda.current_stream(self.params[0].device).synchronize()
        torch._foreach_mul_(self.shadow, decay)
        torch._foreach_add_(self.shadow, params, alpha=1 - decay)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration (samples, saves), then the trained
        ones back, bit for bit. The trained copy waits in system memory."""
        kept = [p.detach().to("cpu", copy=True) for p in self.params]
        try:
            for param, shadow in zip(self.params, self.shadow):
                param.copy_(shadow.to(param.device, param.dtype))
            yield
        finally:
            for param, original in zip(self.params, kept):
                param.copy_(original.to(param.device))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved.to(shadow.device))
