"""Import images, captions and masks into `<workspace>/datasets/<name>/`, from files, folders
and zip files, safely enough for a public server.

A source on a shared server is written by a stranger, so every entry is judged before a byte
of it is written, and again while it is written:
- its name: '..', absolute names and drive letters are refused; what is left is made a safe
  name (trainer/data/safe_names.py); hidden files (macOS '._x', '.DS_Store') are passed over;
- its kind: symbolic links (zip entries with the link mode bits too) and device, pipe and
  socket entries are refused, never followed or opened;
- its sizes: the declared size and compression ratio from the zip's central directory, then
  the bytes actually written, counted as they come (a header can lie), against the limits;
- its content: images are decoded in full by Pillow (a truncated file fails here, not in the
  middle of training), captions must be UTF-8.

Everything accepted is written into a staging folder inside the datasets folder and only then
moved into place: a new dataset appears whole in one rename, files added to an existing one
each appear whole. An existing file is never replaced unless the caller asks for `replace`.
"""
from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from trainer.data.datasets import (HIDDEN_PREFIX, dataset_path, datasets_root, folder_bytes,
                                   set_dataset_owner)
from trainer.data.images import IMAGE_EXTENSIONS, MASK_SUFFIX, is_mask_file, is_misnamed_mask
from trainer.data.import_sources import (
    Entry,
    Refused,
    declared_zip_entries,
    folder_entries,
    open_no_follow,
    zip_entries,
)
from trainer.data.safe_names import UnsafeName, entry_parts, safe_component
from trainer.errors import DatasetError

GiB = 1024 ** 3
MiB = 1024 ** 2


@dataclass(frozen=True)
class ImportLimits:
    """What one import may bring. The defaults suit a Hugging Face Space: a few GB per upload
    and a workspace on the smallest persistent-storage tier (20 GB)."""
    max_upload_bytes: int = 4 * GiB    # bytes written by one import (and the size of a zip)
    max_dataset_bytes: int = 8 * GiB   # one dataset, what it held before included
    quota_bytes: int = 20 * GiB        # the whole workspace (models, runs, datasets)
    max_files: int = 10_000            # entries examined in one import
    max_ratio: float = 100.0           # uncompressed : compressed, per zip entry
    max_file_bytes: int = 512 * MiB    # one image (a 512 MiB photo is already absurd)

    def describe(self) -> str:
        return (f"up to {_size(self.max_upload_bytes)} and {self.max_files} files per upload, "
                f"{_size(self.max_dataset_bytes)} per dataset, {_size(self.quota_bytes)} for "
                f"the whole workspace, {_size(self.max_file_bytes)} per image, compression "
                f"ratio at most {self.max_ratio:g}:1")


# Captions are a few lines of text; a bigger .txt is not a caption.
MAX_CAPTION_BYTES = 1 * MiB
# Below this size an entry's ratio is not judged: a short caption of repeated words compresses
# far, and a small entry cannot fill a disk whatever its ratio.
RATIO_MIN_BYTES = 1 * MiB
# Folders deeper than this in an archive are refused: no dataset needs them, and very deep
# paths break other tools (Windows' 260-character paths).
MAX_DEPTH = 8
# Pillow's own bomb threshold (~89 Mpx, a 12k x 7k image): above it Pillow only warns until
# twice as much; an import refuses at once.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# The formats training reads (trainer/data/images.py); JPEG's opener also returns the MPO
# files many cameras write. Only these decoders are tried: Pillow's others include EPS, which
# runs Ghostscript on the file.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
_CHUNK = 1 * MiB


@dataclass(frozen=True)
class Skipped:
    file: str     # as the user knows it: 'photos.zip:cats/a.png', 'photos/a.png', 'a.png'
    reason: str   # for people
    code: str     # for programs: exists, escapes, symlink, special, too_big, ratio, quota, ...


@dataclass
class ImportReport:
    dataset: Path
    added: list[str] = field(default_factory=list)      # relative to the dataset, '/'-separated
    replaced: list[str] = field(default_factory=list)   # the part of `added` that replaced files
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when everything offered was added (the CLI's exit status 0)."""
        return not self.skipped

    def to_dict(self) -> dict:
        return {"dataset": str(self.dataset), "added": list(self.added),
                "replaced": list(self.replaced),
                "skipped": [{"file": s.file, "reason": s.reason, "code": s.code}
                            for s in self.skipped]}

    def text(self) -> str:
        lines = [f"Added {len(self.added)} file(s) to {self.dataset}"
                 + (f" ({len(self.replaced)} replaced)" if self.replaced else "") + "."]
        if self.skipped:
            lines.append(f"Skipped or refused {len(self.skipped)}:")
            lines += [f"  {s.file}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# --- Checking what was written ------------------------------------------------------------------

def _file_kind(name: str) -> str:
    path = Path(name)
    suffix = path.suffix.lower().lstrip(".")
    if is_mask_file(path):
        return "mask"
    if is_misnamed_mask(path):
        raise Refused("not_image", "a mask must be a PNG file ('<image>-masklabel.png')")
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix == "txt":
        return "caption"
    if suffix == "zip":
        raise Refused("not_image", "a zip inside a zip is not opened; upload it on its own")
    raise Refused("not_image", "not an image, a .txt caption or a -masklabel.png mask")


def check_image(path: Path) -> None:
    """Refused unless `path` is an image Pillow decodes in full, in a format training reads,
    of a sane pixel count."""
    Image.init()  # registers every plugin: open(formats=...) knows only those registered
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise Refused("too_big", f"too big: {width}x{height} pixels (limit "
                                         f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels)")
            image.verify()   # structure and checksums (PNG CRCs) without decoding
        # verify() leaves the image unusable, and does not decode the pixels: a file cut
        # short passes it. Only a full load reads to the end.
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            image.load()
    except Refused:
        raise
    except UnidentifiedImageError:
        raise Refused("not_image", "not an image (or not in a format training reads: "
                                   + ", ".join(IMAGE_FORMATS) + ")") from None
    except Image.DecompressionBombError as error:
        raise Refused("too_big", f"too big to decode safely ({error})") from None
    # Pillow's plugins raise many types on bad data (OSError, SyntaxError, ValueError,
    # struct.error ...): each means "this file is unusable".
    except Exception as error:  # noqa: BLE001
        text = str(error) or type(error).__name__
        if "truncat" in text.lower() or isinstance(error, EOFError):
            raise Refused("truncated", f"truncated: the file ends early ({text})") from None
        raise Refused("unreadable", f"unreadable or corrupt image ({text})") from None


def check_caption(path: Path) -> None:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise Refused("not_utf8", f"the caption is not UTF-8 text (byte {error.start}); "
                                  "save it as UTF-8") from None


def _copy_counted(source: io.BufferedIOBase, target: io.BufferedIOBase, limit: int) -> int:
    """Copy at most `limit` bytes; Refused as soon as the source gives more. Counting here
    is what holds when a zip declares a small size and inflates to a big one."""
    written = 0
    while True:
        chunk = source.read(_CHUNK)
        if not chunk:
            return written
        written += len(chunk)
        if written > limit:
            raise Refused("too_big", f"larger than it declared or than the limit "
                                     f"({_size(limit)}); refused while writing")
        target.write(chunk)


# --- The import ------------------------------------------------------------------------------

@dataclass
class _Staged:
    relative: str       # '/'-separated, safe
    kind: str           # image, caption, mask
    label: str
    replaces: bool


@dataclass
class _Budget:
    limits: ImportLimits
    upload: int
    dataset: int
    workspace: int
    files: int = 0

    def check(self, size: int, delta: int) -> None:
        if self.upload + size > self.limits.max_upload_bytes:
            raise Refused("too_big", "the upload size limit "
                          f"({_size(self.limits.max_upload_bytes)}) is reached")
        if self.dataset + delta > self.limits.max_dataset_bytes:
            raise Refused("quota", "the dataset size limit "
                          f"({_size(self.limits.max_dataset_bytes)}) is reached")
        if self.workspace + delta > self.limits.quota_bytes:
            raise Refused("quota", "quota exceeded: the workspace would pass "
                          f"{_size(self.limits.quota_bytes)}")

    def charge(self, size: int, delta: int) -> None:
        self.upload += size
        self.dataset += delta
        self.workspace += delta


class _Importer:
    def __init__(self, staging: Path, dataset: Path, limits: ImportLimits, replace: bool,
                 report: ImportReport, budget: _Budget):
        self.staging = staging
        self.dataset = dataset
        self.limits = limits
        self.replace = replace
        self.report = report
        self.budget = budget
        self.staged: dict[str, _Staged] = {}

    def skip(self, label: str, code: str, reason: str) -> None:
        self.report.skipped.append(Skipped(label, reason, code))

    def source(self, path: Path) -> None:
        """Offer every entry of one source (a zip, a folder or a file)."""
        label = path.name
        try:
            info = path.stat()  # the caller named this path: a link to it is followed
        except OSError as error:
            return self.skip(label, "unreadable", f"unreadable ({error.strerror or error})")
        if stat.S_ISDIR(info.st_mode):
            return self.entries(label, folder_entries(path))
        if not stat.S_ISREG(info.st_mode):
            return self.skip(label, "special", "a device, pipe or other special file")
        if path.suffix.lower() == ".zip":
            return self.zip(path)
        self.entries(label, iter([Entry(label, path.name, "file", info.st_size, None,
                                        lambda: open_no_follow(path.resolve()))]))

    def zip(self, path: Path) -> None:
        label = path.name
        if path.stat().st_size > self.limits.max_upload_bytes:
            return self.skip(label, "too_big", f"too big: the zip is over the upload limit "
                                               f"({_size(self.limits.max_upload_bytes)})")
        try:
            count = declared_zip_entries(path)
            if count is not None and count > 2 * self.limits.max_files:
                return self.skip(label, "too_many", f"too many files: {count} entries (limit "
                                                    f"{self.limits.max_files} per upload)")
            with zipfile.ZipFile(path) as zf:
                self.entries(label, zip_entries(path, zf))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
            self.skip(label, "unreadable", f"not a readable zip file ({error})")

    def entries(self, source_label: str, entries: Iterator[Entry]) -> None:
        for entry in entries:
            if entry.kind == "dir":
                continue  # folders are made as their files arrive
            if self.budget.files >= self.limits.max_files:
                left = 1 + sum(1 for e in entries if e.kind != "dir")
                return self.skip(f"{source_label} ({left} more file(s))", "too_many",
                                 f"too many files: the limit is {self.limits.max_files} "
                                 "per upload")
            self.budget.files += 1
            try:
                self.offer(entry)
            except Refused as refused:
                self.skip(entry.label, refused.code, refused.reason)

    def offer(self, entry: Entry) -> None:
        try:
            parts = entry_parts(entry.name)
        except UnsafeName as error:
            raise Refused("escapes", error.reason) from None
        if any(part.startswith(HIDDEN_PREFIX) or part == "__MACOSX" for part in parts):
            raise Refused("hidden", "a hidden or system file (not part of a dataset)")
        if entry.kind == "symlink":
            raise Refused("symlink", "a symbolic link (links are never followed)")
        if entry.kind == "unreadable":
            raise Refused("unreadable", "unreadable (it vanished, or no permission)")
        if entry.kind != "file":
            raise Refused("special", "a device, pipe or other special entry")
        if len(parts) > MAX_DEPTH:
            raise Refused("escapes", f"nested more than {MAX_DEPTH} folders deep")
        try:
            safe = [safe_component(part) for part in parts]
        except UnsafeName as error:
            raise Refused("bad_name", error.reason) from None
        relative = "/".join(safe)
        kind = _file_kind(safe[-1])
        if relative in self.staged:
            raise Refused("duplicate", f"the name '{relative}' comes twice in this upload")
        replaces, delta = self.existing(relative, entry.size)
        self.check_sizes(entry, kind)
        self.budget.check(entry.size, delta)
        written = self.write(entry, relative)
        try:
            if kind in ("image", "mask"):
                check_image(self.staging / relative)
            else:
                check_caption(self.staging / relative)
        except Refused:
            (self.staging / relative).unlink()
            raise
        self.budget.charge(written, delta + written - entry.size)
        self.staged[relative] = _Staged(relative, kind, entry.label, replaces)

    def existing(self, relative: str, size: int) -> tuple[bool, int]:
        """(replaces, bytes the dataset grows by); Refused when the name is taken and the
        caller did not ask to replace, or is taken by something that is not a file."""
        target = self.dataset.joinpath(*relative.split("/"))
        if not os.path.lexists(target):
            return False, size
        if not self.replace:
            raise Refused("exists", "already exists in the dataset (skipped; choose replace "
                                    "to overwrite)")
        if target.is_symlink() or not target.is_file():
            raise Refused("conflict", "the dataset has a folder or link of that name")
        return True, size - target.lstat().st_size

    def check_sizes(self, entry: Entry, kind: str) -> None:
        if entry.encrypted:
            raise Refused("unreadable", "encrypted in the zip (no password is asked)")
        if entry.compressed is not None and entry.size > RATIO_MIN_BYTES:
            ratio = entry.size / max(entry.compressed, 1)
            if ratio > self.limits.max_ratio:
                raise Refused("ratio", f"extreme compression ratio ({ratio:.0f}:1, limit "
                                       f"{self.limits.max_ratio:g}:1): refused as a zip bomb")
        limit = MAX_CAPTION_BYTES if kind == "caption" else self.limits.max_file_bytes
        if entry.size > limit:
            raise Refused("too_big", f"too big: {_size(entry.size)} (limit {_size(limit)})")

    def write(self, entry: Entry, relative: str) -> int:
        """Write the entry to the staging folder, counting bytes; returns the count."""
        target = self.staging.joinpath(*relative.split("/"))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Refused("conflict", "a file and a folder of this upload share a "
                                      "name") from None
        # The declared size is the limit: a zip entry that inflates past what it declared is
        # lying, and a file that grows while it is copied is not the file that was checked.
        try:
            with entry.open() as source:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as out:
                    try:
                        return _copy_counted(source, out, entry.size)
                    except BaseException:
                        target.unlink(missing_ok=True)
                        raise
        except Refused:
            raise
        except IsADirectoryError:
            raise Refused("conflict", "a file and a folder of this upload share a "
                                      "name") from None
        except (zipfile.BadZipFile, EOFError, ValueError) as error:
            # zlib errors and 'Bad CRC-32' arrive as these.
            raise Refused("unreadable", f"corrupt in the archive ({error})") from None
        except (NotImplementedError, RuntimeError) as error:
            # A compression method or an encryption zipfile does not support.
            raise Refused("unreadable", f"unreadable in the archive ({error})") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise Refused("symlink", "a symbolic link (links are never followed)") from None
            raise Refused("unreadable", f"unreadable ({error.strerror or error})") from None

    def drop_orphans(self) -> None:
        """Captions and masks go with an image: one whose image is neither in this upload
        nor in the dataset (often because the image was refused) is not kept alone."""
        images = {self._stem_key(r) for r, s in self.staged.items() if s.kind == "image"}
        for relative, staged in list(self.staged.items()):
            if staged.kind == "image":
                continue
            key = self._stem_key(relative)
            if key in images or self._dataset_has_image(key):
                continue
            (self.staging / relative).unlink()
            del self.staged[relative]
            self.skip(staged.label, "orphan", "no image of the same name in this upload or "
                                              "the dataset (a refused image takes its caption "
                                              "and mask with it)")

    @staticmethod
    def _stem_key(relative: str) -> str:
        path = Path(relative)
        stem = path.stem
        if is_mask_file(path):
            stem = stem[:-len(MASK_SUFFIX)]
        return (path.parent / stem).as_posix()

    def _dataset_has_image(self, key: str) -> bool:
        base = self.dataset.joinpath(*key.split("/"))
        if not base.parent.is_dir():
            return False
        return any(child.stem == base.name and child.suffix.lower().lstrip(".")
                   in IMAGE_EXTENSIONS for child in base.parent.iterdir())

    def move_into_place(self) -> None:
        """A new dataset is the staging folder renamed: it appears whole. Files added to an
        existing dataset are moved one by one, each whole."""
        order = list(self.staged.values())
        if not order:
            return
        if not os.path.lexists(self.dataset):
            _remove_empty_folders(self.staging)  # left by refused entries
            try:
                os.chmod(self.staging, 0o755)  # mkdtemp makes it private
                os.rename(self.staging, self.dataset)
                self.report.added += [s.relative for s in order]
                return
            except OSError:
                pass  # another import created it meanwhile: add file by file below
        for staged in order:
            try:
                self._move(staged)
            except Refused as refused:
                self.skip(staged.label, refused.code, refused.reason)

    def _move(self, staged: _Staged) -> None:
        parts = staged.relative.split("/")
        folder = self.dataset
        for part in [None, *parts[:-1]]:  # the dataset folder itself, then each subfolder
            folder = folder if part is None else folder / part
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                raise Refused("conflict", f"'{folder.name}' in the dataset is not a plain "
                                          "folder")
            folder.mkdir(exist_ok=True)
        source = self.staging / staged.relative
        target = folder / parts[-1]
        if self.replace:
            if target.is_symlink() or target.is_dir():
                raise Refused("conflict", "the dataset has a folder or link of that name")
            os.replace(source, target)
            if staged.replaces:
                self.report.replaced.append(staged.relative)
        else:
            _move_no_clobber(source, target)
        self.report.added.append(staged.relative)


def _remove_empty_folders(root: Path) -> None:
    for current, _dirs, _files in os.walk(root, topdown=False):
        # Listed again: `_dirs` still names children removed a moment ago.
        if Path(current) != root and not os.listdir(current):
            try:
                os.rmdir(current)
            except OSError:
                pass


def _move_no_clobber(source: Path, target: Path) -> None:
    """Rename `source` to `target` unless `target` exists: a hard link is made and fails if
    the name is taken, so a file that appeared meanwhile is never replaced."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise Refused("exists", "already exists in the dataset (skipped; choose replace to "
                                "overwrite)") from None
    except OSError:
        # Filesystems without hard links: check, then rename (a narrow race, same folder).
        if os.path.lexists(target):
            raise Refused("exists", "already exists in the dataset (skipped; choose replace "
                                    "to overwrite)") from None
        os.rename(source, target)
        return
    source.unlink()


def import_dataset(sources: Iterable[Path | str], name: str, workspace: Path | str, *,
                   limits: ImportLimits | None = None, replace: bool = False,
                   owner: str | None = None) -> ImportReport:
    """Import `sources` (image, caption and mask files, folders, zip files) into
    `<workspace>/datasets/<name>/`, creating it or adding to it. Subfolders are kept.

    Files already in the dataset are skipped unless `replace`. Bad arguments (a bad name, a
    missing source) raise DatasetError before anything is written; everything else is
    reported per file in the returned report. `owner` (a shared server's visitor) is
    recorded in a dataset the import creates, inside the staging folder, so the dataset never
    appears without its owner (for a moment it would read as a CLI import, open to all).
    """
    limits = limits or ImportLimits()
    workspace = Path(workspace)
    dataset = dataset_path(workspace, name)
    paths = [Path(s) for s in sources]
    if not paths:
        raise DatasetError("Nothing to import: give image, caption or mask files, folders "
                           "or zip files.")
    for path in paths:
        if not os.path.lexists(path):
            raise DatasetError(f"Source '{path}' does not exist.")
    root = datasets_root(workspace, create=True)
    report = ImportReport(dataset=dataset)
    budget = _Budget(limits, upload=0, dataset=folder_bytes(dataset),
                     workspace=folder_bytes(workspace))
    # Inside the datasets folder: the same filesystem, so the final moves are renames; the
    # leading dot keeps it out of the dataset list while it exists.
    staging = Path(tempfile.mkdtemp(prefix=f"{HIDDEN_PREFIX}import-", dir=root))
    try:
        if owner is not None:
            set_dataset_owner(staging, owner)
        importer = _Importer(staging, dataset, limits, replace, report, budget)
        for path in paths:
            importer.source(path)
        importer.drop_orphans()
        importer.move_into_place()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _size(n: int) -> str:
    for unit, scale in (("GB", GiB), ("MB", MiB), ("KB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


# -- every other write into a dataset (caption edits, masks): the same quotas ------------------

# The app.py options of the quotas, named in refusals.
QUOTA_OPTIONS = {"max_dataset_bytes": "--max-dataset-gb", "quota_bytes": "--quota-gb"}


def dataset_of(path: Path | str, workspace: Path | str | None) -> Path:
    """The dataset folder a path lies in: `<workspace>/datasets/<name>` when it is inside
    one, else the folder itself (a file: its folder), which then counts as the dataset."""
    path = Path(os.path.realpath(path))
    if workspace is not None:
        root = Path(os.path.realpath(workspace)) / "datasets"
        if path.is_relative_to(root) and path != root:
            return root / path.relative_to(root).parts[0]
    return path if path.is_dir() else path.parent


@dataclass
class Room:
    """What writes into one dataset may still add under `limits`: its own size limit and
    the workspace quota, measured once (`measure`), then charged write by write (`take`), so
    a bulk edit of thousands of captions walks the folders once, not once per file."""
    limits: ImportLimits
    dataset: Path
    dataset_bytes: int
    workspace_bytes: int | None   # None: the workspace is not known, its quota not checked

    @classmethod
    def measure(cls, folder: Path | str, limits: ImportLimits,
                workspace: Path | str | None = None) -> "Room":
        dataset = dataset_of(folder, workspace)
        return cls(limits, dataset, folder_bytes(dataset),
                   folder_bytes(workspace) if workspace is not None else None)

    def check(self, added: int, what: str) -> None:
        """DatasetError (one sentence naming `what`, the limit and its option) when `added`
        more bytes (negative: freed) would pass a quota; nothing is charged."""
        if added <= 0:
            return
        if self.dataset_bytes + added > self.limits.max_dataset_bytes:
            raise DatasetError(
                f"{what}: not written, the dataset '{self.dataset.name}' would pass its size "
                f"limit of {_size(self.limits.max_dataset_bytes)} "
                f"({QUOTA_OPTIONS['max_dataset_bytes']}); remove some files first.")
        if (self.workspace_bytes is not None
                and self.workspace_bytes + added > self.limits.quota_bytes):
            raise DatasetError(
                f"{what}: not written, the workspace would pass its quota of "
                f"{_size(self.limits.quota_bytes)} ({QUOTA_OPTIONS['quota_bytes']}); remove "
                "some files first.")

    def take(self, added: int, what: str) -> None:
        """Check, then charge `added` bytes (the write is about to happen)."""
        self.check(added, what)
        self.dataset_bytes += added
        if self.workspace_bytes is not None:
            self.workspace_bytes += added


def check_room(folder: Path | str, added_bytes: int, limits: ImportLimits | None,
               workspace: Path | str | None = None, what: str | None = None) -> None:
    """Refuse (DatasetError) a write of `added_bytes` more bytes into the dataset holding
    `folder` when it would pass the dataset's size limit or the workspace quota of `limits`
    (None: no limits, nothing checked), as an import is refused."""
    if limits is None or added_bytes <= 0:
        return
    Room.measure(folder, limits, workspace).check(added_bytes, what or Path(folder).name)
