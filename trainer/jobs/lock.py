"""A job folder the server is running holds a lock file, `.server.lock`, locked by the server
(flock) for as long as the job runs. `python -m trainer train` refuses to write into such a
folder: two trainings writing one folder's backups and metrics would corrupt both.

An OS lock, not just a file with a pid: a server killed with SIGKILL leaves the file, but the
kernel drops the lock with the process, so the folder is free again at once.
"""
from __future__ import annotations

import os
from pathlib import Path

from trainer.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid in the file is checked instead
    fcntl = None

LOCK_NAME = ".server.lock"


class FolderLock:
    """Held while a job runs in `folder`."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+", encoding="utf-8")
        if fcntl is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file.seek(0)
        self._file.truncate()
        self._file.write(str(os.getpid()))
        self._file.flush()

    def release(self) -> None:
        if self._file is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self._file.close()  # closing drops the flock
            self._file = None


def is_held(lock_file: Path) -> bool:
    """Whether a running server holds `lock_file` now."""
    if fcntl is None:
        try:
            pid = int(lock_file.read_text().strip())
            os.kill(pid, 0)
            return True
        except (OSError, ValueError):
            return False
    try:
        with open(lock_file, "a+", encoding="utf-8") as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(probe, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def refuse_server_job_folders(paths: dict[str, str | Path]) -> None:
    """ConfigError naming the key when a path ({key: path}) lies in a job folder a server is
    running now."""
    for key, value in paths.items():
        if not value:
            continue
        path = Path(value).expanduser().resolve()
        for folder in (path, *path.parents):
            lock = folder / LOCK_NAME
            if lock.is_file() and is_held(lock):
                raise ConfigError(
                    f"{key}: '{value}' is inside {folder}, the folder of a job that an Atelier "
                    "server is running now. Choose another folder, or stop that job first.")
