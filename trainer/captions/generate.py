"""Automatic captions for a whole folder with a captioning model (Florence-2 or BLIP).

    summary = caption_folder("data/cat", CaptionSettings(model="models/florence-2-base",
                                                         mode="fill", prefix="ohwx cat"))
    print(summary.text())

Each image's caption is `<stem>.txt` beside it, as training reads it. Every write is atomic
(trainer.io), and a caption is written only once the model has produced a non-empty one for
that image: a failure (an unreadable image, an error in the model) leaves the caption the user
typed as it was, is reported, and the run goes on with the next image.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from trainer.captions.models import (
    DEFAULT_CAPTION_MODEL,
    DEFAULT_MAX_LENGTH,
    Captioner,
    check_style,
    load_captioner,
    tidy,
)
from trainer.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    is_image_file,
    load_image_rgb,
)
from trainer.errors import CaptionError, DatasetError
from trainer.folder_runs import folder_images, summary_text
from trainer.io import atomic_write_text

__all__ = [
    "CaptionMode", "CaptionPreview", "CaptionSettings", "CaptionSummary", "caption_folder",
    "caption_path", "join_caption", "list_images", "preview_caption", "read_caption",
    "write_caption",
]

MAX_LENGTH_LIMIT = 1024  # tokens; Florence-2's own examples ask for at most this many

SKIP_HAS_CAPTION = "has a caption"
EMPTY_CAPTION = "the model returned an empty caption"


class CaptionMode(str, Enum):
    FILL = "fill"        # only images without a caption (an empty caption file counts as none)
    REPLACE = "replace"  # every image


@dataclass
class CaptionSettings:
    model: str = DEFAULT_CAPTION_MODEL  # a local model folder or a hub id
    mode: CaptionMode | str = "fill"
    style: str = "short"                # short or detailed
    prefix: str = ""                    # put before each new caption, e.g. a trigger word
    suffix: str = ""                    # put after it, e.g. a style tag
    max_length: int | None = None       # tokens generated at most; None: the style's default
    online: bool = False                # a hub id may be downloaded (a Space always may)

    def check(self) -> None:
        """Raise CaptionError naming the first bad field."""
        _resolve(self)


@dataclass(frozen=True)
class _Plan:
    model: str
    mode: CaptionMode
    style: str
    prefix: str
    suffix: str
    max_length: int
    online: bool


def _resolve(settings: CaptionSettings) -> _Plan:
    try:
        mode = (settings.mode if isinstance(settings.mode, CaptionMode)
                else CaptionMode(str(settings.mode).strip().lower()))
    except ValueError:
        options = ", ".join(member.value for member in CaptionMode)
        raise CaptionError(f"mode: {settings.mode!r} is not one of {options}") from None
    style = check_style(settings.style)
    model = str(settings.model or "").strip()
    if not model:
        raise CaptionError(f"model: empty; give a captioning model folder or hub id "
                           f"(default {DEFAULT_CAPTION_MODEL})")
    if settings.max_length in (None, ""):
        max_length = DEFAULT_MAX_LENGTH[style]
    else:
        try:
            number = float(settings.max_length)
        except (TypeError, ValueError):
            number = math.nan
        if (isinstance(settings.max_length, bool) or not number.is_integer()
                or not 1 <= number <= MAX_LENGTH_LIMIT):
            raise CaptionError(f"max length: must be a whole number of tokens from 1 to "
                               f"{MAX_LENGTH_LIMIT}, got {settings.max_length!r}")
        max_length = int(number)
    return _Plan(model=model, mode=mode, style=style, prefix=tidy(settings.prefix or ""),
                 suffix=tidy(settings.suffix or ""), max_length=max_length,
                 online=bool(settings.online))


# --------------------------------------------------------------------------------------------
# Caption files


def caption_path(image: Path | str) -> Path:
    """Where the caption of `image` lives: `<stem>.txt` beside it (as training reads it)."""
    return Path(image).with_suffix(".txt")


def read_caption(image: Path | str) -> str | None:
    """The image's caption, or None when it has no caption file. Decoded whatever editor
    wrote it (the dataset's own reader); OSError when the file cannot be read."""
    from trainer.data.dataset import read_caption_file

    path = caption_path(image)
    return read_caption_file(path) if path.is_file() else None


def write_caption(image: Path | str, text: str) -> Path:
    """Write `text` as the image's caption, atomically (a crash or a full disk leaves the old
    caption whole), ending with a newline as the dataset's other caption files do."""
    path = caption_path(image)
    text = "\n".join(line.strip() for line in str(text).replace("\r\n", "\n").split("\n"))
    atomic_write_text(path, text.strip() + "\n" if text.strip() else "")
    return path


_END_OF_SENTENCE = re.compile(r"[.!?…]$")


def join_caption(*parts: str) -> str:
    """Join prefix, caption and suffix with ", ", e.g. ("ohwx cat", "a cat on a sofa") ->
    "ohwx cat, a cat on a sofa". Empty parts are left out and stray commas at the joins are
    dropped; after a full stop the next part follows with a space instead ("A cat sleeps.
    ohwx style"), since ", " after a period reads as a typo."""
    pieces = [tidy(part).strip(" ,;") for part in parts]
    text = ""
    for piece in (piece for piece in pieces if piece):
        if not text:
            text = piece
        elif _END_OF_SENTENCE.search(text):
            text += " " + piece
        else:
            text += ", " + piece
    return text


# --------------------------------------------------------------------------------------------
# Images


def list_images(folder: Path | str, recursive: bool = False) -> list[Path]:
    """The training images of `folder`, sorted; CaptionError when it is missing or holds none."""
    return folder_images(folder, recursive, CaptionError, "caption")


def _has_caption(image: Path) -> bool:
    """A caption file with some text in it (an empty one is a caption not written yet).
    OSError when it exists but cannot be read."""
    text = read_caption(image)
    return bool(text and text.strip())


def _new_caption(image: Path, plan: _Plan, captioner: Captioner) -> str:
    """The caption a run writes for `image`: the model's, with the prefix and suffix.
    UnreadableImageError for a bad image; CaptionError when the model says nothing."""
    made = captioner(load_image_rgb(image), plan.style, plan.max_length)
    if not made:
        raise CaptionError(EMPTY_CAPTION)
    return join_caption(plan.prefix, made, plan.suffix)


# --------------------------------------------------------------------------------------------
# Preview


@dataclass
class CaptionPreview:
    caption: str        # what a run would write: the model's caption with prefix and suffix
    generated: str      # the model's caption alone
    old: str | None     # the caption on disk now (None: no caption file)
    note: str           # what a run would do, e.g. "would be skipped: has a caption"


def preview_caption(image_path: Path | str, settings: CaptionSettings) -> CaptionPreview:
    """What a run with `settings` would write for one image; writes nothing. The caption is
    made even when a run would skip the image (fill mode, it has one), to compare."""
    plan = _resolve(settings)
    path = Path(image_path).expanduser()
    if not path.exists():
        raise CaptionError(f"Image '{path}' does not exist")
    if not path.is_file():
        raise CaptionError(f"'{path}' is a folder, not an image")
    if not is_image_file(path):
        raise CaptionError(f"'{path.name}' is not a training image "
                           f"(expected {', '.join(IMAGE_EXTENSIONS)}, not a mask)")
    try:
        old = read_caption(path)
    except OSError as error:
        raise CaptionError(f"Cannot read caption '{caption_path(path)}': "
                           f"{error.strerror or error}") from None
    captioner = load_captioner(plan.model, online=plan.online)
    try:
        image = load_image_rgb(path)
    except UnreadableImageError as error:
        raise CaptionError(str(error)) from None
    generated = captioner(image, plan.style, plan.max_length)
    if not generated:
        raise CaptionError(f"'{path.name}': {EMPTY_CAPTION}")
    has_caption = bool(old and old.strip())
    if plan.mode is CaptionMode.FILL and has_caption:
        note = f"would be skipped: {SKIP_HAS_CAPTION}"
    else:
        note = "would replace its caption" if has_caption else "would write a new caption"
    return CaptionPreview(caption=join_caption(plan.prefix, generated, plan.suffix),
                          generated=generated, old=old, note=note)


# --------------------------------------------------------------------------------------------
# A folder


@dataclass
class CaptionSummary:
    captioned: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (name, reason)
    total: int = 0           # images in the folder
    stopped: bool = False    # should_stop() ended the run early

    def text(self, limit: int = 5) -> str:
        """E.g. "Captioned 4 images, skipped 1 (cat.jpg: has a caption), failed 1 (bad.jpg:
        cannot read the image: ...)." — at most `limit` names per list."""
        count = len(self.captioned)
        parts = [f"Captioned {count} image{'' if count == 1 else 's'}"]
        text = summary_text(parts, self.skipped, self.failed, limit)
        if self.stopped:
            done = count + len(self.skipped) + len(self.failed)
            text = f"Stopped after {done} of {self.total} images. " + text
        return text


def caption_folder(
    folder: Path | str,
    settings: CaptionSettings,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    recursive: bool = False,
    room=None,
) -> CaptionSummary:
    """Caption every image of `folder` with `settings`; returns what was captioned, skipped
    and failed (names relative to the folder, with reasons).

    progress(done, total, name) is called after each image; should_stop() is asked before
    each one. Bad settings, a missing folder or model raise CaptionError before anything is
    written; an unreadable image, a model error or a failed write is listed in `failed`, its
    caption left as it was, and the run goes on. `room` (trainer.data.imports.Room: a
    shared server's quotas) is charged caption by caption: a caption that would pass a
    quota is not written, and the run stops there.
    """
    plan = _resolve(settings)
    images = list_images(folder, recursive)
    root = Path(folder).expanduser()
    captioner = load_captioner(plan.model, online=plan.online)  # once, before the first image
    summary = CaptionSummary(total=len(images))
    for done, path in enumerate(images, start=1):
        if should_stop is not None and should_stop():
            summary.stopped = True
            break
        name = path.relative_to(root).as_posix()
        try:
            # Decided before the image is decoded: fill mode never runs the model on an
            # image it keeps.
            if plan.mode is CaptionMode.FILL and _has_caption(path):
                summary.skipped.append((name, SKIP_HAS_CAPTION))
            else:
                text = _new_caption(path, plan, captioner)
                if room is not None:
                    old = caption_path(path)
                    room.take(len(text.encode("utf-8")) + 1
                              - (old.stat().st_size if old.is_file() else 0), old.name)
                write_caption(path, text)
                summary.captioned.append(name)
        except UnreadableImageError as error:
            summary.failed.append((name, f"cannot read the image: {error.reason}"))
        except DatasetError as error:  # a quota (after its subclass above): nothing more fits
            summary.failed.append((name, str(error)))
            summary.stopped = True
            break
        except CaptionError as error:
            summary.failed.append((name, str(error)))
        except OSError as error:  # reading or writing its caption: no permission, full disk ...
            summary.failed.append((name, f"cannot read or write its caption "
                                         f"({caption_path(path).name}): "
                                         f"{error.strerror or error}"))
        # The model failing on one image (an odd size, out of memory) must not cost the rest
        # of the folder: report it with the first line of the error.
        except Exception as error:  # noqa: BLE001
            summary.failed.append((name, f"the model failed: {_first_line(error)}"))
        if progress is not None:
            progress(done, len(images), name)
    return summary


def _first_line(error: Exception) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."
