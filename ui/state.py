"""Server-wide state: the job queue and how the server was started.

A run belongs to the server, not to a browser tab: every page (a reload, a second device) polls
the same `SESSION` (the job queue, trainer/jobs/queue.py), so it shows the running job as it is.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from trainer.config import TrainConfig
from trainer.data.imports import ImportLimits
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import AtelierError
from trainer.jobs.queue import JobQueue
from trainer.limits import ServerLimits
from trainer.ownership import Access, Realm, Viewer
from trainer.security import check_shared_paths
from trainer.try_lora import TryModel
from ui import paths

# The job queue. Custom scheduler code is off until app.py says the server is the user's own
# (local). app.py opens its store in the workspace at start (a restart resumes what ran);
# anything else that submits a job opens it there on first use.
SESSION = JobQueue(allow_custom_code=False, default_workspace=paths.workspace_root,
                   default_realm=lambda: realm())
JOBS = SESSION

# The browser sessions whose "Apply to folder" (ui.auto_masks) is writing masks now: no
# training starts meanwhile, and no mask run starts while training runs (it may read them).
MASK_RUNS: set[str] = set()
MASK_RUNS_LOCK = threading.Lock()


# "Try it" (ui.try_panel): the base model it keeps loaded, and a lock held while it draws.
# Training and trying never run at once: both want the whole GPU.
TRY = TryModel()
TRY_LOCK = threading.Lock()


def start_training(config: TrainConfig, viewer: Viewer | None = None):
    """Queue `config` as a job of `viewer` (it starts at once when a slot is free); returns
    (job, queue position). Refused while masks are being generated or a LoRA is being
    tried."""
    with MASK_RUNS_LOCK:
        if MASK_RUNS:
            raise AtelierError("Masks or captions are being generated for a folder: wait "
                               "for that run to finish, or stop it, then start training.")
    if not TRY_LOCK.acquire(blocking=False):
        raise AtelierError("Try it is drawing images: wait a moment for it to finish, then "
                           "start training.")
    try:
        TRY.release()  # its base model's memory is the training job's now
        return SESSION.start(config, viewer or Viewer())
    finally:
        TRY_LOCK.release()


@dataclass
class ServerOptions:
    # A shared or public server (--listen, --share, a Hugging Face Space): file paths are
    # confined to the workspace folder and custom scheduler code is disabled (SPEC §7).
    shared: bool = False
    confine_paths: bool = False
    # Models named by a hub id may download (--online, or a Space).
    online: bool = False
    # Visitors sign in (--auth): they may use the server's own Hugging Face token, and each
    # sees only their own jobs and datasets, except the admins (--admin).
    login: bool = False
    admins: frozenset[str] = frozenset()
    # Hub namespaces (users or organizations) the server's own Hugging Face token publishes
    # to (--publish-namespace; on a Space, its owner): any other repo needs the visitor's.
    publish_namespaces: tuple[str, ...] = ()


OPTIONS = ServerOptions()
# What one visitor may ask (app.py sets the shared defaults and its options; none locally).
LIMITS = ServerLimits()
# What one dataset upload may bring (app.py's --max-upload-gb etc.; the page shows them).
IMPORT_LIMITS = ImportLimits()


def set_limits(limits: ServerLimits) -> None:
    """The server's limits (app.py), for the page and the job queue alike."""
    global LIMITS
    LIMITS = limits
    SESSION.limits = limits


def configure(shared: bool, allow_any_path: bool = False, online: bool = False,
              login: bool = False, admins=()) -> None:
    OPTIONS.shared = shared
    OPTIONS.online = online
    OPTIONS.login = login
    OPTIONS.admins = frozenset(admins)
    OPTIONS.confine_paths = shared and not allow_any_path
    SESSION.allow_custom_code = not shared
    SESSION.admins = OPTIONS.admins  # their jobs keep their chosen output path
    if SESSION.store is not None:  # opened already: its checks follow the new options
        SESSION.realm = realm()


def viewer(request=None) -> Viewer:
    """Who is asking: a gradio request's login name with --auth; without a login, the one
    owner of a local server (an admin), or the anonymous visitor of a shared one (not an
    admin: the server's own files and the shared demo files stay out of reach)."""
    name = getattr(request, "username", None) if OPTIONS.login else None
    if not name:
        return Viewer(admin=not OPTIONS.shared)
    return Viewer(name=name, admin=name in OPTIONS.admins)


def realm() -> Realm:
    """The server's ownership layout (trainer/ownership.py): its workspace, shared or not,
    confined or not, and the folders every visitor may read (the demo dataset and model)."""
    return Realm(paths.workspace_root(), shared=OPTIONS.shared, confine=OPTIONS.confine_paths,
                 public=(DEMO_DATASET_DIR, paths.demo_model_dir()))


def access(request=None) -> Access:
    """What the visitor behind a gradio request may read and write: the one ownership rule
    every handler that names a path asks."""
    return Access(realm(), viewer(request))


def open_jobs(workspace: Path, concurrency: int | None = None) -> str:
    """Open the job store in the workspace (app.py, at start); returns its notice."""
    return SESSION.open(workspace, concurrency=concurrency, confine=OPTIONS.confine_paths,
                        realm=realm(), limits=LIMITS)


def check_paths(config: TrainConfig) -> None:
    """On a shared server, refuse paths outside the workspace (naming the key)."""
    if OPTIONS.confine_paths:
        check_shared_paths(config, paths.workspace_root(), [DEMO_DATASET_DIR])
