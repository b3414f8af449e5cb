"""Uploads waiting in gradio's upload folder count against the workspace quota (issue 23).

Gradio's `/gradio_api/upload` route takes any file up to `max_file_size` from any visitor,
whether or not a handler ever uses it; `delete_cache` removes them only hours later. On a
shared server this middleware refuses an upload (HTTP 507, one sentence) while the workspace
and the waiting uploads together have reached the workspace quota, so repeated uploads cannot
fill the disk. Sizes are measured at most every few seconds (a walk of the folders).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from trainer.data.datasets import folder_bytes

MEASURE_SECONDS = 5.0
UPLOAD_PATH_SUFFIX = "/gradio_api/upload"


class UploadRoom:
    """An ASGI middleware: `quota()` is the byte limit (None: no limit), `folders()` the
    folders whose bytes count (the workspace and gradio's upload folder)."""

    def __init__(self, app, quota: Callable[[], int | None],
                 folders: Callable[[], list[Path]]) -> None:
        self.app = app
        self.quota = quota
        self.folders = folders
        self._lock = threading.Lock()
        self._measured_at = -MEASURE_SECONDS
        self._bytes = 0

    def used(self) -> int:
        with self._lock:
            now = time.monotonic()
            if now - self._measured_at >= MEASURE_SECONDS:
                self._bytes = sum(folder_bytes(f) for f in self.folders() if f.is_dir())
                self._measured_at = now
            return self._bytes

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path", "").rstrip("/").endswith(UPLOAD_PATH_SUFFIX)):
            quota = self.quota()
            if quota is not None and self.used() >= quota:
                await _refuse(send, "Upload refused: the workspace and the uploads waiting "
                                    "on this server have reached the workspace quota "
                                    "(--quota-gb); remove some files first.")
                return
        await self.app(scope, receive, send)


async def _refuse(send, text: str) -> None:
    body = text.encode("utf-8")
    await send({"type": "http.response.start", "status": 507,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
