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


# A folder holding one of these is a model folder, which atomic_folder may replace.
MODEL_MARKERS = ("model_index.json", "config.json")


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside `path` to write into; when the block ends without
    error the staging folder replaces `path`, otherwise it is removed. A folder found at
    `path` is therefore always whole (a model that a crash half-wrote is never loaded)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not any(
            (path / marker).is_file() for marker in MODEL_MARKERS):
        raise AtelierError(f"'{path}' is a folder that holds something other than a model; "
                           "it is not replaced. Choose a new folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; an output folder is shared
        yield staging
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
