"""app.py's options, the workspace, and what a shared server allows."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import ConfigError
from ui import paths, state

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app():
    spec = importlib.util.spec_from_file_location("atelier_app", REPO_ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line_options(app, monkeypatch):
    monkeypatch.delenv("ATELIER_AUTH", raising=False)
    monkeypatch.delenv("ATELIER_ADMIN", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args([])
    assert (args.port, args.listen, args.share, args.auth) == (7860, False, False, None)
    args = app.parse_args(["--port", "8001", "--listen", "--auth", "ann:s3cret:x"])
    assert args.port == 8001 and args.listen and args.auth == [("ann", "s3cret:x")]
    with pytest.raises(SystemExit):
        app.parse_args(["--auth", "no-password"])
    # Several users (issue 15): repeated, or comma-separated as in the ATELIER_AUTH secret.
    args = app.parse_args(["--auth", "ann:a,bob:b", "--auth", "cy:c", "--admin", "ann"])
    assert args.auth == [("ann", "a"), ("bob", "b"), ("cy", "c")] and args.admin == ["ann"]
    monkeypatch.setenv("ATELIER_AUTH", "ann:a, bob:b")
    monkeypatch.setenv("ATELIER_ADMIN", "bob")
    args = app.parse_args([])
    assert args.auth == [("ann", "a"), ("bob", "b")] and args.admin == ["bob"]
    with pytest.raises(SystemExit):
        app.parse_args(["--admin", "zed"])  # an admin must be one of the users
    with pytest.raises(SystemExit):
        app.parse_args(["--max-jobs", "0"])
    assert app.parse_args(["--max-jobs", "2"]).max_jobs == 2


def test_workspace_is_data_on_a_space_else_the_repo(monkeypatch, tmp_path):
    monkeypatch.delenv("ATELIER_WORKSPACE", raising=False)
    expected = (Path("/data/workspace") if Path("/data").is_dir()
                else paths.REPO_ROOT / "workspace")
    assert paths.workspace_root() == expected
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path))
    assert paths.workspace_root() == tmp_path
    assert paths.localize("workspace/tiny-sd15") == str(tmp_path / "tiny-sd15")
    assert paths.localize("/abs/path") == "/abs/path"


def test_demo_model_is_built_once(app, monkeypatch, tmp_path):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path))
    folder = app.ensure_demo_model()
    assert (folder / "model_index.json").is_file() and folder == tmp_path / "tiny-sd15"
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    app.ensure_demo_model()
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


@pytest.fixture
def shared(monkeypatch, tmp_path):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path))
    state.configure(shared=True)
    yield tmp_path
    state.configure(shared=False)
    state.SESSION.allow_custom_code = False


def config(**data):
    return config_from_dict(data, warn=lambda m: None)


def test_a_shared_server_confines_paths_to_the_workspace(shared):
    ok = config(base_model_name=str(shared / "tiny-sd15"), workspace_dir=str(shared / "run"),
                concepts=[{"path": str(DEMO_DATASET_DIR)}, {"path": str(shared / "cats")}])
    state.check_paths(ok)
    state.check_paths(config(base_model_name="stabilityai/stable-diffusion-xl-base-1.0",
                             workspace_dir=str(shared / "run")))
    with pytest.raises(ConfigError, match="base_model_name"):
        state.check_paths(config(base_model_name="/etc", workspace_dir=str(shared / "run")))
    with pytest.raises(ConfigError, match="workspace_dir"):
        state.check_paths(config(workspace_dir="/tmp/elsewhere-atelier"))
    with pytest.raises(ConfigError, match=r"concepts\[0\].path"):
        state.check_paths(config(workspace_dir=str(shared / "run"),
                                 concepts=[{"path": str(shared / ".." / "outside")}]))
    assert state.SESSION.allow_custom_code is False  # no custom scheduler code either


def test_a_local_server_allows_any_path_and_custom_code(monkeypatch):
    state.configure(shared=False)
    try:
        state.check_paths(config(base_model_name="/anywhere", workspace_dir="/tmp/x"))
        assert state.SESSION.allow_custom_code is True
    finally:
        state.SESSION.allow_custom_code = False


def test_limits_are_the_shared_defaults_on_a_shared_server_and_none_locally(app, monkeypatch):
    from trainer.limits import LIMIT_OPTIONS, ServerLimits
    for key in LIMIT_OPTIONS:
        monkeypatch.delenv(app.limit_env(key), raising=False)
    monkeypatch.delenv("ATELIER_PUBLISH_NAMESPACE", raising=False)
    monkeypatch.delenv("SPACE_AUTHOR_NAME", raising=False)
    args = app.parse_args([])
    assert app.server_limits(args, shared=True) == ServerLimits.shared_defaults()
    assert app.server_limits(args, shared=False) == ServerLimits()
    # Each option overrides its limit (0: none); the env gives the option's default.
    monkeypatch.setenv("ATELIER_TRY_MAX_SIZE", "768")
    args = app.parse_args(["--max-steps-per-job", "100", "--max-jobs-per-user", "0"])
    shared = app.server_limits(args, shared=True)
    assert (shared.max_steps_per_job, shared.max_jobs_per_user, shared.try_max_size,
            shared.try_max_steps) == (100, None, 768, ServerLimits.shared_defaults().try_max_steps)
    local = app.server_limits(args, shared=False)
    assert (local.max_steps_per_job, local.try_max_size, local.try_max_steps) == (100, 768, None)
    for bad in (["--try-max-steps", "-1"], ["--try-max-size", "big"]):
        with pytest.raises(SystemExit):
            app.parse_args(bad)
    monkeypatch.setenv("ATELIER_MAX_CAPTION_CHARS", "lots")
    with pytest.raises(SystemExit):
        app.parse_args([])


def test_publish_namespaces_from_the_options_the_env_or_the_spaces_owner(app, monkeypatch):
    monkeypatch.delenv("ATELIER_PUBLISH_NAMESPACE", raising=False)
    monkeypatch.delenv("SPACE_AUTHOR_NAME", raising=False)
    assert app.parse_args([]).publish_namespace == []
    monkeypatch.setenv("SPACE_AUTHOR_NAME", "owner")
    assert app.parse_args([]).publish_namespace == ["owner"]
    monkeypatch.setenv("ATELIER_PUBLISH_NAMESPACE", "team, lab")
    assert app.parse_args([]).publish_namespace == ["team", "lab"]
    args = app.parse_args(["--publish-namespace", "a,b", "--publish-namespace", "c"])
    assert args.publish_namespace == ["a", "b", "c"]
    with pytest.raises(SystemExit):
        app.parse_args(["--publish-namespace", "../x"])
