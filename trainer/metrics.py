"""Per-step metrics: one JSON line per optimizer step in `metrics.jsonl`, the same as
TensorBoard scalars, and sample images in TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class SmoothedValue:
    """Exponential moving average with bias correction, so the first values are not damped
    towards zero."""

    def __init__(self, beta: float = 0.9):
        self.beta, self._avg, self._n = beta, 0.0, 0

    def update(self, value: float) -> float:
        self._n += 1
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        return self._avg / (1 - self.beta ** self._n) if self._n else float("nan")


class MetricsLog:
    def __init__(self, folder: Path, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / "metrics.jsonl", "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import
        self._tb = SummaryWriter(log_dir=str(folder / "tensorboard"))

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "epoch"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    self._tb.add_scalar(f"{key}/{sub}", v, step)
            elif isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)

    def log_image(self, tag: str, image, step: int) -> None:
        if self.enabled:
            self._tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
