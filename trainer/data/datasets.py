"""The workspace's datasets: `<workspace>/datasets/<name>/`, each a folder of images with their
`<stem>.txt` captions and `<stem>-masklabel.png` masks, subfolders allowed.

Listing, removing images and deleting a dataset, for the page and the CLI. Files are found
without following symbolic links, so a link planted in a dataset can neither be counted as an
image elsewhere nor make a delete reach outside the folder.
"""
from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer.data.images import is_image_file, mask_path_for
from trainer.data.safe_names import UnsafeName, check_dataset_name, entry_parts
from trainer.errors import DatasetError

DATASETS_FOLDER = "datasets"
# Folders whose names start with a dot are work in progress (an import's staging folder, a
# dataset being deleted) and are never listed as datasets.
HIDDEN_PREFIX = "."


def persistent_folder() -> Path | None:
    """A Space's persistent storage, `/data` (`ATELIER_DATA_DIR` names another folder: a
    stand-in for tests, or a server's own persistent disk), when it exists and is writable."""
    data = Path(os.environ.get("ATELIER_DATA_DIR") or "/data")
    return data if data.is_dir() and os.access(data, os.W_OK) else None


def default_workspace() -> Path:
    """The app's workspace (ui/paths.py uses this one): `ATELIER_WORKSPACE`, else
    `/data/workspace` on a Space with persistent storage, else `<repo>/workspace`."""
    override = os.environ.get("ATELIER_WORKSPACE")
    if override:
        return Path(override).resolve()
    data = persistent_folder()
    if data is not None:
        return data / "workspace"
    return Path(__file__).resolve().parents[2] / "workspace"


def datasets_root(workspace: Path | str, create: bool = False) -> Path:
    """`<workspace>/datasets`, refused when it is a symbolic link (it would send every
    import somewhere outside the workspace)."""
    root = Path(workspace) / DATASETS_FOLDER
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise DatasetError(f"'{root}' is not a plain folder; datasets are not written there.")
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def dataset_path(workspace: Path | str, name: str) -> Path:
    """The folder of dataset `name` (it may not exist yet); DatasetError on a bad name or a
    dataset path that is a link or a file."""
    path = datasets_root(workspace) / check_dataset_name(name)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise DatasetError(f"'{path}' is not a plain folder; it is not used as a dataset.")
    return path


def walk_files(folder: Path):
    """(path, lstat) of every regular file under `folder`, never following links; hidden
    files and folders left out."""
    for current, dirs, files in os.walk(folder):  # os.walk does not follow links by default
        dirs[:] = [d for d in dirs if not d.startswith(HIDDEN_PREFIX)]
        for name in files:
            if name.startswith(HIDDEN_PREFIX):
                continue
            path = Path(current) / name
            try:
                info = path.lstat()
            except OSError:  # deleted while listing
                continue
            if stat.S_ISREG(info.st_mode):
                yield path, info


def folder_bytes(folder: Path | str) -> int:
    """Bytes of the regular files under `folder` (hidden ones included: they use the quota
    too); 0 when it does not exist."""
    total = 0
    for current, _dirs, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(current, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    path: Path
    images: int
    captions: int    # images with a caption file
    masks: int       # images with a mask file
    bytes: int

    def label(self) -> str:
        return (f"{self.name}: {self.images} images, {self.captions} captions, "
                f"{self.masks} masks")


def summarize(path: Path) -> DatasetSummary:
    images = captions = masks = size = 0
    for file, info in walk_files(path):
        size += info.st_size
        if is_image_file(file):
            images += 1
            captions += file.with_suffix(".txt").is_file()
            masks += mask_path_for(file).is_file()
    return DatasetSummary(path.name, path, images, captions, masks, size)


def list_datasets(workspace: Path | str) -> list[DatasetSummary]:
    """The workspace's datasets, sorted by name, with image, caption and mask counts
    (subfolders included)."""
    root = datasets_root(workspace)
    if not root.is_dir():
        return []
    folders = sorted((p for p in root.iterdir()
                      if p.is_dir() and not p.is_symlink()
                      and not p.name.startswith(HIDDEN_PREFIX)), key=lambda p: p.name)
    return [summarize(folder) for folder in folders]


def _image_in(dataset: Path, relative: str) -> Path:
    """`relative` as an image path inside `dataset`; DatasetError when it escapes the folder
    or does not name a training image."""
    try:
        parts = entry_parts(relative)
    except UnsafeName as error:
        raise DatasetError(f"'{relative}': {error.reason}.") from None
    path = dataset.joinpath(*parts)
    if not is_image_file(path):
        raise DatasetError(f"'{relative}' is not an image of the dataset (captions and masks "
                           "go with their image).")
    # No component may be a link: a link to a folder elsewhere would delete files there.
    current = dataset
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise DatasetError(f"'{relative}' goes through a symbolic link; not removed.")
    return path


def remove_images(workspace: Path | str, name: str, images: Iterable[str]) -> list[str]:
    """Delete `images` (paths relative to the dataset, as listed) with their caption and
    mask. Every path is checked before anything is deleted; images already gone are passed
    over. Returns the removed files, relative to the dataset."""
    dataset = dataset_path(workspace, name)
    if not dataset.is_dir():
        raise DatasetError(f"There is no dataset '{name}'.")
    targets = [_image_in(dataset, relative) for relative in images]
    removed = []
    for image in targets:
        if not image.is_file():
            continue
        for file in (image, image.with_suffix(".txt"), mask_path_for(image)):
            if file.is_file() and not file.is_symlink():
                file.unlink()
                removed.append(file.relative_to(dataset).as_posix())
    return removed


def delete_dataset(workspace: Path | str, name: str) -> Path:
    """Delete dataset `name` whole. It is first renamed to a hidden name, so it leaves the
    list at once and a delete interrupted half-way never shows as a half-dataset."""
    dataset = dataset_path(workspace, name)
    if not dataset.is_dir():
        raise DatasetError(f"There is no dataset '{name}'.")
    doomed = dataset.with_name(f"{HIDDEN_PREFIX}deleting-{uuid.uuid4().hex[:12]}")
    os.rename(dataset, doomed)
    shutil.rmtree(doomed)  # rmtree never follows links out of the tree
    return dataset


# Who created a dataset (a server with a login): one line in a hidden file inside it, so the
# owner travels with the folder and never shows as a dataset file.
OWNER_FILE = HIDDEN_PREFIX + "owner"


def dataset_owner(folder: Path | str) -> str | None:
    """The user who created the dataset, or None (made without a login, or by the CLI)."""
    path = Path(folder) / OWNER_FILE
    try:
        return path.read_text(encoding="utf-8").strip() or None if path.is_file() else None
    except OSError:
        return None


def set_dataset_owner(folder: Path | str, owner: str) -> None:
    (Path(folder) / OWNER_FILE).write_text(owner, encoding="utf-8")
