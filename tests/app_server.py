"""A real Atelier server for tests: `python app.py` in a subprocess on a free port, offline,
with its output in a log file (the browser tests, the gradio_client tests and the shared-server
tests start theirs with these)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n"
                               + log.read_text(errors="replace")[-4000:])
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"app.py did not answer within {timeout} s:\n"
                       + log.read_text(errors="replace")[-4000:])


def spawn(log: Path, port: int, *extra: str) -> subprocess.Popen:
    """`python app.py --port PORT *extra`, its output appended to `log` (not yet answering)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    env.pop("ATELIER_WORKSPACE", None)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "app.py"), "--port", str(port), *extra],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def serve(workspace: Path, log: Path, *extra: str):
    """`python app.py` on a free port with `workspace`; yields its URL, stops it after."""
    port = free_port()
    process = spawn(log, port, *extra)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url, SERVER_START_TIMEOUT, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(predicate, timeout: float, what: str):
    """predicate()'s first truthy value within `timeout` seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")
