"""Files the page's dataset tools touch: which ones a visitor may read or write (the one
ownership rule of trainer/ownership.py, through `ui.state.access(request)`), and how an
operation's outcome is shown.

Every folder, image or model path a visitor names in the dataset tools (the image browser,
captions, masks, the datasets panel, the concept summary) is checked here before anything is
listed, read or written. On a local server everything passes, as it always did.
"""
from __future__ import annotations

import html
import os
from pathlib import Path

from trainer.data.imports import Room
from trainer.errors import ConfigError
from trainer.ownership import MAX_PATH_CHARS, Access
from trainer.security import is_inside, names_local_path
from ui import paths, state
from ui.state import OPTIONS


def page_path(value: str | os.PathLike) -> str:
    """A path typed in the page as the engine reads it: '~' expanded, a relative path taken
    from the server's working folder (training opens concept folders from there), so the
    ownership rule judges the folder the tools will really open. No file system call: a value
    no file could have (a NUL character, an absurd length) is left to the rule to refuse."""
    text = os.fspath(value)
    if "\x00" in text or len(text) > MAX_PATH_CHARS:
        return text
    return os.path.abspath(os.path.expanduser(text))


def _access(access: Access | None) -> Access:
    # No request (a test, the CLI): the visitor of a server without a login.
    return access if access is not None else state.access()


def readable(value: str | os.PathLike, field: str, access: Access | None = None) -> Path:
    """The resolved path of `value`; ConfigError naming `field` unless the visitor may read
    it (the same sentence whether it exists or not)."""
    return _access(access).check_read(page_path(value), field)


def writable(value: str | os.PathLike, field: str, access: Access | None = None) -> Path:
    """The resolved path of `value`; ConfigError naming `field` unless the visitor may write
    it."""
    return _access(access).check_write(page_path(value), field)


def write_bounds() -> dict:
    """The keyword bounds of a write into a dataset (trainer/data/imports.py quotas) on a
    shared server: the server's dataset and workspace quotas. A local server: none (its
    user's disk is theirs; only uploads keep their limits there)."""
    if not OPTIONS.shared:
        return {}
    return {"limits": state.IMPORT_LIMITS, "workspace": paths.workspace_root()}


def room_left(folder: Path, what: str):
    """On a shared server, the room a run writing into `folder` (automatic masks or
    captions) has under the dataset and workspace quotas (trainer.data.imports.Room, charged
    file by file by the run); a run into a dataset with no room left is refused before it
    starts. A local server: None (no quotas)."""
    bounds = write_bounds()
    if not bounds:
        return None
    room = Room.measure(folder, bounds["limits"], bounds["workspace"])
    room.check(1, what)
    return room


def check_model_source(value: str, field: str, access: Access | None = None) -> None:
    """A model named by a local path must be one the visitor may read on a shared server
    (their own files, the shared demo model); hub ids pass. Without `access`, the older rule:
    inside the workspace."""
    value = (value or "").strip()
    if "\x00" in value:
        raise ConfigError(f"{field}: a path holds a NUL character; no file is named like that.")
    try:
        local = bool(value) and names_local_path(value)
    except (OSError, ValueError):  # a name no file could have (too long): a path, refused below
        local = True
    if not local:
        return
    if access is not None:
        access.check_read(page_path(value), field)
        return
    if not OPTIONS.confine_paths:
        return
    workspace = paths.workspace_root().resolve()
    if not is_inside(Path(value), [workspace]):
        raise ConfigError(f"{field}: '{value}' is outside the workspace folder {workspace}; on "
                          "a shared server models are read from the workspace or the Hugging "
                          "Face hub.")


def message_html(text: str, ok: bool = True) -> str:
    """A short outcome line under the buttons (green when it worked, red when it did not)."""
    kind = "atelier-ok" if ok else "atelier-error"
    return f"<div class='{kind}'>{html.escape(text)}</div>"


def failed(error: Exception, key: str = "message") -> dict:
    """A handler's result that only shows `error`'s message (in the output named `key`)."""
    return {key: message_html(str(error), ok=False)}


def discard_uploads(files) -> None:
    """Delete uploaded files from gradio's upload folder once the dataset import has taken or
    refused them, so a refused upload does not stay on the server's disk until gradio's own
    cleaning. Only files inside that folder are touched (a test passes its own files)."""
    from gradio.utils import get_upload_folder
    root = Path(get_upload_folder()).resolve()
    for file in files or []:
        path = Path(os.path.realpath(getattr(file, "name", file)))
        if root not in path.parents:
            continue
        try:
            path.unlink(missing_ok=True)
            if path.parent != root:
                path.parent.rmdir()  # gradio's folder for this one upload, when now empty
        except OSError:
            pass
