"""Server-wide state: the one training session and how the server was started.

A run belongs to the server, not to a browser tab: every page (a reload, a second device) polls
the same `SESSION`, so it shows the running job as it is.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from trainer.config import TrainConfig
from trainer.data.imports import ImportLimits
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import AtelierError, ConfigError
from trainer.security import is_inside, names_local_path
from trainer.session import TrainingSession
from trainer.try_lora import TryModel
from ui import paths

# Custom scheduler code is off until app.py says the server is the user's own (local).
SESSION = TrainingSession(allow_custom_code=False)

# The browser sessions whose "Apply to folder" (ui.auto_masks) is writing masks now: no
# training starts meanwhile, and no mask run starts while training runs (it may read them).
MASK_RUNS: set[str] = set()
MASK_RUNS_LOCK = threading.Lock()


# "Try it" (ui.try_panel): the base model it keeps loaded, and a lock held while it draws.
# Training and trying never run at once: both want the whole GPU.
TRY = TryModel()
TRY_LOCK = threading.Lock()


def start_training(config: TrainConfig) -> None:
    """Start `config` as the server's job; refused while masks are being generated or a
    LoRA is being tried."""
    with MASK_RUNS_LOCK:
        if MASK_RUNS:
            raise AtelierError("Masks or captions are being generated for a folder: wait "
                               "for that run to finish, or stop it, then start training.")
    if not TRY_LOCK.acquire(blocking=False):
        raise AtelierError("Try it is drawing images: wait a moment for it to finish, then "
                           "start training.")
    try:
        TRY.release()  # its base model's memory is the training job's now
        SESSION.start(config)
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
    # Visitors sign in (--auth): they may use the server's own Hugging Face token.
    login: bool = False


OPTIONS = ServerOptions()
# What one dataset upload may bring (app.py's --max-upload-gb etc.; the page shows them).
IMPORT_LIMITS = ImportLimits()


def configure(shared: bool, allow_any_path: bool = False, online: bool = False,
              login: bool = False) -> None:
    OPTIONS.shared = shared
    OPTIONS.online = online
    OPTIONS.login = login
    OPTIONS.confine_paths = shared and not allow_any_path
    SESSION.allow_custom_code = not shared


def check_paths(config: TrainConfig) -> None:
    """On a shared server, refuse paths outside the workspace (naming the key)."""
    if not OPTIONS.confine_paths:
        return
    workspace = paths.workspace_root().resolve()
    readable = [workspace, DEMO_DATASET_DIR.resolve()]
    where = f"the workspace folder {workspace}"

    def model_source(key: str, value: str) -> None:
        if not value:
            return
        if names_local_path(value) and not is_inside(Path(value), readable):
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
