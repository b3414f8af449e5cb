"""The entries of an import's sources (a zip, a folder, a single file), each with its name as
written, its kind and its declared size, read without following links or opening anything
but regular files. trainer/data/imports.py judges them.
"""
from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trainer.data.datasets import HIDDEN_PREFIX


class Refused(Exception):
    """One entry is not imported; `reason` says why, `code` classifies it."""

    def __init__(self, code: str, reason: str):
        self.code = code
        self.reason = reason
        super().__init__(reason)


@dataclass
class Entry:
    label: str                   # how the report names it
    name: str                    # its path inside the source, as written there
    kind: str                    # file, dir, symlink, special, unreadable or hidden
    size: int                    # declared size
    compressed: int | None       # zip entries: compressed size
    open: Callable[[], io.BufferedIOBase] | None = None
    encrypted: bool = False


_ZIP_KIND = {stat.S_IFLNK: "symlink", stat.S_IFDIR: "dir", stat.S_IFREG: "file"}


def _zip_entry_kind(info: zipfile.ZipInfo) -> str:
    # The Unix mode sits in the top 16 bits of external_attr whoever made the zip; zero means
    # no Unix mode recorded (a plain file or folder).
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "symlink"   # a link named like a folder ('sub/') is a link all the same
    if info.is_dir():
        return "dir" if kind in (0, stat.S_IFDIR) else "special"
    if kind == 0:
        return "file"
    return _ZIP_KIND.get(kind, "special")


def declared_zip_entries(path: Path) -> int | None:
    """The entry count the zip's end record declares, read without parsing the central
    directory (zipfile builds an object per entry, so a zip of millions of empty entries
    would fill the memory before any limit is checked). None when no end record is found."""
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        end = file.tell()
        start = max(0, end - (22 + 65535))   # the end record, then a comment of <= 64 KiB
        file.seek(start)
        tail = file.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        count = int.from_bytes(tail[at + 10:at + 12], "little")
        if count != 0xFFFF or at < 20 or tail[at - 20:at - 16] != b"PK\x06\x07":
            return count
        # Zip64: a locator just before the end record points at the zip64 end record.
        offset = int.from_bytes(tail[at - 12:at - 4], "little")
        file.seek(offset)
        record = file.read(40)
        if record[:4] != b"PK\x06\x06" or len(record) < 40:
            return None
        return int.from_bytes(record[32:40], "little")


def zip_entries(source: Path, zf: zipfile.ZipFile) -> Iterator[Entry]:
    for info in zf.infolist():
        yield Entry(label=f"{source.name}:{info.filename}", name=info.filename,
                    kind=_zip_entry_kind(info), size=info.file_size,
                    compressed=info.compress_size,
                    open=lambda info=info: zf.open(info),
                    encrypted=bool(info.flag_bits & 0x1))


def open_no_follow(path: Path) -> io.BufferedIOBase:
    """Open a regular file for reading without following a link at its last component, and
    without blocking on a pipe that took its place since it was listed."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Refused("special", "not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_entry(path: Path, name: str, label: str) -> Entry:
    try:
        info = path.lstat()
    except OSError:  # removed while listed, or no permission on its folder
        return Entry(label=label, name=name, kind="unreadable", size=0, compressed=None)
    if stat.S_ISLNK(info.st_mode):
        kind = "symlink"
    elif stat.S_ISDIR(info.st_mode):
        kind = "dir"
    elif stat.S_ISREG(info.st_mode):
        kind = "file"
    else:
        kind = "special"
    return Entry(label=label, name=name, kind=kind, size=info.st_size, compressed=None,
                 open=lambda: open_no_follow(path))


def folder_entries(source: Path) -> Iterator[Entry]:
    """Every entry under `source`, sorted, links reported rather than followed; a hidden
    folder is reported once and not entered."""
    def walk(folder: Path, prefix: str) -> Iterator[Entry]:
        try:
            children = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError:
            yield Entry(label=f"{source.name}/{prefix}", name=prefix or folder.name,
                        kind="unreadable", size=0, compressed=None)
            return
        for child in children:
            name = prefix + child.name
            entry = _file_entry(child, name, f"{source.name}/{name}")
            if entry.kind != "dir":
                yield entry
            elif child.name.startswith(HIDDEN_PREFIX):
                entry.kind = "hidden"   # reported once (offer() refuses it), not entered
                yield entry
            else:
                yield from walk(child, name + "/")
    yield from walk(source, "")
