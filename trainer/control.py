"""The channel between a running loop and whoever watches it (the session, the CLI).

The loop only emits events and reads requests; it never knows who listens. Thread-safe: the
page's thread asks for a stop or a sample while the training thread runs.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

Event = dict[str, Any]

COMMANDS = ("sample", "save", "backup")


class Control:
    def __init__(self, on_event: Callable[[Event], None] | None = None):
        self._on_event = on_event or (lambda event: None)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._requests: set[str] = set()

    # -- asked by the watcher --
    def request_stop(self) -> None:
        self._stop.set()

    def request(self, command: str) -> None:
        if command not in COMMANDS:
            raise ValueError(f"Unknown command '{command}'; one of {', '.join(COMMANDS)}")
        with self._lock:
            self._requests.add(command)

    # -- read by the loop --
    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def take_request(self, command: str) -> bool:
        with self._lock:
            if command in self._requests:
                self._requests.discard(command)
                return True
            return False

    def emit(self, kind: str, **data: Any) -> None:
        self._on_event({"type": kind, **data})
