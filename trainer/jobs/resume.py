"""What a job folder holds when its job runs again: after a restart, the newest backup to
continue from (or none: from step 0), and metrics cut back to that step so the steps redone
replace the ones lost, and every step is logged once. Also the first backup of a job that asks
to continue an earlier run (`continue_last_backup`): copied from where that run left it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainer.backup import PREFIX, list_backups
from trainer.io import atomic_write_text

METRICS_NAME = "metrics.jsonl"


def newest_backup_step(folder: Path) -> int | None:
    """The step of the newest complete backup in a job folder, or None."""
    found = list_backups(Path(folder) / "backup")
    if not found:
        return None
    progress = json.loads((found[-1] / "progress.json").read_text(encoding="utf-8"))
    return int(progress["step"])


def cut_metrics(folder: Path, last_step: int) -> None:
    """Keep only the metrics of steps up to `last_step` (0: none)."""
    path = Path(folder) / METRICS_NAME
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the kill
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _written_at(backup: Path) -> float:
    try:
        return float(json.loads((backup / "progress.json").read_text())["written_at"])
    except (OSError, ValueError, KeyError):
        return 0.0


def seed_backup(target_folder: Path, sources: list[Path]) -> Path | None:
    """Copy the newest backup found under any of `sources` (run folders) into the job
    folder's backup/, so that `continue_last_backup` finds it there. Hard links where the
    filesystem allows (a fine-tune backup is the size of the model), else copies."""
    found = [b for source in sources for b in list_backups(Path(source) / "backup")]
    if not found:
        return None
    newest = max(found, key=_written_at)
    target = Path(target_folder) / "backup" / newest.name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = target.with_name(f".tmp-{PREFIX}seed")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(newest, tmp, copy_function=link_or_copy)
    tmp.rename(target)
    return target
