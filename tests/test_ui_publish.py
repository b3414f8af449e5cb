"""The page's Publish panel: lists the workspace's outputs, publishes the chosen one with the
typed token, and uses the server's own token only where every visitor may (a local start, or
a shared server behind a login). The upload itself is trainer.publish's (tests/test_publish.py
runs it against a stand-in Hub)."""
import shutil

import pytest

from ui import publish_panel as panel
from ui import state


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path / "ws"))
    out = tmp_path / "ws" / "run" / "output"
    out.mkdir(parents=True)
    for name in ("lora", "older"):
        (out / f"{name}.safetensors").write_bytes(b"weights")
        (out / f"{name}.json").write_text("{}")
    (out / "stray.safetensors").write_bytes(b"no config beside it")
    (tmp_path / "ws" / "backup" / "step-1").mkdir(parents=True)
    shutil.copy(out / "lora.safetensors", tmp_path / "ws" / "backup" / "step-1")
    shutil.copy(out / "lora.json", tmp_path / "ws" / "backup" / "step-1")
    import os
    os.utime(out / "older.safetensors", (1, 1))
    return out


@pytest.fixture()
def uploads(monkeypatch):
    calls = []

    def fake_publish(path, repo_id, *, private, token, on_status):
        calls.append({"path": path, "repo_id": repo_id, "private": private, "token": token})
        return f"https://huggingface.co/{repo_id}"
    monkeypatch.setattr(panel, "publish", fake_publish)
    return calls


def test_the_outputs_with_their_config_are_listed_newest_first(workspace):
    assert panel.outputs() == [("run/output/lora.safetensors", str(workspace / "lora.safetensors")),
                               ("run/output/older.safetensors",
                                str(workspace / "older.safetensors"))]


def test_a_typed_token_publishes_the_chosen_output(workspace, uploads):
    out = panel.publish_output(str(workspace / "lora.safetensors"), " me/cat ", True, " hf_x ")
    assert uploads == [{"path": workspace / "lora.safetensors", "repo_id": "me/cat",
                        "private": True, "token": "hf_x"}]
    assert "Published lora.safetensors to https://huggingface.co/me/cat (private)." in \
        out["message"]


@pytest.mark.parametrize("shared, login, allowed", [(False, False, True), (True, True, True),
                                                    (True, False, False)])
def test_the_servers_own_token_only_where_every_visitor_may_use_it(workspace, uploads,
                                                                  monkeypatch, shared, login,
                                                                  allowed):
    monkeypatch.setattr(state.OPTIONS, "shared", shared)
    monkeypatch.setattr(state.OPTIONS, "login", login)
    out = panel.publish_output(str(workspace / "lora.safetensors"), "me/cat", False, "")
    if allowed:
        assert uploads and uploads[0]["token"] is None  # trainer.publish reads HF_TOKEN
    else:
        assert not uploads and "Type your Hugging Face token" in out["message"]


def test_a_shared_server_publishes_only_workspace_outputs(workspace, uploads, monkeypatch,
                                                          tmp_path):
    monkeypatch.setattr(state.OPTIONS, "confine_paths", True)
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(b"x")
    out = panel.publish_output(str(elsewhere), "me/cat", False, "hf_x")
    assert "outside the workspace" in out["message"] and not uploads
    assert "No output chosen" in panel.publish_output(None, "me/cat", False, "hf_x")["message"]
