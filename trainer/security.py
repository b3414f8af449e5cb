"""Shared/public server mode (SPEC §7, issue 23): which paths a submitted config may name.

`check_config_access(config, access)` is the job queue's rule for every path a config names
(models, the VAE, a LoRA to start from, embeddings, concept folders, the folder a backup is
continued from, the output), decided by the one ownership rule (trainer/ownership.py): a user
reads their own jobs and datasets, the ownerless CLI datasets and the shared demo files, and
writes only their own. Local mode (the default) leaves paths alone.

Paths are resolved as the loader will read them (relative to the working folder, '~', '..'
and symbolic links resolved), so the path checked is the path opened. A link inside the
workspace that points outside is refused like `../` or an absolute path elsewhere.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.ownership import (DATASETS_FOLDER, JOB_RECORD, JOBS_FOLDER, USERS_FOLDER, Access,
                               Realm, Viewer, inside, resolve)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SHOWN_CHARS = 200  # a path quoted in a refusal is cut here (a visitor may send megabytes)


def names_local_path(value: str) -> bool:
    """True when a model source names a file or folder on this machine rather than a hub id
    ('owner/name' that does not exist locally): absolute, ./ or ~ paths, existing paths, and
    anything not shaped like a hub id."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or _exists(value)
            or not _HUB_ID.match(value))


def _exists(value: str) -> bool:
    """Path.exists, False for a name no file can have (a part over 255 bytes, a NUL):
    those raise OSError / ValueError rather than answer."""
    try:
        return Path(value).exists()
    except (OSError, ValueError):
        return False


def is_inside(path: Path, roots: list[Path]) -> bool:
    """True if `path`, with symlinks and '..' resolved, lies in one of `roots`. Resolving is
    linear in the path's length and the comparison a prefix test, so a path of 100,000
    components costs no more than reading it (an absurdly long one is refused at once)."""
    try:
        resolved = resolve(path)
    except ConfigError:
        return False
    return any(inside(resolved, os.path.realpath(Path(root).expanduser())) for root in roots)


def _shown(value: str) -> str:
    value = str(value)
    return value if len(value) <= SHOWN_CHARS else value[:SHOWN_CHARS] + "…"


def confine_path(value: str, root: Path, field: str) -> str:
    """`value` resolved inside `root` (relative paths are taken from the root)."""
    root = Path(os.path.realpath(root))
    try:
        resolved = resolve(value, root)  # follows symlinks, removes '..'
    except ConfigError as error:
        raise ConfigError(f"{field}: {error}") from None
    if not inside(resolved, root):
        raise ConfigError(f"{field}: '{_shown(value)}' is outside the workspace folder {root}; "
                          "on this shared server every path must lie inside it.")
    return str(resolved)


TRANSFORMER_FILE = "transformer.model_name"


def model_sources(config: TrainConfig) -> list[tuple[str, str]]:
    """(key, value) of every model file or folder a config reads: the base model, the VAE,
    the transformer's own file, a LoRA to start from (when the config has that key) and each
    embedding's start file."""
    sources = [("base_model_name", config.base_model_name),
               ("vae_model_name", config.vae_model_name),
               (TRANSFORMER_FILE, config.transformer.model_name or ""),
               ("lora_model_name", getattr(config, "lora_model_name", "") or "")]
    sources += [(f"additional_embeddings[{i}].model_name", embedding.model_name)
                for i, embedding in enumerate(config.additional_embeddings)]
    return [(key, value) for key, value in sources if value]


def confine_config(config: TrainConfig, root: Path) -> TrainConfig:
    """A copy of `config` with every path confined to `root` (hub ids pass unchanged)."""
    data = config.model_dump()
    for key, value in model_sources(config):
        if _HUB_ID.match(value) and not (root / value).exists():
            continue
        confined = confine_path(value, root, key)
        if key == TRANSFORMER_FILE:
            data["transformer"]["model_name"] = confined
        elif key.startswith("additional_embeddings["):
            index = int(key[len("additional_embeddings["):].split("]")[0])
            data["additional_embeddings"][index]["model_name"] = confined
        else:
            data[key] = confined
    data["workspace_dir"] = confine_path(data["workspace_dir"] or ".", root, "workspace_dir")
    if data["output_model_destination"]:
        data["output_model_destination"] = confine_path(
            data["output_model_destination"], root, "output_model_destination")
    for i, concept in enumerate(data["concepts"]):
        concept["path"] = confine_path(concept["path"], root, f"concepts[{i}].path")
    return TrainConfig.model_validate(data)


# -- the queue's rule: every path of a submitted config, by owner -------------------------------

def as_opened(value: str | os.PathLike) -> str:
    """`value` as training will open it: '~' expanded, relative paths from the working folder
    (the server's and its job processes'). Checking this absolute path means checking the
    file that is read, not one of the same name under the workspace."""
    text = os.fspath(value)
    if "\x00" in text:
        return text  # resolve() refuses it with its own sentence
    return os.path.join(os.getcwd(), os.path.expanduser(text))


def check_path(access: Access, key: str, value: str, *, write: bool = False,
               purpose: str = "") -> Path:
    """The resolved path `value` names, or ConfigError naming `key`: one sentence that says
    the path is outside the workspace, or not the caller's; never whether it exists."""
    opened = as_opened(value)
    try:
        resolved = resolve(opened)
    except ConfigError as error:
        raise ConfigError(f"{key}: {error}") from None
    if access.can_write(resolved) if write else access.can_read(resolved):
        return resolved
    realm = access.realm
    if access.kind(resolved) == "outside":
        raise ConfigError(f"{key}: '{_shown(value)}' is outside the workspace folder "
                          f"{realm.workspace}; on a shared server {purpose or 'paths lie there'}.")
    raise ConfigError(f"{key}: '{_shown(value)}' cannot be {'written' if write else 'read'} by "
                      "you on this shared server: only your own jobs, datasets and files (and "
                      "the shared demo files and datasets, for reading) are reachable.")


def check_config_access(config: TrainConfig, access: Access, *,
                        output_confined: bool = False) -> None:
    """Refuse (ConfigError naming the key) a config that names a path `access` may not reach:
    model sources and concept folders are read, the folder a backup is continued from and the
    output are written. Hub ids pass. `output_confined`: the queue writes the output into the
    job's own folder whatever the config says, so the destination is not checked here.

    Local servers (not shared, not confined) are not checked at all."""
    realm = access.realm
    if not realm.shared and not realm.confine:
        return
    for key, value in model_sources(config):
        if names_local_path(value):
            check_path(access, key, value,
                       purpose="models are read from the workspace or the Hugging Face hub")
    for i, concept in enumerate(config.concepts):
        check_path(access, f"concepts[{i}].path", concept.path,
                   purpose="training images are read from your datasets there")
    # The job folder replaces workspace_dir; only a backup to continue from is read there.
    if config.workspace_dir and (config.continue_last_backup or not realm.shared):
        check_path(access, "workspace_dir", config.workspace_dir, write=True,
                   purpose=("runs are continued from your own job folders there"
                            if config.continue_last_backup else "runs are written there only"))
    if config.output_model_destination and not output_confined:
        from trainer.finetune import config_path, output_path
        target = output_path(config)
        for path in (target, config_path(target)):
            check_path(access, "output_model_destination", str(path), write=True,
                       purpose="outputs are written there only")
            refuse_reserved_output(realm, path, config.output_model_destination)


def refuse_reserved_output(realm: Realm, path: Path | str, value: str) -> None:
    """An output (or the JSON written beside it) never replaces the server's own records or a
    whole job, dataset or user folder, even for an admin: a job's job.json, jobs.db, a
    dataset's owner file, or those folders themselves."""
    from trainer.data.datasets import OWNER_FILE
    from trainer.jobs.store import DB_NAME
    resolved = resolve(as_opened(path))
    reserved_names = {JOB_RECORD, DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", OWNER_FILE}
    workspace = realm.workspace
    depth = (len(resolved.relative_to(workspace).parts)
             if inside(resolved, workspace) else None)
    top = resolved.relative_to(workspace).parts[:1] if depth else ()
    if (resolved.name in reserved_names or depth == 0
            or (depth in (1, 2) and top[0] in (JOBS_FOLDER, DATASETS_FOLDER, USERS_FOLDER))):
        raise ConfigError(f"output_model_destination: '{_shown(value)}' would replace "
                          f"'{resolved.name or resolved}', which holds the server's own records "
                          "or a whole job, dataset or user folder; choose a file name in a "
                          "folder of your own.")


def check_shared_paths(config: TrainConfig, workspace: Path, readable: list[Path]) -> None:
    """A confined server's rule for a config, without owners (the page's Start and the API
    before they queue a job; the queue then applies the owners' rule): models and concepts
    are read from the workspace or `readable` folders (the bundled demo dataset), outputs
    written in the workspace only; hub ids pass. Refuses with the key named; the config is
    not rewritten (a repo-relative demo path stays as it is)."""
    realm = Realm(Path(workspace), shared=False, confine=True, public=tuple(readable))
    check_config_access(config, Access(realm, Viewer()))
