"""A shared server with a login for two users and an admin, for the page's handler tests
(issue 23): alice and bob each own a dataset in the workspace, the admin "root" owns none, and
a dataset imported with the CLI has no owner. Handlers get each visitor's Access the way the
page does, from a request carrying the login name (ui.state.access)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from trainer.data.datasets import set_dataset_owner
from trainer.demo import DEMO_DATASET_DIR
from trainer.ownership import Access
from ui import state


@dataclass
class World:
    workspace: Path
    alice: Access
    bob: Access
    root: Access       # the admin
    anonymous: Access  # a visitor without a login (none on this server: a request without one)

    def dataset(self, name: str) -> Path:
        return self.workspace / "datasets" / name


def request(username: str | None):
    """What gradio passes to a handler: only the login name matters here."""
    return SimpleNamespace(username=username, session_hash=f"session-{username}")


def shared_world(tmp_path: Path, monkeypatch, login: bool = True) -> World:
    """Configure ui.state as `app.py --listen --auth alice:…,bob:…,root:… --admin root` with
    a fresh workspace (restored after the test) and make the three datasets: alice's 'cats'
    and bob's 'dogs' (copies of the demo dataset) and the CLI's 'cli'."""
    workspace = tmp_path / "ws"
    monkeypatch.setenv("ATELIER_WORKSPACE", str(workspace))
    for name, value in (("shared", True), ("confine_paths", True), ("login", login),
                        ("admins", frozenset({"root"}) if login else frozenset())):
        monkeypatch.setattr(state.OPTIONS, name, value)
    for name, owner in (("cats", "alice"), ("dogs", "bob"), ("cli", None)):
        folder = workspace / "datasets" / name
        shutil.copytree(DEMO_DATASET_DIR, folder)
        if owner:
            set_dataset_owner(folder, owner)
    return World(workspace, *(state.access(request(name) if login else None)
                              for name in ("alice", "bob", "root", None)))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes: compare two to prove
    nothing was written, renamed or deleted."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}
