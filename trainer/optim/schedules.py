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


def lr_curve(config, total_steps: int) -> list[float]:
    """The base LR at every optimizer step of a run (for the page's plot)."""
    return [config.learning_rate * lr_multiplier(
        step, total_steps, config.learning_rate_scheduler,
        warmup=config.learning_rate_warmup_steps, min_factor=config.learning_rate_min_factor,
        cycles=config.learning_rate_cycles) for step in range(total_steps)]
