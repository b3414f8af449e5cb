"""The page's Publish panel: lists the outputs the visitor may read, publishes the chosen one
with the typed token, and uses the server's own token only where it cannot publish under
someone else's name (a local start; a shared server behind a login, for repos under the
namespaces it names). The upload itself is trainer.publish's (tests/test_publish.py runs it
against a stand-in Hub)."""
import json
import os
import shutil

import pytest

from trainer.ownership import Access, Realm, Viewer
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
    os.utime(out / "older.safetensors", (1, 1))
    return out


@pytest.fixture()
def uploads(monkeypatch):
    calls = []

    def fake_publish(path, repo_id, *, private, token, on_status, may_read):
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


@pytest.mark.parametrize("shared, login, namespaces, repo, allowed", [
    (False, False, (), "me/cat", True),              # local: the owner's own token
    (True, True, ("team",), "team/cat", True),       # a login, a named namespace
    (True, True, ("team",), "Team/cat", True),       # names are case-insensitive on the Hub
    (True, True, ("team",), "me/cat", False),        # any other repo: the visitor's token
    (True, True, (), "me/cat", False),               # none named: never the server's
    (True, False, ("team",), "team/cat", False)])    # no login: anyone could use it
def test_the_servers_own_token_only_under_its_namespaces(workspace, uploads, monkeypatch, shared,
                                                        login, namespaces, repo, allowed):
    monkeypatch.setattr(state.OPTIONS, "shared", shared)
    monkeypatch.setattr(state.OPTIONS, "login", login)
    monkeypatch.setattr(state.OPTIONS, "publish_namespaces", namespaces)
    output = str(workspace / "lora.safetensors")
    everyone = Access(Realm(workspace.parent.parent), Viewer())  # ownership aside here
    out = panel.publish_output(output, repo, False, "", access=everyone)
    if allowed:
        assert uploads and uploads[0]["token"] is None  # trainer.publish reads HF_TOKEN
    else:
        assert not uploads
        assert ("Type your Hugging Face token" in out["message"]
                or f"Repo id &#x27;{repo}&#x27;: this server publishes" in out["message"])
        # the visitor's own token publishes anywhere
        panel.publish_output(output, repo, False, "hf_mine", access=everyone)
        assert uploads[0]["token"] == "hf_mine"


def test_a_shared_server_lists_and_publishes_only_the_visitors_outputs(tmp_path, monkeypatch,
                                                                       uploads):
    ws = tmp_path / "ws"
    monkeypatch.setenv("ATELIER_WORKSPACE", str(ws))
    for job_id, owner in (("1", "alice"), ("2", "bob")):
        folder = ws / "jobs" / job_id
        (folder / "output").mkdir(parents=True)
        (folder / "job.json").write_text(json.dumps({"owner": owner}))
        (folder / "output" / "lora.safetensors").write_bytes(owner.encode())
        (folder / "output" / "lora.json").write_text("{}")
    (ws / "old").mkdir()  # a flat folder of an older version: the server's (admins')
    (ws / "old" / "x.safetensors").write_bytes(b"x")
    (ws / "old" / "x.json").write_text("{}")
    realm = Realm(ws, shared=True, confine=True)
    alice, bob = Access(realm, Viewer("alice", admin=False)), Access(realm, Viewer("bob", False))
    root = Access(realm, Viewer("root", admin=True))
    assert [label for label, _ in panel.outputs(alice)] == ["jobs/1/output/lora.safetensors"]
    assert [label for label, _ in panel.outputs(bob)] == ["jobs/2/output/lora.safetensors"]
    assert {label for label, _ in panel.outputs(root)} == {
        "jobs/1/output/lora.safetensors", "jobs/2/output/lora.safetensors", "old/x.safetensors"}
    alices = str(ws / "jobs" / "1" / "output" / "lora.safetensors")
    for path in (alices, str(tmp_path / "elsewhere.safetensors"), "/etc/passwd"):
        out = panel.publish_output(path, "bob/stolen", False, "hf_bob", access=bob)
        assert "output: " in out["message"] and "cannot be read by you" in out["message"]
    assert not uploads
    panel.publish_output(alices, "root/copy", False, "hf_root", access=root)
    assert uploads[0]["path"] == ws / "jobs" / "1" / "output" / "lora.safetensors"
    assert "No output chosen" in panel.publish_output(None, "me/cat", False, "hf_x")["message"]
