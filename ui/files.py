"""Files the page's dataset tools touch: which ones a visitor may read or write (on a shared
server, SPEC §7), and how an operation's outcome is shown.

Training confines concept folders to the workspace and the bundled demo dataset
(ui.state.check_paths); browsing follows the same rule for reading. Writing (captions, masks)
is confined to the workspace only: the demo dataset is the same for every visitor.
"""
from __future__ import annotations

import html
from pathlib import Path

from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import ConfigError
from trainer.security import is_inside, names_local_path
from ui import paths
from ui.state import OPTIONS

def check_allowed(path: Path | str, write: bool = False) -> Path:
    """`path` as a Path; on a shared server, ConfigError unless it may be read (or written)."""
    path = Path(str(path)).expanduser()
    if not OPTIONS.confine_paths:
        return path
    workspace = paths.workspace_root().resolve()
    if is_inside(path, [workspace]):
        return path
    if is_inside(path, [DEMO_DATASET_DIR]):
        if not write:
            return path
        raise ConfigError(f"The bundled demo dataset is read-only on a shared server; copy "
                          f"its images into the workspace folder {workspace} to edit their "
                          "captions and masks.")
    raise ConfigError(f"'{path}' is outside the workspace folder {workspace}; on a shared "
                      "server images are read and written there only.")


def check_model_source(value: str, field: str) -> None:
    """A model named by a local path must lie in the workspace on a shared server; hub ids
    pass (the same rule as the base model's, in ui.state.check_paths)."""
    value = (value or "").strip()
    if not OPTIONS.confine_paths or not value:
        return
    workspace = paths.workspace_root().resolve()
    if names_local_path(value) and not is_inside(Path(value), [workspace]):
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
