"""Automatic masks for a whole folder: text-prompted segmentation (CLIPSeg), the image's alpha
channel, or a colour key, combined with any existing masks by a mode.

    summary = generate_masks("data/cat", MaskSettings(method="clipseg", prompt="a cat"))
    print(summary.text())

Each method gives a focus map in [0, 1] at the image's size; `ops.shape_mask` turns it into a
mask (threshold, then grow, then smooth) and `ops.combine` merges it with the old mask. Every
write goes through `store.write_mask` (atomic), so no existing mask is ever lost, and one bad
image is reported and skipped while the rest of the folder is done.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    is_image_file,
    is_mask_file,
    mask_path_for,
    open_image,
    to_rgb,
)
from trainer.errors import DatasetError, MaskError
from trainer.folder_runs import folder_images, summary_text
from trainer.masks import ops
from trainer.masks.clipseg import DEFAULT_CLIPSEG_MODEL, ClipSegmenter, load_clipseg
from trainer.masks.store import existing_mask, write_mask

__all__ = [
    "DEFAULT_CLIPSEG_MODEL", "MaskMethod", "MaskMode", "MaskPreview", "MaskSettings",
    "MaskSummary", "generate_masks", "list_images", "parse_color", "preview_mask",
]

MAX_RADIUS = 512  # px, for grow and smooth; more is a typo, and slow on large images

SKIP_HAS_MASK = "has a mask"
SKIP_NO_MASK_TO_SUBTRACT = "has no mask to subtract from"
SKIP_NO_ALPHA = "has no alpha channel"


class MaskMethod(str, Enum):
    CLIPSEG = "clipseg"  # text-prompted segmentation
    ALPHA = "alpha"      # the image's own alpha channel: opaque = focus
    COLOR = "color"      # colour key: everything not the background colour = focus


class MaskMode(str, Enum):
    REPLACE = "replace"    # write the new mask for every image
    FILL = "fill"          # only for images without a mask
    ADD = "add"            # old mask plus the new area
    SUBTRACT = "subtract"  # old mask less the new area


@dataclass
class MaskSettings:
    method: MaskMethod | str = "clipseg"
    mode: MaskMode | str = "replace"
    prompt: str = ""                      # clipseg: what to keep in focus, e.g. "a person"
    model: str = DEFAULT_CLIPSEG_MODEL    # clipseg: a local model folder or a hub id
    color: str = "#ffffff"                # colour key: the background colour
    tolerance: int = 30                   # colour key: max channel difference (0-255) counted as background
    threshold: float = 0.3                # focus map > threshold is in the mask (0-1)
    smooth: int = 0                       # blur radius of the edges, px
    grow: int = 0                         # dilate the mask by this many px

    def check(self) -> None:
        """Raise MaskError naming the first bad field."""
        _resolve(self)


@dataclass(frozen=True)
class _Plan:
    """MaskSettings checked and normalised."""
    method: MaskMethod
    mode: MaskMode
    prompt: str
    model: str
    color: tuple[int, int, int]
    tolerance: int
    threshold: float
    smooth: int
    grow: int


def _choice(enum: type[Enum], name: str, value) -> Enum:
    try:
        return value if isinstance(value, enum) else enum(str(value).strip().lower())
    except ValueError:
        options = ", ".join(member.value for member in enum)
        raise MaskError(f"{name}: {value!r} is not one of {options}") from None


def _whole(name: str, value, low: int, high: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not number.is_integer() or not low <= number <= high:
        raise MaskError(f"{name}: must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def parse_color(text: str) -> tuple[int, int, int]:
    """'#RRGGBB' (also '#RGB', or 'rgb(r, g, b)' / 'rgba(r, g, b, a)' as colour pickers
    return) -> (r, g, b); MaskError naming the field otherwise."""
    value = str(text).strip().lower()
    hex_match = re.fullmatch(r"#?([0-9a-f]{6}|[0-9a-f]{3})", value)
    if hex_match:
        digits = hex_match.group(1)
        if len(digits) == 3:
            digits = "".join(c * 2 for c in digits)
        return tuple(int(digits[i:i + 2], 16) for i in (0, 2, 4))
    rgb_match = re.fullmatch(r"rgba?\(\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*(,\s*[\d.]+\s*)?\)",
                             value)
    if rgb_match:
        channels = [float(rgb_match.group(i)) for i in (1, 2, 3)]
        if all(0 <= c <= 255 for c in channels):
            return tuple(round(c) for c in channels)
    raise MaskError(f"color: {text!r} is not a colour; write it as '#RRGGBB', e.g. '#00ff00'")


def _resolve(settings: MaskSettings) -> _Plan:
    method = _choice(MaskMethod, "method", settings.method)
    mode = _choice(MaskMode, "mode", settings.mode)
    prompt = str(settings.prompt or "").strip()
    model = str(settings.model or "").strip()
    if method is MaskMethod.CLIPSEG:
        if not prompt:
            raise MaskError("prompt: empty; the clipseg method needs a prompt saying what to "
                            "keep in focus, e.g. 'a person'")
        if not model:
            raise MaskError(f"model: empty; give a CLIPSeg model folder or hub id "
                            f"(default {DEFAULT_CLIPSEG_MODEL})")
    color = parse_color(settings.color) if method is MaskMethod.COLOR else (255, 255, 255)
    try:
        threshold = float(settings.threshold)
    except (TypeError, ValueError):
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise MaskError(f"threshold: must be from 0 to 1, got {settings.threshold!r}")
    return _Plan(
        method=method, mode=mode, prompt=prompt, model=model, color=color,
        tolerance=_whole("tolerance", settings.tolerance, 0, 255),
        threshold=threshold,
        smooth=_whole("smooth", settings.smooth, 0, MAX_RADIUS),
        grow=_whole("grow", settings.grow, 0, MAX_RADIUS),
    )


# --------------------------------------------------------------------------------------------
# One image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _read(path: Path) -> tuple[Image.Image, Image.Image]:
    """(decoded image as stored but upright, the same as 8-bit RGB); UnreadableImageError."""
    image = open_image(path)
    try:
        return image, to_rgb(image)
    except Exception as error:  # noqa: BLE001 - as load_image_rgb: modes Pillow cannot convert
        raise UnreadableImageError(path, f"unsupported colour mode {image.mode} ({error})") from None


def _focus_map(image: Image.Image, rgb: Image.Image, plan: _Plan,
               segmenter: ClipSegmenter | None) -> np.ndarray | None:
    """The method's H x W focus map in [0, 1]; None when the method does not apply (an alpha
    mask for an image without alpha)."""
    if plan.method is MaskMethod.ALPHA:
        if not _has_alpha(image):
            return None
        return np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0
    if plan.method is MaskMethod.COLOR:
        pixels = np.asarray(rgb, dtype=np.int16)
        distance = np.abs(pixels - np.array(plan.color, dtype=np.int16)).max(axis=2)
        return (distance > plan.tolerance).astype(np.float32)
    return segmenter(rgb, plan.prompt)


def _skip_reason(mode: MaskMode, has_mask: bool) -> str | None:
    if mode is MaskMode.FILL and has_mask:
        return SKIP_HAS_MASK
    if mode is MaskMode.SUBTRACT and not has_mask:
        return SKIP_NO_MASK_TO_SUBTRACT
    return None


def _segmenter(plan: _Plan) -> ClipSegmenter | None:
    return load_clipseg(plan.model) if plan.method is MaskMethod.CLIPSEG else None


# --------------------------------------------------------------------------------------------
# Preview


@dataclass
class MaskPreview:
    image: Image.Image            # RGB, upright
    old_mask: Image.Image | None  # "L", the mask on disk now (None: none, or unreadable)
    new_mask: Image.Image         # "L", what the image's mask would be after a run
    overlay: Image.Image          # RGB, the image with new_mask tinted
    note: str                     # what a run would do, e.g. "would be skipped: has a mask"


def preview_mask(image_path: Path | str, settings: MaskSettings) -> MaskPreview:
    """What a run with `settings` would make of one image; writes nothing.

    When a run would skip the image, new_mask is the mask it keeps (the method's result when
    it has none) and the note says why.
    """
    plan = _resolve(settings)
    path = Path(image_path)
    if not path.exists():
        raise MaskError(f"Image '{path}' does not exist")
    if not path.is_file():
        raise MaskError(f"'{path}' is a folder, not an image")
    if is_mask_file(path):
        raise MaskError(f"'{path.name}' is a mask, not a training image")
    if not is_image_file(path):
        raise MaskError(f"'{path.name}' is not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
    try:
        image, rgb = _read(path)
    except UnreadableImageError as error:
        raise MaskError(str(error)) from None

    has_mask = mask_path_for(path).is_file()
    old, unreadable = None, ""
    if has_mask:
        try:
            old = existing_mask(path)
        except UnreadableImageError as error:
            unreadable = f"its mask cannot be read ({error.reason})"
    focus = _focus_map(image, rgb, plan, _segmenter(plan))
    if focus is None:
        raise MaskError(f"'{path.name}' {SKIP_NO_ALPHA}: the alpha method needs images with "
                        "transparency (PNG or WebP)")
    made = ops.shape_mask(focus, plan.threshold, plan.grow, plan.smooth)

    skip = _skip_reason(plan.mode, has_mask)
    if skip:
        new, note = (old if old is not None else made), f"would be skipped: {skip}"
    elif unreadable and plan.mode in (MaskMode.ADD, MaskMode.SUBTRACT):
        new, note = made, f"would fail: {unreadable}"
    else:
        new = ops.combine(plan.mode.value, old, made)
        if plan.mode is MaskMode.ADD and old is not None:
            note = "would add to its mask"
        elif plan.mode is MaskMode.SUBTRACT:
            note = "would remove this area from its mask"
        else:
            note = "would replace its mask" if has_mask else "would write a new mask"
        if unreadable:
            note = f"{unreadable}; {note}"
    return MaskPreview(image=rgb, old_mask=old, new_mask=new, overlay=ops.overlay(rgb, new),
                       note=note)


# --------------------------------------------------------------------------------------------
# A folder


@dataclass
class MaskSummary:
    written: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (name, reason)
    total: int = 0           # images in the folder
    stopped: bool = False    # should_stop() ended the run early

    def text(self, limit: int = 5) -> str:
        """E.g. "Wrote 4 masks, skipped 1 (cat.jpg: has a mask), failed 1 (bad.jpg: cannot
        read the image: ...)." — at most `limit` names per list."""
        count = len(self.written)
        parts = [f"Wrote {count} mask{'' if count == 1 else 's'}"]
        text = summary_text(parts, self.skipped, self.failed, limit)
        if self.stopped:
            done = count + len(self.skipped) + len(self.failed)
            text = f"Stopped after {done} of {self.total} images. " + text
        return text


def list_images(folder: Path | str, recursive: bool = False) -> list[Path]:
    """The training images of `folder`, sorted; MaskError when it is missing or holds none."""
    return folder_images(folder, recursive, MaskError, "mask")


def _mask_for(path: Path, plan: _Plan, segmenter: ClipSegmenter | None) -> tuple[Image.Image | None, str]:
    """(the mask to write, "") or (None, why the image is skipped). Raises
    UnreadableImageError for an unreadable image or old mask."""
    has_mask = mask_path_for(path).is_file()
    skip = _skip_reason(plan.mode, has_mask)
    if skip:  # decided before decoding anything: fill never even reads an existing mask
        return None, skip
    image, rgb = _read(path)
    focus = _focus_map(image, rgb, plan, segmenter)
    if focus is None:
        return None, SKIP_NO_ALPHA
    made = ops.shape_mask(focus, plan.threshold, plan.grow, plan.smooth)
    old = existing_mask(path) if has_mask and plan.mode in (MaskMode.ADD, MaskMode.SUBTRACT) else None
    return ops.combine(plan.mode.value, old, made), ""


def generate_masks(
    folder: Path | str,
    settings: MaskSettings,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    recursive: bool = False,
    room=None,
) -> MaskSummary:
    """Make masks for every image of `folder` with `settings`; returns what was written,
    skipped and failed (names relative to the folder, with reasons).

    progress(done, total, name) is called after each image; should_stop() is asked before
    each one. Bad settings, a missing folder or model raise MaskError before anything is
    written; an unreadable image or a failed write is listed in `failed` and the run goes on.
    `room` (trainer.data.imports.Room: a shared server's quotas) is charged mask by mask: a
    mask that would pass a quota is not written, and the run stops there (every later one
    would be refused too).
    """
    plan = _resolve(settings)
    images = list_images(folder, recursive)
    root = Path(folder).expanduser()
    segmenter = _segmenter(plan)  # loaded once, before the first image
    summary = MaskSummary(total=len(images))
    for done, path in enumerate(images, start=1):
        if should_stop is not None and should_stop():
            summary.stopped = True
            break
        name = path.relative_to(root).as_posix()
        try:
            mask, skip = _mask_for(path, plan, segmenter)
            if mask is None:
                summary.skipped.append((name, skip))
            else:
                write_mask(path, mask, room=room)
                summary.written.append(name)
        except UnreadableImageError as error:
            what = "its mask" if error.path == mask_path_for(path) else "the image"
            summary.failed.append((name, f"cannot read {what}: {error.reason}"))
        except DatasetError as error:  # a quota (after its subclass above): nothing more fits
            summary.failed.append((name, str(error)))
            summary.stopped = True
            break
        except OSError as error:  # writing: full disk, no permission ...
            summary.failed.append((name, f"cannot write its mask: {error.strerror or error}"))
        if progress is not None:
            progress(done, len(images), name)
    return summary
