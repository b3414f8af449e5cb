"""One training job at a time, in a background thread, with its state readable at any moment.

A job belongs to the server, not to a browser tab: the page (and anyone else holding the
session) polls `state()`; reloading the page shows the job as it is. `start` returns at once.
"""
from __future__ import annotations

import copy
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from trainer.config import TrainConfig
from trainer.control import Control, Event
from trainer.errors import AtelierError
from trainer.security import confine_config

HISTORY_LIMIT = 5000  # points kept for the loss/LR plots


class JobAlreadyRunning(AtelierError):
    pass


@dataclass
class JobState:
    status: str = "idle"          # idle | running | stopping | finished | stopped | failed
    message: str = "No training has run yet."
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    epoch_step: int = 0
    steps_per_epoch: int = 0
    loss: float | None = None
    smooth_loss: float | None = None
    lr: dict[str, float] = field(default_factory=dict)
    eta_seconds: float | None = None
    elapsed_seconds: float = 0.0
    samples: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    loss_history: list[tuple[int, float, float]] = field(default_factory=list)
    lr_history: list[tuple[int, float]] = field(default_factory=list)
    # (step, validation loss) of each measurement, and the best one as (loss, step)
    validation_history: list[tuple[int, float]] = field(default_factory=list)
    best_validation: tuple[float, int] | None = None
    output_path: str | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.status in ("running", "stopping")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainingSession:
    def __init__(self, allow_custom_code: bool = False,
                 workspace_root: str | Path | None = None, *,
                 listener: Callable[[Event], None] | None = None,
                 on_end: Callable[[JobState], None] | None = None,
                 train_fn: Callable | None = None) -> None:
        """`workspace_root` set = shared/public server: every path in a config is confined to
        it, and custom code is off whatever `allow_custom_code` says. `listener` hears every
        event of the loop after the state took it, and `on_end` gets the final state (the
        job queue keeps its database in step with them); `train_fn` stands in for
        `trainer.loop.train` (the queue's TrainInChild, which trains in a child process and
        replays its events here; tests' stand-ins)."""
        self.listener = listener
        self.on_end = on_end
        self._train_fn = train_fn
        self.workspace_root = Path(workspace_root) if workspace_root else None
        # Custom schedules import code named in a config: only for a server run by its user.
        self.allow_custom_code = allow_custom_code and self.workspace_root is None
        self._lock = threading.Lock()
        self._state = JobState()
        self._thread: threading.Thread | None = None
        self._control: Control | None = None
        self._config: TrainConfig | None = None
        self._started_at = 0.0

    # -- control --------------------------------------------------------------------------

    def start(self, config: TrainConfig) -> None:
        """Start a job in the background; refused while one runs."""
        if self.workspace_root is not None:
            config = confine_config(config, self.workspace_root)
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                raise JobAlreadyRunning(
                    "A training job is already running; stop it or wait for it to finish "
                    "before starting another.")
            self._state = JobState(status="running", message="Starting")
            self._config = config
            self._control = Control(on_event=self._on_event)
            self._started_at = time.monotonic()
            self._thread = threading.Thread(target=self._run, args=(config, self._control),
                                            name="atelier-training", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Graceful: the job finishes its current step, saves, and ends."""
        with self._lock:
            if self._control is None or not self._state.running:
                return
            self._state.status = "stopping"
            self._state.message = "Stopping after the current step"
            self._control.request_stop()

    def request(self, command: str) -> None:
        """'sample', 'save' or 'backup' while running (taken after the current step)."""
        with self._lock:
            if self._control is None or not self._state.running:
                raise AtelierError("No training job is running.")
            self._control.request(command)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends; True if it has ended."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def state(self) -> JobState:
        """A consistent snapshot, safe to read from any thread."""
        with self._lock:
            snapshot = copy.deepcopy(self._state)
        if snapshot.running:
            snapshot.elapsed_seconds = self._elapsed()
        return snapshot

    def job_config(self) -> TrainConfig | None:
        """The config of the current (or last) job, as it was started: a page opened while
        it runs shows these settings, not the defaults."""
        with self._lock:
            return self._config

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- the job's thread -------------------------------------------------------------------

    def _run(self, config: TrainConfig, control: Control) -> None:
        try:
            self._train(config, control)
        finally:
            if self.on_end is not None:
                self.on_end(self.state())

    def _train(self, config: TrainConfig, control: Control) -> None:
        if self._train_fn is not None:
            train = self._train_fn
        else:
            from trainer.loop import train  # heavy imports stay out of module import
        try:
            result = train(config, control, allow_custom_code=self.allow_custom_code)
            with self._lock:
                self._state.status = "stopped" if result.stopped_early else "finished"
                self._state.output_path = result.output_path
                self._state.eta_seconds = 0.0 if not result.stopped_early else None
                self._state.elapsed_seconds = self._elapsed()
        except AtelierError as error:
            self._fail(str(error))
        except Exception as error:  # a bug: keep the trace in the server log, not the page
            traceback.print_exc()
            self._fail(f"Training failed: {type(error).__name__}: {error}")

    def _elapsed(self) -> float:
        """Seconds since Start. Kept in the state when the job ends, so an ended job shows
        its duration, not the 0 of a job that never ran."""
        return time.monotonic() - self._started_at

    def _fail(self, message: str) -> None:
        with self._lock:
            self._state.elapsed_seconds = self._elapsed()
            self._state.status = "failed"
            self._state.error = message
            self._state.message = message

    def _on_event(self, event: Event) -> None:
        kind = event["type"]
        with self._lock:
            s = self._state
            if kind == "status":
                if s.status != "stopping" or "Stopped" in event["message"]:
                    s.message = event["message"]
            elif kind == "warning":
                s.warnings.append(event["message"])
            elif kind == "started":
                s.total_steps, s.steps_per_epoch = event["total_steps"], event["steps_per_epoch"]
                s.epochs = event["epochs"]
            elif kind == "progress":
                for key in ("step", "total_steps", "epoch_step", "steps_per_epoch", "loss",
                            "smooth_loss", "lr", "eta_seconds", "epochs"):
                    setattr(s, key, event[key])
                s.epoch = event["epoch"]
                s.loss_history.append((event["step"], event["loss"], event["smooth_loss"]))
                s.lr_history.append((event["step"], max(event["lr"].values(), default=0.0)))
                del s.loss_history[:-HISTORY_LIMIT], s.lr_history[:-HISTORY_LIMIT]
            elif kind == "validation":
                s.validation_history.append((event["step"], event["values"]["validation_loss"]))
                s.best_validation = tuple(event["best"])
                del s.validation_history[:-HISTORY_LIMIT]
            elif kind == "sample":
                s.samples.append({k: event[k] for k in ("path", "prompt", "step", "epoch")})
            elif kind == "saved":
                s.output_path = event["path"]
        if self.listener is not None:
            self.listener(event)
