"""Names of imported files, folders and datasets: kept readable (any script, accents, emoji)
but safe as one path component on Linux, macOS and Windows.

People name photos in their own language, so nothing is transliterated. What goes is what
could move a file somewhere else or hide what it is: path separators, control and
bidirectional-override characters (which make 'gnp.exe' look like 'exe.png'), leading dots
(hidden files), trailing dots and spaces (Windows drops them, so two names could meet), and
Windows' reserved device names. Names are NFC-normalised: macOS writes 'é' as 'e' + a
combining accent, Linux and Windows as one character; without it the same file arriving from
two machines would become two files.
"""
from __future__ import annotations

import re
import unicodedata

from trainer.data.images import MASK_EXTENSION, MASK_SUFFIX
from trainer.errors import DatasetError

# Bytes of UTF-8 per component. Linux allows 255; the margin leaves room for the temporary
# names that atomic writes add ('.<name>.<pid>.<hex>.tmp') and for tools that append suffixes.
MAX_NAME_BYTES = 150
# Stems are cut to MAX_NAME_BYTES less this, whatever the file's own suffix: 'x.png', 'x.txt'
# and 'x-masklabel.png' must keep one stem, or a long-named image loses its caption and mask.
_SUFFIX_ROOM = 16
# Characters Windows refuses in file names, besides the separators.
_FORBIDDEN = set('/\\<>:"|?*')
# Explicit direction marks and overrides/isolates: invisible, and able to reorder what is shown.
_BIDI = {chr(c) for c in (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F),
                          *range(0x2066, 0x206A))}
# Control characters, line/paragraph separators, lone surrogates (an undecodable byte in a
# file name read from disk arrives as one) and private-use code points.
_UNSAFE_CATEGORIES = {"Cc", "Cs", "Zl", "Zp", "Co"}
_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$",
             *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10)),
             *(f"COM{d}" for d in "¹²³"), *(f"LPT{d}" for d in "¹²³")}
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeName(ValueError):
    """An entry name that cannot be made safe (it escapes its folder, or nothing is left)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def entry_parts(raw: str) -> list[str]:
    """The folder/file components of an archive or folder entry name, as written.

    Backslashes count as separators (zips made on Windows use them), so '..\\x' escapes as
    surely as '../x'. Absolute names, drive letters and '..' anywhere are refused, never
    repaired: an archive that tries to climb out is hostile or broken, and guessing where its
    files 'meant' to go is how extractors got this wrong.
    """
    text = raw.replace("\\", "/")
    if text.startswith("/") or _DRIVE.match(text):
        raise UnsafeName("an absolute path (it would escape the dataset folder)")
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeName("a name with '..' (it would escape the dataset folder)")
    if not parts:
        raise UnsafeName("an empty name")
    return parts


def _split_suffix(name: str) -> tuple[str, str]:
    """(stem, suffix) where the suffix survives truncation: '-masklabel.png' whole, so an
    image, its caption and its mask keep one shared stem however long it is cut."""
    lower = name.lower()
    mask_tail = MASK_SUFFIX + MASK_EXTENSION
    if lower.endswith(mask_tail):
        return name[:-len(mask_tail)], name[-len(mask_tail):]
    dot = name.rfind(".")
    if 0 < dot and len(name) - dot <= 12 and name[dot:].isascii():
        return name[:dot], name[dot:]
    return name, ""


def _truncate(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    # errors="ignore" drops a character cut in half at the end.
    return data[:max_bytes].decode("utf-8", errors="ignore")


def safe_component(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """`name` as a safe single file or folder name; UnsafeName when nothing usable is left."""
    name = unicodedata.normalize("NFC", name)
    name = "".join("_" if (ch in _FORBIDDEN or ch in _BIDI
                           or unicodedata.category(ch) in _UNSAFE_CATEGORIES) else ch
                   for ch in name)
    name = name.strip(" .")
    if not name:
        raise UnsafeName("an empty name once unsafe characters are removed")
    if name.split(".")[0].rstrip(" ").upper() in _RESERVED:
        name = "_" + name
    stem, suffix = _split_suffix(name)
    # Decided on the stem alone, so the same stem is cut the same way beside any suffix.
    stem = _truncate(stem, max_bytes - _SUFFIX_ROOM).rstrip(" .")
    if not stem:
        raise UnsafeName("an empty name once unsafe characters are removed")
    return unicodedata.normalize("NFC", stem + suffix)


def check_dataset_name(name: str) -> str:
    """A dataset name as given (NFC, surrounding spaces dropped) if it is already a safe
    folder name; otherwise DatasetError with a usable suggestion. Dataset names are not
    silently rewritten: the user types this name again to find the dataset."""
    raw = unicodedata.normalize("NFC", (name or "").strip())
    if not raw:
        raise DatasetError("No dataset name given.")
    if "/" in raw or "\\" in raw:
        raise DatasetError(f"Dataset name '{raw}' contains a path separator; a dataset name "
                           "is one folder name.")
    try:
        safe = safe_component(raw)
    except UnsafeName as error:
        raise DatasetError(f"Dataset name '{raw}' is not usable: {error.reason}.") from None
    if safe != raw:
        raise DatasetError(f"Dataset name '{raw}' is not usable as a folder name (hidden, "
                           f"reserved, too long or with control characters); try '{safe}'.")
    return raw
