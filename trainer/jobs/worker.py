"""One training job in its own process: `python -m trainer.jobs.worker`, started by the job
queue through trainer/jobs/child.py.

Why a process per job: accelerate keeps process-wide state (AcceleratorState) that each job's
start resets, so two jobs in one process can disturb each other; in its own process each job
has its own, its own GPU (the parent sets CUDA_VISIBLE_DEVICES), and a crash or an
out-of-memory kill ends that job only.

The protocol, one JSON object or one word a line:
- stdin, first line: `{"config": {...}, "allow_custom_code": bool}`;
- stdin, then: `stop`, `sample`, `save` or `backup`, set on this job's Control as the page's
  buttons set them on a job in the server's own process;
- stdin at its end: the server is gone (killed, crashed), so this process ends at once, as a
  training thread of the killed server would have: the job is `running` in the store, and the
  restarted server continues it from its newest backup;
- stdout: the loop's Control events as they are emitted (`{"type": "progress", ...}`; a sample
  is its file's path), then `{"type": "result", ...}` (the TrainResult) or
  `{"type": "error", "message": ...}`. Whatever else writes to stdout (a library's print) is
  sent to stderr instead, so it cannot break the stream.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import traceback

from trainer.control import COMMANDS, Control
from trainer.errors import AtelierError

PARENT_PID_ENV = "ATELIER_PARENT_PID"
EXIT_PARENT_GONE = 3


def die_with_parent() -> None:
    """On Linux, the kernel kills this process when the server's thread that started it ends
    (also by SIGKILL, which no handler sees). Elsewhere the end of stdin does it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(PARENT_PID_ENV)
    if parent and os.getppid() != int(parent):  # it died before prctl took effect
        os._exit(EXIT_PARENT_GONE)


def read_commands(control: Control) -> None:
    """The server's requests, until stdin ends (the server is gone: end now)."""
    for line in sys.stdin:
        command = line.strip()
        if command == "stop":
            control.request_stop()
        elif command in COMMANDS:
            control.request(command)
    os._exit(EXIT_PARENT_GONE)


def main() -> int:
    die_with_parent()
    # The event stream gets the real stdout; file descriptor 1 becomes stderr.
    events = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    lock = threading.Lock()

    def send(event: dict) -> None:
        line = json.dumps(event)
        with lock:
            events.write(line + "\n")
            events.flush()

    request = json.loads(sys.stdin.readline() or "null")
    if request is None:
        return EXIT_PARENT_GONE
    control = Control(on_event=send)
    threading.Thread(target=read_commands, args=(control,), daemon=True,
                     name="atelier-commands").start()
    try:
        from trainer.config import config_from_dict
        from trainer.loop import train
        config = config_from_dict(request["config"], warn=lambda message: None)
        result = train(config, control, allow_custom_code=bool(request["allow_custom_code"]))
        send({"type": "result", **dataclasses.asdict(result)})
        return 0
    except AtelierError as error:
        send({"type": "error", "message": str(error)})
    except Exception as error:  # a bug: the trace goes to the server's log, not the page
        traceback.print_exc()
        send({"type": "error", "message": f"Training failed: {type(error).__name__}: {error}"})
    return 1


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stderr.flush()
    # Straight out: the result is sent and the files are closed; the interpreter's teardown
    # of torch and its threads would only keep the next job waiting.
    os._exit(code)
