"""Who may reach which path: the one ownership rule of a shared server (issue 23).

Every path a request can name — a file the page serves, an output, a concept folder, a
dataset being browsed, captioned or masked, a backup to continue from, an embedding, a LoRA
to try or publish, a preset — is checked here, by `Access(realm, viewer)`:

- On a local server (`Realm.shared` off) everything is reachable, as it always was.
- On a shared server the workspace is divided by owner:
    <workspace>/jobs/<id>/...        the job's owner (its record, job.json, says who)
    <workspace>/datasets/<name>/...  the dataset's owner (its hidden owner file); a dataset
                                     without one (imported with the CLI) is read by all and
                                     written by admins only
    <workspace>/users/<name>/...     that user (presets, data caches; anything else of theirs)
    the shared read-only folders     (`Realm.public`: the demo model and dataset) read by all
    anything else in the workspace   the server's own (jobs.db, the old flat folders): admins
  A user reaches their own things and the shared read-only ones; an admin reaches everything
  in the workspace. Outside the workspace nothing is reachable while paths are confined
  (`Realm.confine`, the default of a shared server), except the shared read-only folders.

Without a login every visitor of a shared server is the same anonymous user: they share
their jobs and datasets, but the server's own files and the shared folders stay read-only.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import ConfigError

JOBS_FOLDER = "jobs"          # trainer/jobs/store.py: <workspace>/jobs/<id>/
JOB_RECORD = "job.json"
DATASETS_FOLDER = "datasets"  # trainer/data/datasets.py: <workspace>/datasets/<name>/
USERS_FOLDER = "users"        # <workspace>/users/<user>/ : a user's own files (presets)
# The owner a dataset records for the anonymous visitor of a server without a login. ':'
# cannot be part of a login name (--auth splits USER:PASSWORD on it).
ANONYMOUS = ":anonymous"
# A path longer than this is refused before it is resolved: resolving costs time in the
# number of its parts, and no real path comes near it.
MAX_PATH_CHARS = 4096
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Viewer:
    """Who asks. `name` "" = no login: the one owner of a local server (admin), or the
    anonymous visitor of a shared server without a login (not admin)."""
    name: str = ""
    admin: bool = True

    def sees(self, job) -> bool:
        """A job (anything with `.owner`, as the job store records it) is this viewer's, or
        the viewer is an admin."""
        return self.admin or job.owner == self.name

    @property
    def owner_token(self) -> str:
        """What a dataset records as its owner for this viewer."""
        return self.name or ANONYMOUS


LOCAL = Viewer()


@dataclass(frozen=True)
class Realm:
    """How the server was started: its workspace, whether it is shared (ownership applies)
    and confined (paths outside the workspace refused), and the shared read-only folders."""
    workspace: Path
    shared: bool = False
    confine: bool = False
    public: tuple[Path, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "workspace", Path(os.path.realpath(self.workspace)))
        object.__setattr__(self, "public",
                           tuple(Path(os.path.realpath(p)) for p in self.public))


def user_folder_name(name: str) -> str:
    """A user's folder name under <workspace>/users: the login name when it is a plain file
    name, else a stable digest of it (a login name may hold '/', '..' or anything)."""
    if name and _SAFE_NAME.fullmatch(name) and name not in (".", ".."):
        return name
    return "u-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def job_owner(workspace: Path, job_id: str) -> str | None:
    """The owner recorded for job `job_id` (its job.json, which only the job store writes),
    or None when there is no such job."""
    try:
        record = json.loads((workspace / JOBS_FOLDER / job_id / JOB_RECORD).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    owner = record.get("owner") if isinstance(record, dict) else None
    return owner if isinstance(owner, str) else None


def dataset_owner_token(folder: Path) -> str | None:
    from trainer.data.datasets import dataset_owner
    return dataset_owner(folder)


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether resolved `path` is `root` or lies under it (both already resolved): a prefix
    comparison, linear in the path's length whatever its depth."""
    path, root_text = os.fspath(path), os.fspath(root)
    return path == root_text or path.startswith(root_text.rstrip(os.sep) + os.sep)


_inside = inside


def resolve(value: str | os.PathLike, base: Path | None = None) -> Path:
    """`value` with '~', '..' and symbolic links resolved (relative paths from `base`, else
    the working folder). ConfigError for a path no real file could have."""
    text = os.fspath(value)
    if "\x00" in text:
        raise ConfigError("A path holds a NUL character; no file is named like that.")
    if len(text) > MAX_PATH_CHARS:
        raise ConfigError(f"A path of {len(text):,} characters is longer than any this server "
                          f"accepts ({MAX_PATH_CHARS:,}).")
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return Path(os.path.realpath(path))


class Access:
    """What `viewer` may read and write on the server described by `realm`."""

    def __init__(self, realm: Realm, viewer: Viewer = LOCAL) -> None:
        self.realm = realm
        self.viewer = viewer

    # -- the rule ----------------------------------------------------------------------------

    def _owner(self, path: Path) -> tuple[str, str | None]:
        """(kind, owner) of a resolved path: kind is 'outside', 'public', 'job', 'dataset',
        'user' or 'server'; owner is the job's owner / the dataset's owner token / the user
        folder's name (None: no owner recorded)."""
        text = str(path)
        workspace = self.realm.workspace
        if any(_inside(text, root) for root in self.realm.public):
            return "public", None
        if not _inside(text, workspace):
            return "outside", None
        parts = path.relative_to(workspace).parts
        if len(parts) >= 2 and parts[0] == JOBS_FOLDER and parts[1].isdigit():
            owner = job_owner(workspace, parts[1])
            return ("job", owner) if owner is not None else ("server", None)
        if len(parts) >= 2 and parts[0] == DATASETS_FOLDER and not parts[1].startswith("."):
            return "dataset", dataset_owner_token(workspace / parts[0] / parts[1])
        if len(parts) >= 2 and parts[0] == USERS_FOLDER:
            return "user", parts[1]
        return "server", None

    def _mine(self, kind: str, owner: str | None) -> bool:
        if kind == "job":
            return owner == self.viewer.name
        if kind == "dataset":
            return owner is not None and owner == self.viewer.owner_token
        if kind == "user":
            return owner == user_folder_name(self.viewer.owner_token)
        return False

    def kind(self, path: str | os.PathLike) -> str:
        """Where `path` lies: 'outside', 'public', 'job', 'dataset', 'user' or 'server'
        (what a refusal may say without telling whose or whether it exists)."""
        return self._owner(resolve(path, self.realm.workspace))[0]

    def can_read(self, path: str | os.PathLike) -> bool:
        return self._allowed(path, write=False)

    def can_write(self, path: str | os.PathLike) -> bool:
        return self._allowed(path, write=True)

    def _allowed(self, path: str | os.PathLike, write: bool) -> bool:
        realm = self.realm
        if not realm.shared and not realm.confine:
            return True
        try:
            resolved = resolve(path, realm.workspace)
        except ConfigError:
            return False
        kind, owner = self._owner(resolved)
        if kind == "outside":
            return not realm.confine
        if not realm.shared:  # confined only (a test or an old caller): the workspace is open
            return kind != "public" or not write
        if self.viewer.admin:
            return True
        if kind == "public":
            return not write
        if kind == "dataset" and owner is None:  # a CLI import: everyone reads it
            # Only one that exists: a missing dataset is refused like another user's, so a
            # refusal never tells whether another user's dataset of that name exists.
            return not write and self._dataset_folder(resolved).is_dir()
        return self._mine(kind, owner)

    def _dataset_folder(self, resolved: Path) -> Path:
        parts = resolved.relative_to(self.realm.workspace).parts
        return self.realm.workspace / parts[0] / parts[1]

    # -- checks that refuse with the field named ----------------------------------------------

    def check_read(self, value: str | os.PathLike, field_name: str) -> Path:
        """The resolved path, or ConfigError naming `field_name`. The message is the same
        whether the path exists or not (no oracle for other users' files)."""
        return self._check(value, field_name, write=False)

    def check_write(self, value: str | os.PathLike, field_name: str) -> Path:
        return self._check(value, field_name, write=True)

    def _check(self, value: str | os.PathLike, field_name: str, write: bool) -> Path:
        try:
            resolved = resolve(value, self.realm.workspace)
        except ConfigError as error:
            raise ConfigError(f"{field_name}: {error}") from None
        if self._allowed(resolved, write):
            return resolved
        shown = os.fspath(value)
        shown = shown if len(shown) <= 200 else shown[:200] + "…"
        verb = "written" if write else "read"
        raise ConfigError(f"{field_name}: '{shown}' cannot be {verb} by you on this shared "
                          "server: only your own jobs, datasets and files (and the shared "
                          "demo files, for reading) are reachable.")

    # -- a user's own places -------------------------------------------------------------------

    def user_folder(self) -> Path:
        """<workspace>/users/<this user>: where their presets and other files live."""
        return (self.realm.workspace / USERS_FOLDER
                / user_folder_name(self.viewer.owner_token))

    def data_cache_folder(self) -> Path:
        """Where this user's jobs keep their latent and text caches (trainer/data/cache.py):
        one folder for all their jobs, so a later job on the same data encodes nothing;
        on a shared server inside their own folder (the entries hold their images' latents
        and their captions' encodings)."""
        if not self.realm.shared:
            return self.realm.workspace / "cache"
        return self.user_folder() / "cache"

    def sees_owner(self, owner: str | None) -> bool:
        """A job's owner (as the store records it) is this viewer's, or the viewer is an
        admin (or the server is not shared)."""
        return not self.realm.shared or self.viewer.admin or owner == self.viewer.name
