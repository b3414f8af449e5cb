"""The one ownership rule of a shared server (trainer/ownership.py): each user reaches their
own jobs, datasets and user folder, the shared demo files for reading, and nothing else; an
admin reaches the whole workspace; a local server is unchanged."""
import json
import os

import pytest

from trainer.data.datasets import set_dataset_owner
from trainer.errors import ConfigError
from trainer.ownership import ANONYMOUS, Access, Realm, Viewer, user_folder_name

ALICE, BOB, ADMIN = Viewer("alice", admin=False), Viewer("bob", admin=False), Viewer("root")
ANON = Viewer("", admin=False)


@pytest.fixture()
def world(tmp_path):
    ws, demo = tmp_path / "ws", tmp_path / "demo"
    for job_id, owner in (("1", "alice"), ("2", "bob"), ("3", "")):
        (ws / "jobs" / job_id).mkdir(parents=True)
        (ws / "jobs" / job_id / "job.json").write_text(json.dumps({"owner": owner}))
        (ws / "jobs" / job_id / "samples").mkdir()
    for name, owner in (("cats", "alice"), ("dogs", "bob"), ("anon", ANONYMOUS)):
        (ws / "datasets" / name).mkdir(parents=True)
        set_dataset_owner(ws / "datasets" / name, owner)
    (ws / "datasets" / "cli").mkdir()  # no owner file: imported with the CLI
    (ws / "tiny-sd15").mkdir()
    demo.mkdir()
    (ws / "jobs.db").write_bytes(b"db")
    realm = Realm(ws, shared=True, confine=True, public=(demo, ws / "tiny-sd15"))
    return ws, demo, realm


def test_each_user_reaches_own_jobs_datasets_and_folder(world):
    ws, _, realm = world
    alice, bob = Access(realm, ALICE), Access(realm, BOB)
    for path in (ws / "jobs/1/samples/a.png", ws / "datasets/cats/x.jpg", alice.user_folder()):
        assert alice.can_read(path) and alice.can_write(path)
        assert not bob.can_read(path) and not bob.can_write(path)
    assert alice.user_folder() == ws / "users" / "alice"


def test_shared_read_only_things(world):
    ws, demo, realm = world
    bob = Access(realm, BOB)
    for path in (demo / "cat.jpg", ws / "tiny-sd15" / "unet", ws / "datasets" / "cli" / "a.jpg"):
        assert bob.can_read(path) and not bob.can_write(path)
    for path in (ws / "jobs.db", ws, ws / "presets" / "x.json", ws / "jobs" / "9" / "x"):
        assert not bob.can_read(path) and not bob.can_write(path)


def test_admin_reaches_the_workspace_but_not_outside(world, tmp_path):
    ws, _, realm = world
    admin = Access(realm, ADMIN)
    for path in (ws / "jobs.db", ws / "jobs/2/x", ws / "datasets/dogs", ws / "tiny-sd15"):
        assert admin.can_read(path) and admin.can_write(path)
    assert not admin.can_read(tmp_path / "elsewhere")
    assert not admin.can_read("/etc/passwd")


def test_anonymous_visitors_share_only_anonymous_things(world):
    ws, _, realm = world
    anon = Access(realm, ANON)
    assert anon.can_write(ws / "jobs/3/x") and anon.can_write(ws / "datasets/anon/a.png")
    assert not anon.can_read(ws / "jobs/1/x") and not anon.can_write(ws / "datasets/cli/a.png")
    assert not anon.can_write(ws / "tiny-sd15/model_index.json")


def test_escapes_are_refused(world, tmp_path):
    ws, _, realm = world
    bob = Access(realm, BOB)
    os.symlink(ws / "jobs" / "1", ws / "jobs" / "2" / "link")
    assert not bob.can_read(ws / "jobs/2/link/samples")           # a link into alice's job
    assert not bob.can_read(str(ws / "jobs/2/../1/samples"))       # '..'
    assert not bob.can_read("jobs/1")                              # relative to the workspace
    assert bob.can_read("jobs/2/samples")
    assert not bob.can_read("a/" * 100_000)                        # refused before resolving


def test_refusal_names_the_field_and_is_no_oracle(world):
    ws, _, realm = world
    bob = Access(realm, BOB)
    messages = []
    for path in (ws / "jobs/1/samples", ws / "jobs/1/nothing-here"):
        with pytest.raises(ConfigError) as error:
            bob.check_read(path, "concepts[0].path")
        messages.append(str(error.value).replace(str(path), "P"))
    assert messages[0] == messages[1] and messages[0].startswith("concepts[0].path: ")


def test_local_server_reaches_everything(world, tmp_path):
    ws, _, _ = world
    local = Access(Realm(ws), Viewer())
    assert local.can_write(ws / "jobs.db") and local.can_read("/etc/passwd")


def test_user_folder_names_are_plain():
    assert user_folder_name("alice") == "alice"
    for name in ("../x", "a/b", "..", ANONYMOUS, "é"):
        folder = user_folder_name(name)
        assert folder.startswith("u-") and "/" not in folder and folder == user_folder_name(name)
