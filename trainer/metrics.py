"""Per-step metrics: one JSON line per optimizer step in `metrics.jsonl`, the same as
TensorBoard scalars, and sample images in TensorBoard; and `PendingSteps`, which holds each
step's loss on the device until it is read back in one go."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch


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
    """`metrics.jsonl` and TensorBoard events in `folder`.

    A run that continues from a backup at step N (after a crash, a kill, a server restart)
    logs steps N+1… again, which an earlier run in the same folder may have logged before it
    died. TensorBoard hides those: the event writer is opened at the first step this run
    logs, with `purge_step` = that step, so events an earlier run wrote from that step on are
    discarded and each step shows once. (metrics.jsonl is cut back by the job queue,
    trainer/jobs/resume.py.)"""

    def __init__(self, folder: Path, enabled: bool = True):
        self.enabled = enabled
        self._folder = folder
        self._file = None
        self._tb = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / "metrics.jsonl", "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import
        self._summary_writer = SummaryWriter

    def _writer(self, first_step: int):
        """The TensorBoard writer, opened at this run's first logged step (see the class)."""
        if self._tb is None:
            self._tb = self._summary_writer(log_dir=str(self._folder / "tensorboard"),
                                            purge_step=first_step)
        return self._tb

    def log_step(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        tb = self._writer(step)
        for key, value in record.items():
            if key in ("step", "epoch"):
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    tb.add_scalar(f"{key}/{sub}", v, step)
            elif isinstance(value, (int, float)):
                tb.add_scalar(key, value, step)

    def log_image(self, tag: str, image, step: int) -> None:
        if self.enabled:
            self._writer(step).add_image(tag, np.asarray(image.convert("RGB")), step,
                                         dataformats="HWC")

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()


class PendingSteps:
    """Finished optimizer steps whose loss is still a tensor on the device.

    Reading a CUDA tensor on the host (`.item()`, `bool(torch.isfinite(...))`) waits for the
    GPU to finish everything queued before it; done every step, it stops the host from
    preparing the next step while the GPU computes this one. So the loop keeps each step's
    loss on the device and reads a batch of them back with one transfer (`flush`), every
    `interval` seconds of host time and whenever it must know (before a sample, backup or
    save, at a stop, at the end). On a CPU the read costs nothing: `interval` 0 flushes
    every step, and the watcher hears of each step as soon as it ends.
    """

    def __init__(self, interval: float):
        self.interval = interval
        self._records: list[dict] = []
        self._losses: list[torch.Tensor] = []
        self._last_flush = time.monotonic()

    def add(self, record: dict, loss: torch.Tensor) -> None:
        self._records.append(record)
        self._losses.append(loss.detach().float().reshape(()))

    def due(self) -> bool:
        return bool(self._records) and (
            self.interval <= 0 or time.monotonic() - self._last_flush >= self.interval)

    def __len__(self) -> int:
        return len(self._records)

    def flush(self) -> list[tuple[dict, float]]:
        """The pending records with their losses as floats, oldest first (one host sync)."""
        if not self._records:
            return []
        values = torch.stack(self._losses).tolist()
        records, self._records, self._losses = self._records, [], []
        self._last_flush = time.monotonic()
        return list(zip(records, values))
