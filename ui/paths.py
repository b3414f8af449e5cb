"""Where the app keeps its files: one workspace folder.

`python app.py` uses `<repo>/workspace`; on a Hugging Face Space with persistent storage, `/data`
exists and the workspace is `/data/workspace`, so outputs survive restarts. `ATELIER_WORKSPACE`
(or `app.py --workspace`) overrides both. Built-in presets name paths as `workspace/...`
(relative to the repo root); they are read as paths inside this folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from trainer.data.datasets import default_workspace

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "presets"
WORKSPACE_PREFIX = "workspace/"
# Config keys holding paths that a preset may write as "workspace/...".
PATH_KEYS = ("base_model_name", "vae_model_name", "output_model_destination", "workspace_dir")


def workspace_root() -> Path:
    # The engine decides it (the CLI's `dataset import` needs the same folder).
    return default_workspace()


def user_presets_dir() -> Path:
    return workspace_root() / "presets"


def demo_model_dir() -> Path:
    return workspace_root() / "tiny-sd15"


def localize(value: str) -> str:
    """'workspace/x' -> '<workspace root>/x' when the workspace is not the repo's own
    `workspace/` folder (on a Space, or with --workspace); other values unchanged."""
    if (isinstance(value, str) and value.replace("\\", "/").startswith(WORKSPACE_PREFIX)
            and not _is_default_workspace()):
        return str(workspace_root() / value[len(WORKSPACE_PREFIX):])
    return value


def _is_default_workspace() -> bool:
    """The workspace is `<repo>/workspace` and the server runs in the repo (app.py chdirs
    there), so the presets' relative paths are right as they are."""
    return (workspace_root() == REPO_ROOT / "workspace"
            and Path.cwd().resolve() == REPO_ROOT)


def localize_config(data: dict) -> dict:
    """Preset paths written relative to the repo ("workspace/...", "trainer/demo/...") made
    absolute, so they mean the same whatever the server's working directory is."""
    data = dict(data)
    for key in PATH_KEYS:
        if key in data:
            data[key] = localize(data[key])
    if isinstance(data.get("concepts"), list):
        concepts = []
        for concept in data["concepts"]:
            if isinstance(concept, dict) and isinstance(concept.get("path"), str):
                concept = dict(concept, path=_repo_relative(localize(concept["path"])))
            concepts.append(concept)
        data["concepts"] = concepts
    return data


def _repo_relative(path: str) -> str:
    """A relative path under the repo (the bundled demo dataset) made absolute, unless the
    server runs in the repo, where it reads as it is."""
    if (path and not os.path.isabs(path) and Path.cwd().resolve() != REPO_ROOT
            and (REPO_ROOT / path).exists()):
        return str(REPO_ROOT / path)
    return path
