"""Reading and writing one image's mask. Every write is atomic: the old mask is replaced only
after the new file is completely written, so no failed run ever loses a mask."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from trainer.data.images import load_mask, mask_path_for, oriented_size
from trainer.io import atomic_save_png, atomic_write_bytes


def existing_mask(image_path: Path | str) -> Image.Image | None:
    """The image's mask as an "L" image of the image's size, or None when it has none."""
    image_path = Path(image_path)
    path = mask_path_for(image_path)
    if not path.is_file():
        return None
    return load_mask(path, oriented_size(image_path), warn=None)


def write_mask(image_path: Path | str, mask: Image.Image, *, limits=None,
               workspace: Path | str | None = None, access=None, room=None) -> Path:
    """Save `mask` (converted to single-channel "L", resized to the image's own size when it
    differs) as `<stem>-masklabel.png` beside `image_path`; returns the mask's path.

    On a shared server (issue 23): `access` (trainer/ownership.py), when given, must let the
    caller write the mask; `limits` (ImportLimits) refuses a mask that would pass the
    dataset's size limit or, with `workspace`, the workspace quota (DatasetError naming the
    file) — the old mask is kept either way. A run over a folder passes one `room`
    (trainer.data.imports.Room.measure) instead, charged mask by mask, so the folders are
    measured once per run, not once per mask."""
    image_path = Path(image_path)
    path = mask_path_for(image_path)
    if access is not None:
        access.check_write(path, "mask")
    size = oriented_size(image_path)
    mask = mask if mask.mode == "L" else mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    if limits is None and room is None:
        atomic_save_png(mask, path)
        return path
    encoded = io.BytesIO()
    mask.save(encoded, format="PNG")
    data = encoded.getvalue()
    added = len(data) - (path.stat().st_size if path.is_file() else 0)
    if room is not None:
        room.take(added, path.name)
    else:
        from trainer.data.imports import check_room
        check_room(image_path.parent, added, limits, workspace, what=path.name)
    atomic_write_bytes(path, data)
    return path
