"""Reading and writing one image's mask. Every write is atomic: the old mask is replaced only
after the new file is completely written, so no failed run ever loses a mask."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer.data.images import load_mask, mask_path_for, oriented_size
from trainer.io import atomic_save_png


def existing_mask(image_path: Path | str) -> Image.Image | None:
    """The image's mask as an "L" image of the image's size, or None when it has none."""
    image_path = Path(image_path)
    path = mask_path_for(image_path)
    if not path.is_file():
        return None
    return load_mask(path, oriented_size(image_path), warn=None)


def write_mask(image_path: Path | str, mask: Image.Image) -> Path:
    """Save `mask` (converted to single-channel "L", resized to the image's own size when it
    differs) as `<stem>-masklabel.png` beside `image_path`; returns the mask's path."""
    image_path = Path(image_path)
    size = oriented_size(image_path)
    mask = mask if mask.mode == "L" else mask.convert("L")
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    path = mask_path_for(image_path)
    atomic_save_png(mask, path)
    return path
