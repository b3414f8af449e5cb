"""Learning-rate schedules as plain functions of the optimizer step, exactly as SPEC §2 writes
them, so the page can draw the curve before training and the tests can check chosen points.

`step` counts optimizer updates (accumulation already divided out), from 0.
"""
from __future__ import annotations

import math

from trainer.config import LearningRateScheduler as S

REX_D = 0.9


def warmup_steps(warmup: float, total_steps: int) -> int:
    """A value > 1 is a number of steps, a value <= 1 a fraction of all steps."""
    return int(warmup) if warmup > 1 else int(round(warmup * total_steps))


def lr_multiplier(step: int, total_steps: int, scheduler: S, *, warmup: float = 0,
                  min_factor: float = 0.0, cycles: float = 1.0) -> float:
    warm = warmup_steps(warmup, total_steps)
    if step < warm:
        return step / warm
    s = step - warm
    n = max(total_steps - warm, 1)

    def floor(v: float) -> float:  # never below min_factor x LR
        return min_factor + (1 - min_factor) * v

    if scheduler == S.CONSTANT:
        return 1.0
    if scheduler == S.LINEAR:
        return floor(max(n - s, 0) / n)
    if scheduler == S.COSINE:
        return floor(0.5 * (1 + math.cos(math.pi * min(s, n) / n)))
    if scheduler == S.COSINE_WITH_RESTARTS:
        p = min(s, n - 1) / n
        return floor(0.5 * (1 + math.cos(2 * math.pi * cycles * p)))
    if scheduler == S.COSINE_WITH_HARD_RESTARTS:
        p = min(s, n - 1) / n
        return floor(0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1))))
    if scheduler == S.REX:
        if s >= n:
            return floor(0.0)
        p = s / n
        return floor((1 - p) / ((1 - REX_D) + REX_D * (1 - p)))
    raise ValueError(f"learning_rate_scheduler {scheduler.value} has no formula here")


class Schedule:
    """Sets each parameter group's LR before every optimizer step.

    Formula schedules scale each group's own base LR (so per-part LRs keep their ratio);
    CUSTOM steps the user's torch scheduler after each update; ADAFACTOR leaves the LR to
    Adafactor (relative_step)."""

    def __init__(self, config, optimizer, *, steps_per_epoch: int, total_steps: int,
                 allow_custom_code: bool):
        self.config, self.optimizer, self.total_steps = config, optimizer, total_steps
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.custom = None
        if config.learning_rate_scheduler == S.CUSTOM:
            from trainer.optim.custom import build_custom_scheduler
            # the plain optimizer, not accelerate's wrapper, so torch sees its steps
            self.custom = build_custom_scheduler(
                config, getattr(optimizer, "optimizer", optimizer), steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                allow_custom_code=allow_custom_code)

    def before_step(self, step: int) -> float | None:
        """Set the LRs for update number `step` (from 0); returns the formula's factor."""
        scheduler = self.config.learning_rate_scheduler
        if scheduler in (S.CUSTOM, S.ADAFACTOR):
            return None
        factor = lr_multiplier(step, self.total_steps, scheduler,
                               warmup=self.config.learning_rate_warmup_steps,
                               min_factor=self.config.learning_rate_min_factor,
                               cycles=self.config.learning_rate_cycles)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return factor

    def after_step(self) -> None:
        if self.custom is not None:
            self.custom.step()

    def state_dict(self) -> dict:
        return {"custom": self.custom.state_dict() if self.custom is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.custom is not None and state.get("custom") is not None:
            self.custom.load_state_dict(state["custom"])


def lr_curve(config, total_steps: int, *, steps_per_epoch: int | None = None,
             allow_custom_code: bool = False) -> list[float]:
    """The base LR at every optimizer step of a run, without training (the page plots it).
    ADAFACTOR's own schedule depends on the gradients and has no curve: returns []."""
    if config.learning_rate_scheduler == S.ADAFACTOR:
        return []
    import torch
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = Schedule(config, probe, total_steps=total_steps,
                        steps_per_epoch=steps_per_epoch or max(total_steps // config.epochs, 1),
                        allow_custom_code=allow_custom_code)
    curve = []
    for step in range(total_steps):
        schedule.before_step(step)
        curve.append(probe.param_groups[0]["lr"])
        probe.step()  # no gradient, so nothing moves; torch expects a step before the schedule's
        schedule.after_step()
    return curve
