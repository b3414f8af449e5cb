"""The server's side of a job that trains in its own process (trainer/jobs/worker.py, which
describes the protocol).

`TrainInChild` is called as `trainer.loop.train(config, control, allow_custom_code=...)` is,
from the job's TrainingSession thread: it starts the child, replays the child's events on
`control` (so the session's state, the footer, the plots, the samples and the job store see
the same events as before), passes Stop / Sample now / Save now / Backup now on to the child,
and returns the child's TrainResult or raises TrainingError: the child's own message, or, for
a child that died (a crash, an out-of-memory kill), its exit code and last lines of stderr.

Stop before the first step: a job still preparing (loading the model, counting, caching) has
nothing to save, and the loop only looks at Stop between steps; so the child is ended at
once (SIGTERM, then SIGKILL) and the job ends stopped, its folder as it was (a backup it
continues from stays for a later run).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import traceback
from collections import deque
from pathlib import Path
from typing import IO

from trainer.config import TrainConfig
from trainer.control import COMMANDS, Control
from trainer.errors import TrainingError
from trainer.jobs.worker import EXIT_PARENT_GONE, PARENT_PID_ENV

POLL_SECONDS = 0.1   # how soon a Stop or a Sample now reaches the child
TERMINATE_GRACE_SECONDS = 3.0  # a child stopped before its first step: SIGTERM, then SIGKILL
STDERR_TAIL = 12     # lines of a dead child's stderr quoted in the job's error
REPO_ROOT = Path(__file__).resolve().parents[2]


def cuda_device_count() -> int:
    import torch
    return torch.cuda.device_count()


def child_environment(slot: int, concurrency: int, gpus: int,
                      base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the job in `slot`: pinned to one GPU (slot N on the Nth GPU this
    server sees, counted modulo `gpus`), or on a CPU shared by `concurrency` jobs, a fair
    share of the cores each (torch's default, all of them each, has the jobs spin against
    one another)."""
    env = dict(os.environ if base is None else base)
    if gpus:
        visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
        names = ([name.strip() for name in visible.split(",")] if visible
                 else [str(index) for index in range(gpus)])
        env["CUDA_VISIBLE_DEVICES"] = names[slot % gpus]
    elif concurrency > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // concurrency))
    env[PARENT_PID_ENV] = str(os.getpid())
    # `python -m trainer.jobs.worker` finds this engine wherever the server was started from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def crash_message(code: int, stderr_tail: list[str]) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"was killed by {name}"
        if -code == signal.SIGKILL:
            how += " (the system does this when memory runs out)"
    elif code == EXIT_PARENT_GONE:
        how = "lost its connection to the server"
    else:
        how = f"ended with exit code {code}"
    message = f"The job's training process {how} before the job ended."
    if stderr_tail:
        message += " Its last output:\n" + "\n".join(stderr_tail)
    return message


class TrainInChild:
    def __init__(self, env: dict[str, str], label: str = "job"):
        self.env = env
        self.label = label            # prefixes the child's stderr lines in the server's log
        self.pid: int | None = None   # the child's, while it runs

    def __call__(self, config: TrainConfig, control: Control, *,
                 allow_custom_code: bool = False):
        # Started from this thread, which lives as long as the child: on Linux the child's
        # death signal is tied to the thread that started it (worker.die_with_parent).
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer.jobs.worker"], env=self.env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, encoding="utf-8", errors="replace", bufsize=1)
        self.pid = process.pid
        ended: dict = {}  # "result" / "error" from the child; "stepped" once a step is done
        tail: deque[str] = deque(maxlen=STDERR_TAIL)
        events = threading.Thread(target=self._read_events, args=(process.stdout, control, ended),
                                  daemon=True, name=f"atelier-{self.label}-events")
        errors = threading.Thread(target=self._read_errors, args=(process.stderr, tail),
                                  daemon=True, name=f"atelier-{self.label}-stderr")
        events.start()
        errors.start()
        try:
            self._send(process, json.dumps({"config": config.model_dump(mode="json"),
                                            "allow_custom_code": allow_custom_code}))
            stop_sent = terminated = False
            while events.is_alive():  # until the child's stdout ends: it has exited
                if control.stop_requested and not stop_sent:
                    self._send(process, "stop")
                    stop_sent = True
                if stop_sent and not terminated and "stepped" not in ended:
                    terminated = self._terminate(process)
                for command in COMMANDS:
                    if control.take_request(command):
                        self._send(process, command)
                events.join(POLL_SECONDS)
            code = process.wait()
            errors.join(5)  # a grandchild still holding stderr must not hold the job
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stdin:
                try:
                    process.stdin.close()
                except OSError:
                    pass
            self.pid = None
        from trainer.loop import TrainResult
        if "result" in ended:
            return TrainResult(**ended["result"])
        if "error" in ended:
            raise TrainingError(ended["error"])
        if terminated:
            control.emit("status", message="Stopped before the first step: nothing was "
                                           "trained, so nothing was saved.")
            return TrainResult("", 0, 0, True)
        raise TrainingError(crash_message(code, list(tail)))

    @staticmethod
    def _terminate(process: subprocess.Popen) -> bool:
        """End a child that has not trained a step yet: SIGTERM, SIGKILL after a grace."""
        try:
            process.terminate()
            process.wait(TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
        except OSError:
            pass
        return True

    @staticmethod
    def _send(process: subprocess.Popen, line: str) -> None:
        try:
            process.stdin.write(line + "\n")
            process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the child has died; its exit code tells why

    @staticmethod
    def _read_events(stream: IO[str], control: Control, ended: dict) -> None:
        for line in stream:
            try:
                event = json.loads(line)
                kind = event.pop("type")
            except (ValueError, KeyError, AttributeError):
                continue  # not ours (cut short by a kill)
            if kind == "result":
                ended["result"] = event
            elif kind == "error":
                ended["error"] = event["message"]
            else:
                if kind == "progress":
                    ended["stepped"] = True
                try:
                    control.emit(kind, **event)
                except Exception:  # a listener's bug: keep reading, or the child blocks
                    traceback.print_exc()

    def _read_errors(self, stream: IO[str], tail: deque) -> None:
        """The child's stderr into the server's log, its last lines kept for a crash."""
        for line in stream:
            line = line.rstrip("\n")
            tail.append(line)
            print(f"[{self.label}] {line}", file=sys.stderr, flush=True)
