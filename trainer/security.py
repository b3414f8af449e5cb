"""Shared/public server mode (SPEC §7): every path a page visitor types is confined to one
workspace root. Local mode (the default) leaves paths alone.

Confinement resolves symlinks before checking, so a link inside the root that points outside
is refused like `../` or an absolute path elsewhere.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from trainer.config import TrainConfig
from trainer.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def names_local_path(value: str) -> bool:
    """True when a model source names a file or folder on this machine rather than a hub id
    ('owner/name' that does not exist locally): absolute, ./ or ~ paths, existing paths, and
    anything not shaped like a hub id."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or Path(value).exists()
            or not _HUB_ID.match(value))


def is_inside(path: Path, roots: list[Path]) -> bool:
    """True if `path`, with symlinks and '..' resolved, lies in one of `roots`."""
    resolved = path.expanduser().resolve()
    return any(resolved == r or r in resolved.parents for r in (x.resolve() for x in roots))


def confine_path(value: str, root: Path, field: str) -> str:
    """`value` resolved inside `root` (relative paths are taken from the root)."""
    root = root.resolve()
    candidate = Path(value).expanduser()
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()  # follows symlinks, removes '..'
    if not is_inside(resolved, [root]):
        raise ConfigError(f"{field}: '{value}' is outside the workspace folder {root}; on this "
                          "shared server every path must lie inside it.")
    return str(resolved)


def confine_config(config: TrainConfig, root: Path) -> TrainConfig:
    """A copy of `config` with every path confined to `root` (hub ids pass unchanged)."""
    data = config.model_dump()
    for field in ("base_model_name", "vae_model_name"):
        value = data[field]
        if value and not (_HUB_ID.match(value) and not (root / value).exists()):
            data[field] = confine_path(value, root, field)
    data["workspace_dir"] = confine_path(data["workspace_dir"] or ".", root, "workspace_dir")
    if data["output_model_destination"]:
        data["output_model_destination"] = confine_path(
            data["output_model_destination"], root, "output_model_destination")
    for i, concept in enumerate(data["concepts"]):
        concept["path"] = confine_path(concept["path"], root, f"concepts[{i}].path")
    return TrainConfig.model_validate(data)


def check_shared_paths(config: TrainConfig, workspace: Path, readable: list[Path]) -> None:
    """A shared server's rule for a config a visitor submits (the page's Start, the API, the
    job queue): models and concepts are read from the workspace or `readable` folders (the
    bundled demo dataset), outputs written in the workspace only; hub ids pass. Refuses with
    the key named; the config is not rewritten (a repo-relative demo path stays as it is)."""
    workspace = Path(workspace).resolve()
    readable = [workspace, *readable]
    where = f"the workspace folder {workspace}"

    def model_source(key: str, value: str) -> None:
        if value and names_local_path(value) and not is_inside(Path(value), readable):
            raise ConfigError(f"{key}: '{value}' is outside {where}; on a shared server "
                              "models are read from the workspace or the Hugging Face hub.")

    model_source("base_model_name", config.base_model_name)
    model_source("vae_model_name", config.vae_model_name)
    for key in ("output_model_destination", "workspace_dir"):
        value = getattr(config, key)
        if value and not is_inside(Path(value), [workspace]):
            raise ConfigError(f"{key}: '{value}' is outside {where}; on a shared server "
                              "outputs are written there only.")
    for i, concept in enumerate(config.concepts):
        if not is_inside(Path(concept.path), readable):
            raise ConfigError(f"concepts[{i}].path: '{concept.path}' is outside {where}.")
