"""A shared server keeps each user's work their own (issue 23), driven as a visitor would: a
real `python app.py --listen --auth ...` with two users and an admin, through the HTTP API and
gradio's file route. alice trains a tiny job and saves a preset; bob tries to reach them
through every door the page has (the file route, the jobs panel, Try it, Publish, presets,
run history); each attempt is refused and alice's files stay byte for byte as they were; the
admin still sees everything. One server for the whole module (a start costs ~20 s of CPU).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
from app_server import serve, wait_until  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

USERS = {"alice": "pw1", "bob": "pw2", "root": "pw3"}
TRY_MAX_SIZE = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, workspace) of `python app.py --listen --auth alice,bob,root --admin root`."""
    workspace = tmp_path_factory.mktemp("shared-ws")
    log = tmp_path_factory.mktemp("shared-log") / "server.log"
    users = ",".join(f"{user}:{password}" for user, password in USERS.items())
    for url in serve(workspace, log, "--listen", "--auth", users, "--admin", "root",
                     "--workspace", str(workspace), "--publish-namespace", "alice",
                     "--try-max-size", str(TRY_MAX_SIZE)):
        yield url, workspace


def client_of(url: str, user: str):
    return gradio_client.Client(url, auth=(user, USERS[user]), verbose=False)


def http_of(url: str, user: str | None) -> "httpx.Client":
    """A plain HTTP client, logged in as `user` (None: no login) as a browser is."""
    http = httpx.Client(base_url=url.rstrip("/"), timeout=30)
    if user:
        assert http.post("/login", data={"username": user,
                                         "password": USERS[user]}).status_code == 200
    return http


def by_label(client, api_name: str, label: str) -> str:
    """The parameter name of an endpoint's input labelled `label` (the page's events take
    their inputs as a set, so positions are not stable)."""
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    return next(p["parameter_name"] for p in info[api_name]["parameters"]
                if p["label"] == label)


def save_preset(client, name: str) -> None:
    client.predict(**{by_label(client, "/save_preset", "Preset name"): name},
                   api_name="/save_preset")


def fingerprint(*folders: Path) -> dict[str, str]:
    """sha256 of every file under `folders`: what 'byte for byte unchanged' compares."""
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def alice(server):
    """alice's finished job (1 epoch, a sample at its end, its output in its own folder) and
    a preset she saved; returns what the tests need to name her files."""
    url, workspace = server
    client = client_of(url, "alice")
    config = json.loads(client.predict(api_name="/default_config"))
    config.update({"epochs": 1, "sample_after": 1, "sample_after_unit": "EPOCH",
                   "backup_after_unit": "NEVER", "output_model_destination": ""})
    job = client.predict(json.dumps(config), api_name="/submit_job")
    status = wait_until(
        lambda: (s := client.predict(job["id"], api_name="/job_status"))["status"]
        not in ("queued", "running") and s, 300, "alice's job to end")
    assert status["status"] == "finished", status
    folder = workspace / "jobs" / str(job["id"])
    save_preset(client, "mine")  # the page's settings, as her preset
    preset = workspace / "users" / "alice" / "presets" / "mine.json"
    assert preset.is_file()
    files = {"sample": next((folder / "samples").glob("*.png")),
             "output": Path(status["outputs"][0]), "job": folder / "job.json",
             "config": folder / "config.json", "db": workspace / "jobs.db",
             "preset": preset}
    assert files["output"].parent == folder / "output"  # her output landed in her job
    return {"id": job["id"], "files": files, "client": client,
            "before": fingerprint(folder, workspace / "users" / "alice")}


def test_the_file_route_serves_no_workspace_file_to_anyone(server, alice):
    url, workspace = server
    paths = list(alice["files"].values())
    paths.append(workspace / "jobs" / str(alice["id"]) / ".." / str(alice["id"]) / "job.json")
    for user in ("bob", "alice", "root", None):
        http = http_of(url, user)
        for path in paths:
            response = http.get(f"/gradio_api/file={path}")
            assert response.status_code in (401, 403), (user, path, response.status_code)


def test_run_history_routes_are_closed_even_for_a_loopback_caller(server):
    url, _ = server
    for user in ("bob", None):
        http = http_of(url, user)  # 127.0.0.1: what a reverse proxy on the host looks like
        for method, path in (("GET", "/gradio_api/run-history/records"),
                             ("GET", "/gradio_api/run-history/buckets"),
                             ("POST", "/gradio_api/run-history/connect"),
                             ("GET", "/gradio_api/run-history/records/a/b/assets/c"),
                             ("GET", "/gradio_api/runs")):
            response = http.request(method, path, json={"bucket_id": "x/y"})
            assert response.status_code in (401, 403, 404, 405), (user, path)


def test_each_user_opens_only_their_own_jobs_samples_and_outputs(server, alice):
    url, _ = server
    job_id, files = alice["id"], alice["files"]
    owner, root, bob = alice["client"], client_of(url, "root"), client_of(url, "bob")
    for client in (owner, root):  # the jobs panel, as the page shows it after a reload
        assert client.predict(None, None, api_name="/jobs_refresh")[1]["value"] == job_id
        opened = client.predict(job_id, api_name="/jobs_open")
        gallery, outputs = opened[3], opened[5]
        # fetched through the file route, from gradio's copies: the same bytes
        assert [Path(item["image"]).read_bytes() for item in gallery] == [
            files["sample"].read_bytes()]
        assert files["output"].read_bytes() in [Path(p).read_bytes() for p in outputs]
    assert bob.predict(None, None, api_name="/jobs_refresh")[1]["choices"] == []
    assert bob.predict(api_name="/list_jobs") == []
    with pytest.raises(AppError):
        bob.predict(job_id, api_name="/jobs_open")
    for endpoint in ("/job_status", "/cancel_job", "/delete_job"):
        with pytest.raises(AppError, match=f"There is no job {job_id}"):
            bob.predict(job_id, api_name=endpoint)
    assert bob.predict(api_name="/state")["samples"] == []
    assert [job["id"] for job in root.predict(api_name="/list_jobs")] == [job_id]


def test_try_it_and_publish_list_and_use_only_the_callers_own(server, alice):
    url, _ = server
    output = str(alice["files"]["output"])
    owner, root, bob = alice["client"], client_of(url, "root"), client_of(url, "bob")
    for client in (owner, root):
        assert client.predict(None, api_name="/try_refresh")[0]["value"] == output
        assert client.predict(None, api_name="/publish_refresh")["value"] == output
    assert bob.predict(None, api_name="/try_refresh")[0]["choices"] == []
    assert bob.predict(None, api_name="/publish_refresh")["choices"] == []
    # Named anyway (a program need not use the page's list): refused.
    for refused in (lambda: bob.predict(output, "a cat", "", 1.0, 1, 2, 3.0, 64, 64,
                                        api_name="/try_lora"),
                    lambda: bob.predict(output, "bob/stolen", True, "hf_bobs",
                                        api_name="/publish")):
        try:
            message = refused()
        except AppError as error:
            message = str(error)
        message = message if isinstance(message, str) else json.dumps(message)
        assert "cannot be read by you" in message or "not in the list of choices" in message
    # alice: the server's token only under the namespace it names; the Try it limit
    message = owner.predict(output, "bob/x", True, "", api_name="/publish")
    assert "Repo id &#x27;bob/x&#x27;" in message and "type your own" in message
    message = owner.predict(output, "alice/x", True, "", api_name="/publish")
    assert "offline" in message  # past every check: this test server has no network
    result = owner.predict(output, "a cat", "", 1.0, 1, 2, 3.0, 512, 64, api_name="/try_lora")
    assert f"limit of {TRY_MAX_SIZE} (--try-max-size)" in result[2]
    result = owner.predict(output, "a cat", "", 1.0, 1, 2, 3.0, 64, 64, api_name="/try_lora")
    assert result[0] and result[1], result[2]  # her own LoRA draws


def test_presets_are_each_users_own(server, alice):
    url, workspace = server
    bob, root = client_of(url, "bob"), client_of(url, "root")
    assert not any(v.startswith("user:") for _, v in
                   bob.predict(api_name="/refresh_presets")["choices"])
    save_preset(bob, "mine")  # the same name: his own file
    assert (workspace / "users" / "bob" / "presets" / "mine.json").is_file()
    preset = alice["files"]["preset"]
    assert hashlib.sha256(preset.read_bytes()).hexdigest() == alice["before"][str(preset)]
    with pytest.raises(AppError):  # not among his choices
        bob.predict(**{by_label(bob, "/load_preset", "Preset"): "shared:mine"},
                    api_name="/load_preset")
    # the older shared folder (<workspace>/presets): the admin's only
    (workspace / "presets").mkdir(exist_ok=True)
    (workspace / "presets" / "team.json").write_text(json.dumps({"lora_rank": 8}))
    assert "shared:team" in [v for _, v in root.predict(api_name="/refresh_presets")["choices"]]
    assert "shared:team" not in [v for _, v in
                                 bob.predict(api_name="/refresh_presets")["choices"]]


def test_refused_uploads_leave_the_upload_folder_at_once(server):
    url, _ = server
    bob = client_of(url, "bob")
    name = f"refused-{uuid.uuid4().hex}.zip"
    fake = Path(os.environ.get("TMPDIR", "/tmp")) / name
    fake.write_bytes(b"not a zip at all")
    try:
        bob.predict("bobs", [gradio_client.handle_file(str(fake))], False,
                    api_name="/datasets_upload")
    finally:
        fake.unlink()
    from gradio.utils import get_upload_folder
    assert list(Path(get_upload_folder()).glob(f"*/{name}")) == []


def test_errors_are_one_sentence_without_raw_exception_text(server):
    url, _ = server
    bob = client_of(url, "bob")
    attempts = [((10 ** 30,), "/job_status"), (("1\x00",), "/job_status"),
                (("x",), "/cancel_job"), ((1, "sideways"), "/move_job"),
                ((json.dumps({"concepts": [{"path": "/tmp/a\x00b"}]}),), "/submit_job"),
                ((json.dumps({"workspace_dir": "x" * 100_000}),), "/submit_job")]
    for args, endpoint in attempts:
        with pytest.raises(AppError) as refused:
            bob.predict(*args, api_name=endpoint)
        text = str(refused.value)
        assert "\n" not in text.strip() and len(text) < 600, text
        for raw in ("SQLite", "embedded null", "Traceback", "Errno", "verbose error"):
            assert raw not in text, text


def test_the_page_built_on_a_workspace_with_alices_files_holds_none(server, alice, tmp_path,
                                                                    monkeypatch):
    """What a restart bakes into the page's config (/config, the same for every visitor)."""
    import shutil

    from ui import state
    from ui.page import build_page
    _, served = server
    # a copy of alice's files: this process builds a page, it does not open the server's store
    workspace = tmp_path / "ws"
    for part in (Path("jobs") / str(alice["id"]), Path("users") / "alice"):
        shutil.copytree(served / part, workspace / part)
    monkeypatch.setenv("ATELIER_WORKSPACE", str(workspace))
    # what configure() changes, put back after the test
    for name in ("shared", "login", "admins", "confine_paths", "online"):
        monkeypatch.setattr(state.OPTIONS, name, getattr(state.OPTIONS, name))
    for name in ("allow_custom_code", "admins", "realm"):
        if hasattr(state.SESSION, name):
            monkeypatch.setattr(state.SESSION, name, getattr(state.SESSION, name))
    state.configure(shared=True, login=True, admins=["root"])
    config = json.dumps(build_page().get_config_file(), default=str)
    # (the demo preset names <workspace>/tiny-sd15 and <workspace>/demo: no one's own)
    for text in (str(workspace / "jobs"), str(workspace / "users"), f"jobs/{alice['id']}/",
                 "users/alice"):
        assert text not in config, text


def test_bob_cannot_aim_a_job_at_alices_things(server, alice):
    """Through /submit_job, what a config can name: another user's dataset (4), backup (5)
    and files as an embedding (6), absurd sizes (7) are refused naming the key; an output
    aimed at her LoRA or at the shared demo model lands in bob's own job folder (2)."""
    import shutil

    from trainer.data.datasets import set_dataset_owner
    from trainer.demo import DEMO_DATASET_DIR
    url, workspace = server
    cats = workspace / "datasets" / "alices-cats"  # as her upload would have made it
    shutil.copytree(DEMO_DATASET_DIR, cats)
    set_dataset_owner(cats, "alice")
    demo_model = workspace / "tiny-sd15"
    before = fingerprint(cats, demo_model)
    bob = client_of(url, "bob")
    base = json.loads(bob.predict(api_name="/default_config"))
    base.update({"epochs": 1, "backup_after_unit": "NEVER", "sample_after_unit": "NEVER"})
    alice_job = workspace / "jobs" / str(alice["id"])
    attempts = {
        "concepts[0].path": {"concepts": [{"path": str(cats)}]},
        "workspace_dir": {"continue_last_backup": True, "workspace_dir": str(alice_job)},
        "additional_embeddings[0].model_name": {"additional_embeddings": [
            {"placeholder": "<x>", "model_name": str(alice["files"]["output"])}]},
        "--max-steps-per-job": {"epochs": 1_000_000},
        "epochs": {"epochs": 10 ** 30},
    }
    for key, update in attempts.items():
        with pytest.raises(AppError) as refused:
            bob.predict(json.dumps({**base, **update}), api_name="/submit_job")
        assert key in str(refused.value), (key, str(refused.value))
    # the same refusal whether the named file exists or not: no oracle of her files
    missing = {"additional_embeddings": [{"placeholder": "<x>", "model_name": str(
        alice_job / "output" / "no-such.safetensors")}]}
    with pytest.raises(AppError) as refused_missing:
        bob.predict(json.dumps({**base, **missing}), api_name="/submit_job")
    assert "does not exist" not in str(refused_missing.value)
    for target in (alice["files"]["output"], demo_model):
        job = bob.predict(json.dumps({**base, "output_model_destination": str(target)}),
                          api_name="/submit_job")
        status = wait_until(
            lambda: (s := bob.predict(job["id"], api_name="/job_status"))["status"]
            not in ("queued", "running") and s, 300, "bob's job to end")
        assert status["status"] == "finished", status
        assert Path(status["outputs"][0]).parent == workspace / "jobs" / str(job["id"]) / "output"
    assert fingerprint(cats, demo_model) == before


def test_zz_alices_files_are_byte_for_byte_unchanged(server, alice):
    """Last in the module: after every attempt above."""
    _, workspace = server
    folder = workspace / "jobs" / str(alice["id"])
    assert fingerprint(folder, workspace / "users" / "alice") == alice["before"]


def test_a_job_number_is_checked_before_the_store_sees_it():
    from trainer.errors import AtelierError
    from ui.jobs_panel import job_number
    assert [job_number(v) for v in (7, "7", " 12 ", 3.0)] == [7, 7, 12, 3]
    for bad, shown in ((10 ** 30, "1" + "0" * 30), ("1\x00", "1\\x00"), (-1, "-1"), (0, "0"),
                       ("abc", "abc"), (True, "True"), (None, "None"), (2 ** 63, str(2 ** 63))):
        with pytest.raises(AtelierError) as refused:
            job_number(bad)
        assert str(refused.value) == f"job_id: '{shown}' is not a job number."
