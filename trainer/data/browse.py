"""One concept folder as the page's dataset browser shows it: each image with its caption
(`<stem>.txt`) and whether it has a mask (`<stem>-masklabel.png`), small thumbnails, and
captions saved back atomically.

Listing reads no pixels (a folder of hundreds of photos lists at once); thumbnails are decoded
once and kept in a cache folder keyed by the files' modification times, so a refresh after
painting one mask redraws one thumbnail.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from trainer.data.dataset import read_caption_file
from trainer.data.images import (
    UnreadableImageError,
    is_image_file,
    mask_path_for,
    to_rgb,
)
from trainer.data.imports import check_room
from trainer.errors import DatasetError
from trainer.io import atomic_save_png, atomic_write_text
from trainer.limits import LIMIT_OPTIONS
from trainer.masks import painted
from trainer.masks.store import existing_mask

THUMBNAIL_SIZE = 256


@dataclass(frozen=True)
class Entry:
    image: Path
    caption: str | None   # None: no caption file yet
    has_mask: bool

    @property
    def name(self) -> str:
        return self.image.name

    def label(self) -> str:
        """The gallery's label: mask state first (the browser marks images without masks),
        then the file name and the caption."""
        state = "✓ mask" if self.has_mask else "✗ no mask"
        caption = self.caption if self.caption else "(no caption)"
        return f"{state} · {self.name} · {caption}"


def caption_path(image: Path | str) -> Path:
    """Where the caption of `image` lives: `<stem>.txt` beside it (as training reads it)."""
    return Path(image).with_suffix(".txt")


def read_caption(image: Path | str) -> str | None:
    """The caption text, or None when the image has no caption file."""
    path = caption_path(image)
    if not path.is_file():
        return None
    try:
        return read_caption_file(path)
    except OSError as error:
        raise DatasetError(f"Cannot read caption '{path}': {error.strerror or error}") from None


def check_folder(folder: Path | str) -> Path:
    """`folder` as a Path; DatasetError naming it when it is missing or not a folder."""
    raw = str(folder).strip()
    if not raw:
        raise DatasetError("No concept folder given: add one in the Data table.")
    path = Path(raw).expanduser()
    if not path.exists():
        raise DatasetError(f"Folder '{raw}' does not exist.")
    if not path.is_dir():
        raise DatasetError(f"'{raw}' is a file, not a folder.")
    return path


def list_entries(folder: Path | str, only_unmasked: bool = False) -> list[Entry]:
    """The folder's images (as training lists them: not recursive, masks and hidden files left
    out), sorted by name, each with its caption and mask state."""
    path = check_folder(folder)
    try:
        files = sorted((p for p in path.iterdir() if p.is_file() and is_image_file(p)),
                       key=lambda p: p.name)
    except OSError as error:
        raise DatasetError(f"Cannot list folder '{folder}': {error.strerror or error}") from None
    entries = []
    for image in files:
        has_mask = mask_path_for(image).is_file()
        if only_unmasked and has_mask:
            continue
        try:
            caption = read_caption(image)
        except DatasetError:
            caption = None  # the caption box says why when the image is opened
        entries.append(Entry(image, caption, has_mask))
    return entries


def save_caption(image: Path | str, text: str, max_chars: int | None = None, *,
                 limits=None, workspace: Path | str | None = None) -> Path:
    """Write `text` to the image's `<stem>.txt` atomically (never a half-written caption).

    Surrounding whitespace goes (training strips it anyway); line breaks stay, since several
    lines are alternative captions; Windows line endings become plain ones. A non-empty
    caption ends with a newline, as the text files of other tools (and the demo's) do.
    A shared server's bounds (None: none) refuse the write and keep the old caption: a
    caption longer than `max_chars` characters, or one that would pass the dataset's size
    limit or (with `workspace`) the workspace quota of `limits` (ImportLimits).
    """
    image = Path(image)
    if not image.is_file():
        raise DatasetError(f"Image '{image.name}' no longer exists; refresh the list.")
    text = "\n".join(line.rstrip() for line in (text or "").replace("\r\n", "\n").split("\n"))
    if max_chars is not None and len(text.strip()) > max_chars:
        raise DatasetError(f"Caption: {len(text.strip()):,} characters is more than the "
                           f"{max_chars:,} this server allows "
                           f"({LIMIT_OPTIONS['max_caption_chars']}); shorten it.")
    path = caption_path(image)
    content = text.strip() + "\n" if text.strip() else ""
    if limits is not None:
        old_size = path.stat().st_size if path.is_file() else 0
        check_room(image.parent, len(content.encode("utf-8")) - old_size, limits, workspace,
                   what=path.name)
    try:
        atomic_write_text(path, content)
    except OSError as error:
        raise DatasetError(f"Cannot write caption '{path}': {error.strerror or error}") from None
    return path


# --- Thumbnails ---------------------------------------------------------------------------------

def _stamp(path: Path) -> str:
    try:
        stat = path.stat()
        return f"{stat.st_mtime_ns}:{stat.st_size}"
    except OSError:
        return "-"


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not hide the photo
        return image


def _small_rgb(image_path: Path, size: int) -> Image.Image:
    """The image, upright, at most `size` px on its long side. JPEGs decode at a reduced
    scale (draft) that is still at least `size`: a 4000 px photo thumbnails in milliseconds."""
    with Image.open(image_path) as image:
        image.draft("RGB", (size, size))
        image.load()
        image = _upright(image)
        image = to_rgb(image)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


THUMBNAIL_MAX_AGE_DAYS = 30  # a thumbnail not listed for this long is deleted (prune_thumbnails)


def thumbnail(image_path: Path | str, cache_dir: Path | str,
              size: int = THUMBNAIL_SIZE) -> Path:
    """A PNG thumbnail of the image with its mask shown (outside dimmed), cached by the
    image's and mask's modification times. An unreadable image gets a grey placeholder.

    The file name is `<image key>-<version key>.png`: drawing a new version (the mask was
    painted) deletes the image's older ones, so the cache holds one thumbnail per image."""
    image_path = Path(image_path)
    mask_file = mask_path_for(image_path)
    image_key = _digest(f"{image_path.resolve()}|{size}", 16)
    version_key = _digest(f"{_stamp(image_path)}|{_stamp(mask_file)}", 8)
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{image_key}-{version_key}.png"
    if target.is_file():
        _touch(target)  # listed now: prune_thumbnails keeps it
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        small = _small_rgb(image_path, size)
        try:
            mask = existing_mask(image_path)
        except UnreadableImageError:
            mask = None
        shown = painted.overlay(small, mask.resize(small.size) if mask is not None else None)
    # Pillow raises many types on bad files (see images.open_image): a thumbnail is not worth
    # a failed listing, so any decoding failure draws the placeholder.
    except Exception:  # noqa: BLE001
        shown = Image.new("RGB", (size, size), (128, 128, 128))
    atomic_save_png(shown, target)  # two listings at once each write a whole file
    for older in cache_dir.glob(f"{image_key}-*.png"):
        if older != target:
            older.unlink(missing_ok=True)
    return target


def prune_thumbnails(cache_dir: Path | str,
                     max_age_days: float = THUMBNAIL_MAX_AGE_DAYS) -> int:
    """Delete the cache's thumbnails not listed for `max_age_days` (images since deleted or
    moved, folders no longer browsed); returns how many were deleted. Never raises: a cache
    that cannot be cleaned is only a cache."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return 0
    oldest = time.time() - max_age_days * 86400
    deleted = 0
    for file in cache_dir.glob("*.png"):
        try:
            if file.stat().st_mtime < oldest:
                file.unlink()
                deleted += 1
        except OSError:  # removed by another listing, or not ours to delete
            continue
    return deleted


def _digest(text: str, length: int) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves its thumbnails
        pass
