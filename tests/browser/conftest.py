"""A real Atelier server (`python app.py` in a subprocess) and a headless Chromium page.

Chromium is Debian's package (`apt-get install -y chromium`), driven by the `playwright` Python
package; `playwright install` is never run (it downloads a browser). Browser tests are skipped,
with the reason, when either is missing; the gradio_client tests need only the server.

Set ATELIER_SCREENSHOT_DIR=docs to (re)write the README screenshots while the tests run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from app_server import SERVER_START_TIMEOUT, free_port, serve, spawn, wait_http
from atelier_page import new_tab

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
USERS = {"ann": "a-secret", "bob": "b-secret", "root": "r-secret"}  # auth_server's logins


@pytest.fixture
def start_app():
    """start(log, port, *extra) -> the `python app.py` process, answering: for tests that
    kill a server and start it again. The test ends what it started."""
    started = []

    def start(log: Path, port: int, *extra: str) -> subprocess.Popen:
        process = spawn(log, port, *extra)
        started.append(process)
        wait_http(f"http://127.0.0.1:{port}/", SERVER_START_TIMEOUT, process, log)
        return process
    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def atelier_server(tmp_path_factory):
    """(url, workspace) of `python app.py` on a free port with a fresh workspace."""
    # Screenshots for the README show the paths a user sees: the repo's own workspace/.
    default_workspace = bool(os.environ.get("ATELIER_SCREENSHOT_DIR"))
    workspace = (REPO_ROOT / "workspace" if default_workspace
                 else tmp_path_factory.mktemp("atelier-workspace"))
    workspace.mkdir(exist_ok=True)
    log = tmp_path_factory.mktemp("atelier-log") / "server.log"
    args = [] if default_workspace else ["--workspace", str(workspace)]
    for url in serve(workspace, log, *args):
        yield url, workspace


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """(url, workspace) of a server with a login for three users, "root" the admin."""
    workspace = tmp_path_factory.mktemp("auth-workspace")
    log = tmp_path_factory.mktemp("auth-log") / "server.log"
    users = ",".join(f"{user}:{password}" for user, password in USERS.items())
    for url in serve(workspace, log, "--workspace", str(workspace), "--auth", users,
                     "--admin", "root"):
        yield url, workspace


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """(url, workspace) of a shared server (`--listen`: paths confined to the workspace), as
    on a Space or a rented GPU."""
    workspace = tmp_path_factory.mktemp("shared-workspace")
    log = tmp_path_factory.mktemp("shared-log") / "server.log"
    for url in serve(workspace, log, "--listen", "--workspace", str(workspace)):
        yield url, workspace


@pytest.fixture(scope="session")
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_tab(chromium, url: str):
    """A fresh tab on the app in a context of its own (its own cookies)."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000},
                                   accept_downloads=True)
    yield new_tab(context, url)
    context.close()


@pytest.fixture
def page(chromium, atelier_server):
    yield from open_tab(chromium, atelier_server[0])


@pytest.fixture
def shared_page(chromium, shared_server):
    yield from open_tab(chromium, shared_server[0])


@pytest.fixture
def screenshot_dir():
    folder = os.environ.get("ATELIER_SCREENSHOT_DIR")
    if not folder:
        return None
    path = Path(folder)
    if not path.is_absolute():
        path = REPO_ROOT / path
    path.mkdir(parents=True, exist_ok=True)
    return path
