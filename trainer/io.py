"""Files written so that a crash or a full disk never leaves a half-written output: write to
a temporary name in the same folder, then rename over the target (atomic on one filesystem)."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from trainer.errors import AtelierError

# torch and safetensors are imported where a tensor file is written: the light CLI commands
# (dataset import) write JSON and text through this module and should not pay torch's import.
if TYPE_CHECKING:
    import torch


def _temporary(path: Path) -> Path:
    """A name of its own for each write: the page's handlers run on several threads of one
    process, and two writes of one file (a mask saved while a folder run writes it) must
    not share a temporary file."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_png(image: Image.Image, path: str | Path) -> None:
    """Write `image` as PNG; an existing file at `path` is replaced only once the new one is
    complete, so a failed write (full disk, crash, an encoder error) keeps the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        image.save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# Written inside every model folder `atomic_folder` (and the diffusers export) makes: the
# swap replaces only a folder that holds it, i.e. one a model write made itself.
MODEL_MARKER = ".atelier-model"
# Folders written before the marker existed: a diffusers model folder (model_index.json) is
# still replaced, but only when nothing in it says it is something else (a job's record, the
# job database, a dataset's owner file). A folder that merely holds config.json is not.
LEGACY_MODEL_FILE = "model_index.json"
NOT_A_MODEL = ("job.json", "jobs.db", ".owner")


def replaceable(path: Path) -> bool:
    """Whether the folder at `path` may be replaced by a new model folder: it does not exist,
    is empty, or is a model folder a model write made (see MODEL_MARKER)."""
    if not os.path.lexists(path):
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    if any(os.path.lexists(path / name) for name in NOT_A_MODEL):
        return False
    if not any(path.iterdir()):
        return True
    return (path / MODEL_MARKER).is_file() or (path / LEGACY_MODEL_FILE).is_file()


def refuse_unless_replaceable(path: Path) -> None:
    if not replaceable(path):
        raise AtelierError(f"'{path}' is not a model folder that Atelier wrote (it holds "
                           "something else, or is a link or a file); it is not replaced. "
                           "Choose a new folder.")


def mark_model_folder(folder: Path) -> None:
    """Mark `folder` (a staging folder about to become a model folder) as a model write's."""
    (Path(folder) / MODEL_MARKER).write_text(
        "A model folder written by Atelier: a later save may replace it whole.\n",
        encoding="utf-8")


def replace_folder(new: Path, path: Path) -> None:
    """Put folder `new` at `path`; an existing model folder there is moved aside first and
    removed only once the new one is in place. Refused (AtelierError) when `path` is not a
    replaceable model folder (checked again here, just before the swap)."""
    path, old = Path(path), None
    refuse_unless_replaceable(path)
    if os.path.lexists(path):
        old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path` to write into; when the block ends without
    error the staging folder (marked as a model folder) replaces `path`, otherwise it is
    removed. A folder found at `path` is therefore always whole (a model that a crash
    half-wrote is never loaded). Only a model folder a model write made is replaced: never a
    job folder, a dataset, or anything else (refused before anything is written)."""
    path = Path(path)
    refuse_unless_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an output folder is shared
        yield staging
        mark_model_folder(staging)
        replace_folder(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
