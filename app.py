"""Atelier: train Stable Diffusion LoRAs in the browser.

    python app.py                      # http://127.0.0.1:7860
    python app.py --port 8000 --listen # on every interface (0.0.0.0)
    python app.py --auth user:secret   # ask for a username and password
    python app.py --auth ann:pw1,bob:pw2 --admin ann   # several users; ann sees every job
    python app.py --listen --auth ... --max-jobs-per-user 2 --publish-namespace my-org
                                       # a shared server's limits and Hub namespace (README)

    python app.py --print-settings     # what this start would use, as JSON, and exit

Also the Hugging Face Space's app_file: outputs go to /data/workspace when /data exists, and
on a Space the hub cache too (HF_HOME=/data/.huggingface), so base models survive a restart.
ATELIER_DATA_DIR names another folder than /data (a stand-in for tests).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

from trainer.cli import CLI_ENV  # light: no torch, gradio or hub library yet
from trainer.data.imports import GiB, ImportLimits  # light too: Pillow only
from trainer.limits import LIMIT_OPTIONS, ServerLimits  # light: the standard library only

# Set before gradio, torch, transformers or diffusers are imported: the CLI's environment
# (without it gradio and the hub contact remote hosts at start, DESIGN.md), and one more.
# HF_HUB_OFFLINE is set in main() (off only with --online or on a Hugging Face Space, where
# hub models must download).
for _key, _value in {**CLI_ENV,
                     # The server, the training thread and the watching browser share the
                     # CPU cores: torch's OpenMP threads spinning while they wait starve the
                     # others. Measured on 2 busy cores, the demo with a page open: 77-114 s
                     # spinning (the default), 13-16 s passive. The CLI has the cores to
                     # itself and keeps the default (trainer/cli.py).
                     "OMP_WAIT_POLICY": "PASSIVE"}.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parent
log = logging.getLogger("atelier")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Atelier: a browser trainer for Stable "
                                                 "Diffusion LoRAs.")
    parser.add_argument("--port", type=int,
                        default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="port of the page (default 7860)")
    parser.add_argument("--listen", action="store_true",
                        help="serve on every interface (0.0.0.0), not only 127.0.0.1")
    parser.add_argument("--auth", action="append", metavar="USER:PASSWORD",
                        help="ask for a username and password; several users: repeat it or "
                             "separate pairs with commas (env ATELIER_AUTH, e.g. a Space "
                             "secret). Each user sees only their own jobs and datasets")
    parser.add_argument("--admin", action="append", default=None, metavar="USER",
                        help="with --auth: a user who sees and acts on every user's jobs and "
                             "datasets (repeatable; env ATELIER_ADMIN, comma-separated)")
    parser.add_argument("--max-jobs", type=int, default=None, metavar="N",
                        help="training jobs run at once, each in its own process on its "
                             "own GPU (default: one per GPU, 1 on a CPU); the others wait in "
                             "the queue")
    parser.add_argument("--share", action="store_true",
                        help="also open a public gradio.live link (off by default)")
    parser.add_argument("--workspace", default=None,
                        help="folder for models, runs, samples and presets (default: "
                             "/data/workspace when /data exists, else ./workspace)")
    parser.add_argument("--online", action="store_true",
                        help="let base models download from the Hugging Face hub (offline by "
                             "default, except on a Space)")
    parser.add_argument("--allow-any-path", action="store_true",
                        help="with --listen/--share: let users name paths outside the "
                             "workspace (only on a server you alone use)")
    limits = ImportLimits()  # the defaults, sized for a Space
    for flag, default, what in (("--max-upload-gb", limits.max_upload_bytes, "one upload"),
                                ("--max-dataset-gb", limits.max_dataset_bytes, "one dataset"),
                                ("--quota-gb", limits.quota_bytes, "the whole workspace")):
        env = "ATELIER_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, type=float,
                            default=float(os.environ.get(env, default / GiB)),
                            help=f"dataset uploads: GB for {what} (default "
                                 f"{default / GiB:g}; env {env})")
    parser.add_argument("--max-upload-files", type=int, dest="max_files",
                        default=int(os.environ.get("ATELIER_MAX_UPLOAD_FILES",
                                                   limits.max_files)),
                        help=f"dataset uploads: files per upload (default {limits.max_files}; "
                             "env ATELIER_MAX_UPLOAD_FILES)")
    shared_limits = ServerLimits.shared_defaults()
    for key, flag in LIMIT_OPTIONS.items():
        env = limit_env(key)
        parser.add_argument(flag, type=int, dest=key, default=None, metavar="N",
                            help=f"shared server: {LIMIT_HELP[key]} (default "
                                 f"{getattr(shared_limits, key)}; 0 = no limit; env {env}; "
                                 "a local start has none unless given)")
    parser.add_argument("--publish-namespace", action="append", default=None, metavar="NAME",
                        help="a Hugging Face user or organization the server's own token "
                             "publishes to (repeatable or comma-separated; env "
                             "ATELIER_PUBLISH_NAMESPACE; on a Space its owner). On a shared "
                             "server any other repo needs the visitor's own token")
    parser.add_argument("--print-settings", action="store_true",
                        help="print what this start would use (shared mode, hub access, "
                             "workspace, hub cache) as JSON, and exit without serving")
    args = parser.parse_args(argv)
    if min(args.max_upload_gb, args.max_dataset_gb, args.quota_gb) <= 0 or args.max_files < 1:
        parser.error("the upload limits must be positive")
    args.auth = users(args.auth or [os.environ.get("ATELIER_AUTH") or ""], parser)
    admins = args.admin or [os.environ.get("ATELIER_ADMIN") or ""]
    args.admin = [name.strip() for item in admins for name in item.split(",") if name.strip()]
    unknown = [name for name in args.admin if name not in dict(args.auth or [])]
    if unknown:
        parser.error(f"--admin {', '.join(unknown)}: not a user of --auth")
    if args.max_jobs is not None and args.max_jobs < 1:
        parser.error("--max-jobs must be at least 1")
    for key, flag in LIMIT_OPTIONS.items():
        value = getattr(args, key)
        if value is None and os.environ.get(limit_env(key), "").strip():
            text = os.environ[limit_env(key)].strip()
            if not re.fullmatch(r"[0-9]{1,12}", text):
                parser.error(f"{limit_env(key)} must be a whole number (got '{text[:40]}')")
            value = int(text)
        if value is not None and value < 0:
            parser.error(f"{flag} must be 0 (no limit) or more")
        setattr(args, key, value)
    names = args.publish_namespace or [os.environ.get("ATELIER_PUBLISH_NAMESPACE")
                                       or os.environ.get("SPACE_AUTHOR_NAME") or ""]
    args.publish_namespace = [n.strip() for item in names for n in item.split(",")
                              if n.strip()]
    bad = [n for n in args.publish_namespace if not NAMESPACE.fullmatch(n)]
    if bad:
        parser.error(f"--publish-namespace '{bad[0][:40]}' is not a Hugging Face user or "
                     "organization name")
    return args


# What each limit of trainer/limits.py counts (the options' help).
LIMIT_HELP = {"max_steps_per_job": "optimizer steps of one job",
              "max_jobs_per_user": "running + queued jobs of one user",
              "try_max_size": "Try it's image width and height, pixels",
              "try_max_steps": "Try it's diffusion steps",
              "max_caption_chars": "characters of a caption after any edit"}
NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def limit_env(key: str) -> str:
    return "ATELIER_" + key.upper()


def server_limits(args: argparse.Namespace, shared: bool) -> ServerLimits:
    """The shared defaults on a shared server, none locally; each option given overrides
    (0 = no limit)."""
    base = ServerLimits.shared_defaults() if shared else ServerLimits()
    given = {key: getattr(args, key) for key in LIMIT_OPTIONS
             if getattr(args, key, None) is not None}
    return dataclasses.replace(base, **{key: value or None for key, value in given.items()})


def users(values: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]] | None:
    """[(user, password), ...] from USER:PASSWORD items, each possibly several pairs separated
    by commas; None when there is none (no login). A password may hold ':' but not ','."""
    pairs = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, _, password = item.partition(":")
            if not name or not _:
                parser.error(f"--auth takes USER:PASSWORD (got '{item.split(':')[0]}…')")
            pairs.append((name, password))
    return pairs or None


def upload_limits(args: argparse.Namespace) -> ImportLimits:
    return ImportLimits(max_upload_bytes=int(args.max_upload_gb * GiB),
                        max_dataset_bytes=int(args.max_dataset_gb * GiB),
                        quota_bytes=int(args.quota_gb * GiB), max_files=args.max_files)


def hub_cache_on_persistent_storage() -> None:
    """On a Space with persistent storage, the hub cache lives there (HF_HOME, unless set),
    so a downloaded base model survives a restart. Called before any hub library is
    imported: they read HF_HOME once."""
    from trainer.data.datasets import persistent_folder
    data = persistent_folder()
    if data is not None:
        os.environ.setdefault("HF_HOME", str(data / ".huggingface"))


def settings(shared: bool, workspace: Path) -> dict:
    """What this start decided, as the libraries will see it (--print-settings)."""
    from huggingface_hub import constants

    from trainer.data.cache import shared_cache_bytes
    from ui import state
    return {"space_id": os.environ.get("SPACE_ID"), "shared": shared,
            "confine_paths": state.OPTIONS.confine_paths,
            "hub_offline": constants.is_offline_mode(), "workspace": str(workspace),
            "hf_home": constants.HF_HOME, "hub_cache": constants.HF_HUB_CACHE,
            "quantized_cache": os.environ.get("ATELIER_QUANTIZED_CACHE_DIR"),
            # each user's jobs share one latent/text cache, pruned to data_cache_gb at a start
            "data_cache": str(workspace / ("users/<user>/cache" if shared else "cache")),
            "data_cache_gb": shared_cache_bytes() / 2**30,
            "limits": dataclasses.asdict(state.LIMITS),
            "publish_namespaces": list(state.OPTIONS.publish_namespaces)}


def app_kwargs(shared: bool, workspace: Path) -> dict:
    """The FastAPI app's extra arguments: on a shared server, uploads waiting in gradio's
    upload folder count against the workspace quota (ui/upload_room.py)."""
    if not shared:
        return {}
    from gradio.utils import get_upload_folder
    from starlette.middleware import Middleware

    from ui import state
    from ui.upload_room import UploadRoom
    return {"middleware": [Middleware(
        UploadRoom, quota=lambda: state.IMPORT_LIMITS.quota_bytes,
        folders=lambda: [workspace, Path(get_upload_folder())])]}


def warm_up() -> None:
    """Import the heavy libraries now, not in the first click (that job ran 4x slower)."""
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    try:
        import trainer.loop  # noqa: F401
    except Exception as error:  # a broken engine install: the page still opens, Start says why
        log.warning("The training engine did not import (%s: %s); Start will report it.",
                    type(error).__name__, error)


def ensure_demo_model() -> Path:
    """Build the tiny offline demo model (a few seconds) if the workspace lacks it."""
    from ui import paths
    folder = paths.demo_model_dir()
    if not (folder / "model_index.json").is_file():
        from trainer.models.tiny import build_tiny_sd15
        print(f"Building the tiny demo model in {folder} ...", flush=True)
        build_tiny_sd15(str(folder), seed=0)
    return folder


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup requests
    args = parse_args(argv)
    on_space = bool(os.environ.get("SPACE_ID"))
    if not (args.online or on_space):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if on_space:
        hub_cache_on_persistent_storage()
    os.chdir(REPO_ROOT)  # presets name repo-relative paths (trainer/demo/dataset)
    if args.workspace:
        os.environ["ATELIER_WORKSPACE"] = str(Path(args.workspace).resolve())

    from ui import paths, state
    # Shared or public (reachable by others): paths confined to the workspace, custom
    # scheduler code off (SPEC §7). A plain local start is the user's own machine.
    shared = args.listen or args.share or on_space
    state.configure(shared=shared, allow_any_path=args.allow_any_path,
                    online=args.online or on_space, login=bool(args.auth), admins=args.admin)
    state.IMPORT_LIMITS = upload_limits(args)
    state.set_limits(server_limits(args, shared))
    state.OPTIONS.publish_namespaces = tuple(args.publish_namespace)
    workspace = paths.workspace_root()
    workspace.mkdir(parents=True, exist_ok=True)
    # Every job runs in a folder of its own: quantized base models go to one folder for all
    # of them, or no later job would read them (trainer/quantized_cache.py)
    os.environ.setdefault("ATELIER_QUANTIZED_CACHE_DIR", str(workspace / "cache" / "quantized"))
    if args.print_settings:
        print(json.dumps(settings(shared, workspace), indent=2))
        return

    warm_up()
    ensure_demo_model()
    # The job store: a job that ran when the server stopped continues now; a damaged
    # database is moved aside and rebuilt from the job folders (said in the log and page).
    notice = state.open_jobs(workspace, concurrency=args.max_jobs)
    if notice:
        log.warning(notice)

    import gradio as gr

    from ui.page import CSS, build_page
    demo = build_page()
    auth = args.auth  # [(user, password), ...] or None
    server_name = "0.0.0.0" if args.listen else os.environ.get("GRADIO_SERVER_NAME",
                                                               "127.0.0.1")
    demo.queue(default_concurrency_limit=4)
    # No allowed_paths: the workspace is not served by gradio's file route; every file the
    # page shows comes from a handler that checks who may read it (ui/footer.py servable).
    # No run history: its routes skip --auth and use the server's token for loopback callers
    # (a reverse proxy on the same host makes every visitor one). Raw exception text only
    # for the owner of a local server: a visitor of a shared one sees one sentence.
    demo.launch(server_name=server_name, server_port=args.port, share=args.share, auth=auth,
                css=CSS, theme=gr.themes.Soft(), run_history=False,
                app_kwargs=app_kwargs(shared, workspace),
                # one uploaded file: at most what one dataset upload may bring (a zip)
                max_file_size=state.IMPORT_LIMITS.max_upload_bytes,
                footer_links=["api", "settings"], show_error=not shared)


if __name__ == "__main__":
    sys.exit(main())
