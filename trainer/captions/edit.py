"""Bulk caption edits over a dataset: add or remove a trigger word, find and replace.

    summary = add_trigger("data/cat", "ohwx")
    print(summary.text())

Every image's `<stem>.txt` is edited line by line (each line is an alternative caption),
written atomically and only when its text changes; an image without a caption file is left
alone (reported as skipped), so an edit never creates captions the user did not write.

On a shared server an edit is bounded (issue 23): every new caption is worked out first, and
the whole edit is refused, before anything is written, when one of them would be longer than
`max_chars` (naming the file) or the captions together would pass the dataset's or the
workspace's quota (`limits`, trainer/data/imports.py). `access` (trainer/ownership.py), when
given, must let the caller write the folder.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainer.captions.generate import caption_path, list_images, read_caption, write_caption
from trainer.folder_runs import summary_text
from trainer.errors import CaptionError
from trainer.limits import LIMIT_OPTIONS

__all__ = ["EditSummary", "add_trigger", "edit_captions", "find_replace", "remove_trigger"]

SKIP_NO_CAPTION = "has no caption"


@dataclass
class EditSummary:
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (name, reason)
    replacements: int = 0    # find and replace: occurrences replaced

    def text(self, limit: int = 5) -> str:
        """E.g. "Changed 3 captions (7 replacements), 2 unchanged, skipped 1 (a.jpg: has no
        caption)." — at most `limit` names per list."""
        count = len(self.changed)
        head = f"Changed {count} caption{'' if count == 1 else 's'}"
        if self.replacements:
            head += f" ({self.replacements} replacement{'' if self.replacements == 1 else 's'})"
        parts = [head]
        if self.unchanged:
            parts.append(f"{len(self.unchanged)} unchanged")
        return summary_text(parts, self.skipped, self.failed, limit)


def edit_captions(folder: Path | str, edit: Callable[[str], tuple[str, int]],
                  recursive: bool = False, count_replacements: bool = False, *,
                  max_chars: int | None = None, limits=None,
                  workspace: Path | str | None = None, access=None) -> EditSummary:
    """Apply `edit(line) -> (new line, changes)` to every line of every caption of `folder`;
    write the captions that changed (with `count_replacements`, the changes are added up in
    `replacements`). A caption that cannot be read or written is listed in `failed` and left
    as it was.

    Bounds (None: none): `max_chars`, the longest caption an edit may leave (CaptionError
    naming the first file over it); `limits` (ImportLimits), the dataset's size limit and,
    with `workspace`, the workspace quota (DatasetError). Either refusal comes before any
    caption is written. `access`: ConfigError unless it may write `folder`."""
    if access is not None:
        access.check_write(folder, "folder")
    root = Path(folder).expanduser()
    summary = EditSummary()
    planned: list[tuple[Path, str, str, int]] = []   # (image, name, new text, changes)
    added = 0                                         # bytes the new captions add in all
    for image in list_images(folder, recursive):
        name = image.relative_to(root).as_posix()
        try:
            old = read_caption(image)
            if old is None:
                summary.skipped.append((name, SKIP_NO_CAPTION))
                continue
            lines, changes, length = [], 0, 0
            for line in old.replace("\r\n", "\n").split("\n"):
                try:
                    new, count = edit(line) if line.strip() else (line, 0)
                except _TooLong as too_long:  # refused before the long line was built
                    raise _too_long(image, length + too_long.length, max_chars,
                                    at_least=True) from None
                if new.strip() or not line.strip():  # a line the edit emptied goes
                    lines.append(new)
                    length += len(new) + 1
                    # Stop building a caption as soon as it is too long (an edit of a long
                    # caption of many lines must not grow it in memory first); one that was
                    # already that long is judged once it is whole (it may be unchanged).
                    if max_chars is not None and length - 1 > max(max_chars, len(old)):
                        raise _too_long(image, length - 1, max_chars, at_least=True)
                changes += count
            new_text = "\n".join(lines)
            if new_text == old:
                summary.unchanged.append(name)
                continue
            if max_chars is not None and len(new_text.strip()) > max_chars:
                raise _too_long(image, len(new_text.strip()), max_chars)
            if limits is not None:
                added += (len(new_text.strip().encode("utf-8")) + 1
                          - caption_path(image).stat().st_size)
            planned.append((image, name, new_text, changes))
        except OSError as error:
            summary.failed.append((name, _unwritable(image, error)))
    if limits is not None and added > 0:
        from trainer.data.imports import check_room
        check_room(root, added, limits, workspace, what=f"the edited captions of '{root.name}'")
    for image, name, new_text, changes in planned:
        try:
            write_caption(image, new_text)
        except OSError as error:
            summary.failed.append((name, _unwritable(image, error)))
            continue
        summary.changed.append(name)
        if count_replacements:
            summary.replacements += changes
    return summary


class _TooLong(Exception):
    """An edit's line would pass the length limit (raised before the line is built)."""

    def __init__(self, length: int):
        self.length = length


def _too_long(image: Path, length: int, max_chars: int, at_least: bool = False) -> CaptionError:
    how_long = f"{'at least ' if at_least else ''}{length:,} characters long"
    return CaptionError(f"{caption_path(image).name}: the edit would make this caption "
                        f"{how_long}, more than this server allows ({max_chars:,} characters, "
                        f"{LIMIT_OPTIONS['max_caption_chars']}); nothing was changed.")


def _unwritable(image: Path, error: OSError) -> str:
    return (f"cannot read or write its caption ({caption_path(image).name}): "
            f"{error.strerror or error}")


def _trigger(word: str) -> str:
    word = " ".join(str(word or "").split())
    if not word:
        raise CaptionError("trigger word: empty; give the word to add or remove, e.g. 'ohwx'")
    return word


def _starts_with(word: str) -> re.Pattern:
    """The trigger at the start of a line as a whole word (any case), with the comma or space
    that follows it: "ohwx" matches "ohwx, a cat" and "OHWX cat", not "ohwxyz, a cat"."""
    return re.compile(rf"^\s*{re.escape(word)}(?=$|[\s,.;:!?])[\s,;]*", re.IGNORECASE)


def add_trigger(folder: Path | str, word: str, recursive: bool = False,
                **bounds) -> EditSummary:
    """Put `word` at the start of every caption ("ohwx, a cat on a sofa"); a caption that
    already starts with it is left as it is, so adding twice is adding once."""
    word = _trigger(word)
    pattern = _starts_with(word)

    def edit(line: str) -> tuple[str, int]:
        if pattern.match(line):
            return line, 0
        rest = line.strip().lstrip(",; ")
        return (f"{word}, {rest}" if rest else word), 1

    return edit_captions(folder, edit, recursive, **bounds)


def remove_trigger(folder: Path | str, word: str, recursive: bool = False,
                   **bounds) -> EditSummary:
    """Take `word` (and the comma after it) off the start of every caption that starts with
    it; the word elsewhere in a caption is part of the description and stays."""
    pattern = _starts_with(_trigger(word))

    def edit(line: str) -> tuple[str, int]:
        new, count = pattern.subn("", line, count=1)
        return new.strip(), count

    return edit_captions(folder, edit, recursive, **bounds)


def find_replace(folder: Path | str, find: str, replace_with: str,
                 recursive: bool = False, **bounds) -> EditSummary:
    """Replace every occurrence of the plain text `find` (case-sensitive, not a pattern) by
    `replace_with` in every caption; an empty `replace_with` deletes it. `bounds`: the
    keyword bounds of `edit_captions` (max_chars, limits, workspace, access)."""
    find = str(find or "")
    if not find.strip():
        raise CaptionError("find: empty; give the text to look for")
    if "\n" in find or "\n" in str(replace_with or ""):
        raise CaptionError("find and replace work within a caption line; the text may not "
                           "hold a line break")
    replace_with = str(replace_with or "")
    max_chars = bounds.get("max_chars")

    def edit(line: str) -> tuple[str, int]:
        count = line.count(find)
        grown = len(line) + count * (len(replace_with) - len(find))
        if count and max_chars is not None and grown > max_chars:
            raise _TooLong(grown)  # known before the line is built
        return (line.replace(find, replace_with), count) if count else (line, 0)

    return edit_captions(folder, edit, recursive, count_replacements=True, **bounds)
