"""What the folder-wide runs (automatic masks, captions, caption edits) share: the images of
a folder as training sees them, and the one-line summary of what a run did per image."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from trainer.data.images import IMAGE_EXTENSIONS, is_image_file


def folder_images(folder: Path | str, recursive: bool, error: type[Exception],
                  purpose: str) -> list[Path]:
    """The training images of `folder` (as the dataset sees them: not masks, not in hidden
    folders), sorted; `error` when the folder is missing or holds none. `purpose` ends the
    empty-name message: "give the folder of images to <purpose>"."""
    if not str(folder).strip():
        raise error(f"folder: empty; give the folder of images to {purpose}")
    root = Path(folder).expanduser()
    if not root.exists():
        raise error(f"Folder '{folder}' does not exist")
    if not root.is_dir():
        raise error(f"'{folder}' is not a folder")
    candidates = root.rglob("*") if recursive else root.iterdir()
    images = sorted(
        (path for path in candidates
         if path.is_file() and is_image_file(path)
         and not any(part.startswith(".") for part in path.relative_to(root).parts[:-1])),
        key=lambda path: path.relative_to(root).as_posix())
    if not images:
        raise error(f"Folder '{folder}' holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def summary_text(parts: list[str], skipped: Sequence[tuple[str, str]],
                 failed: Sequence[tuple[str, str]], limit: int) -> str:
    """`parts` ("Wrote 4 masks", ...) then "skipped N (name: reason; ...)" and "failed N
    (...)", at most `limit` names per list, as one sentence."""
    parts = list(parts)
    for word, entries in (("skipped", skipped), ("failed", failed)):
        if entries:
            shown = "; ".join(f"{name}: {reason}" for name, reason in entries[:limit])
            if len(entries) > limit:
                shown += f"; and {len(entries) - limit} more"
            parts.append(f"{word} {len(entries)} ({shown})")
    return ", ".join(parts) + "."
