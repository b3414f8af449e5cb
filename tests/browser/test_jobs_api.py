"""Jobs through the HTTP API (gradio_client) against real `python app.py` servers: queue order,
reorder, cancel, one job at a time, two users who see only their own jobs, and the restart
test: the server killed with SIGKILL mid-job (its job's process ends with it), started again
on the same workspace, and both jobs finish, the first continuing from its backup with every
step logged once."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from app_server import wait_until  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

USERS = {"ann": "a-secret", "bob": "b-secret", "root": "r-secret"}  # as conftest's auth_server


def job_config(client, **changes) -> str:
    """The demo (tiny model, 5 photos at 64 px, 3 steps an epoch) with `changes`; its output in
    the job's own folder."""
    config = json.loads(client.predict(api_name="/default_config"))
    config.update({"sample_after_unit": "NEVER", "output_model_destination": "",
                   "backup_after_unit": "NEVER", **changes})
    return json.dumps(config)


def client_of(url: str, user: str):
    return gradio_client.Client(url, auth=(user, USERS[user]), verbose=False)


def test_queue_reorder_cancel_and_owners_through_the_api(auth_server):
    url, workspace = auth_server
    ann, bob, root = (client_of(url, user) for user in ("ann", "bob", "root"))

    first = ann.predict(job_config(ann, epochs=3000), api_name="/submit_job")
    second = ann.predict(job_config(ann, epochs=1), api_name="/submit_job")
    third = ann.predict(job_config(ann, epochs=1), api_name="/submit_job")
    assert [j["queue_position"] for j in (first, second, third)] == [0, 1, 2]
    assert len({first["id"], second["id"], third["id"]}) == 3
    status = ann.predict(first["id"], api_name="/job_status")
    assert set(status) >= {"id", "status", "step", "total_steps", "loss", "outputs",
                           "queue_position"}
    assert status["status"] == "running" and status["owner"] == "ann"

    moved = ann.predict(third["id"], "up", api_name="/move_job")
    assert moved["queue_position"] == 1
    assert ann.predict(second["id"], api_name="/job_status")["queue_position"] == 2

    # bob sees none of ann's jobs and cannot touch them; his own queues behind them.
    assert bob.predict(api_name="/list_jobs") == []
    for endpoint in ("/job_status", "/cancel_job"):
        with pytest.raises(AppError, match=f"There is no job {first['id']}"):
            bob.predict(first["id"], api_name=endpoint)
    his = bob.predict(job_config(bob, epochs=1), api_name="/submit_job")
    assert his["queue_position"] == 3
    assert [j["id"] for j in bob.predict(api_name="/list_jobs")] == [his["id"]]
    assert {j["id"] for j in root.predict(api_name="/list_jobs")} == {
        first["id"], second["id"], third["id"], his["id"]}  # the admin sees all

    # A config is checked as Start checks it: a clear message naming the key.
    with pytest.raises(AppError, match="resolution"):
        ann.predict(json.dumps({"resolution": "64x"}), api_name="/submit_job")
    assert ann.predict("{not json", api_name="/start").startswith("error: the config is not")

    cancelled = ann.predict(second["id"], api_name="/cancel_job")
    assert cancelled["status"] == "stopped" and cancelled["queue_position"] is None
    wait_until(lambda: ann.predict(first["id"], api_name="/job_status")["step"] >= 2, 120,
               "the first job's steps")
    ann.predict(first["id"], api_name="/cancel_job")  # running: stops after its step, saves

    def ended(client, job_id):
        return client.predict(job_id, api_name="/job_status")["status"] in (
            "finished", "stopped", "failed")

    wait_until(lambda: ended(bob, his["id"]), 180, "bob's job")
    jobs = {j["id"]: j for j in root.predict(api_name="/list_jobs")}
    assert jobs[first["id"]]["status"] == "stopped"
    assert jobs[second["id"]]["status"] == "stopped" and jobs[second["id"]]["started_at"] is None
    for job_id in (third["id"], his["id"]):
        assert jobs[job_id]["status"] == "finished", jobs[job_id]["message"]
        assert jobs[job_id]["step"] == jobs[job_id]["total_steps"] == 3
        assert Path(jobs[job_id]["outputs"][0]).is_file()
        assert Path(jobs[job_id]["outputs"][0]).is_relative_to(workspace / "jobs" / str(job_id))
    # One at a time (the CPU default), in queue order: first, then third (moved up), then bob's.
    ran = sorted((jobs[i]["started_at"], jobs[i]["ended_at"], i)
                 for i in (first["id"], third["id"], his["id"]))
    assert [i for _, _, i in ran] == [first["id"], third["id"], his["id"]]
    for (_, ended_at, _), (started_at, _, _) in zip(ran, ran[1:]):
        assert started_at >= ended_at

    assert root.predict(his["id"], api_name="/delete_job")["deleted"]
    assert not (workspace / "jobs" / str(his["id"])).exists()
    with pytest.raises(AppError, match="There is no job"):
        bob.predict(his["id"], api_name="/job_status")


def metric_lines(folder: Path) -> list[str]:
    path = folder / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def test_a_killed_server_continues_its_jobs_after_a_restart(tmp_path, start_app, port):
    workspace, log = tmp_path / "workspace", tmp_path / "server.log"
    workspace.mkdir()
    process = start_app(log, port, "--workspace", str(workspace))
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        # 40 epochs of 3 steps, a backup every 4 steps (rolling: the newest 2 kept).
        first = client.predict(job_config(client, epochs=40, backup_after=4,
                                          backup_after_unit="STEP", rolling_backup=True,
                                          rolling_backup_count=2), api_name="/submit_job")
        second = client.predict(job_config(client, epochs=2), api_name="/submit_job")
        assert (first["queue_position"], second["queue_position"]) == (0, 1)
        folder = workspace / "jobs" / str(first["id"])
        wait_until(lambda: list((folder / "backup").glob("step-*")), 120, "a backup")
        # Kill it between two backups (a step or two after one), so that steps are lost
        # and must be redone.
        backed_up = max(int(p.name[5:]) for p in (folder / "backup").glob("step-*"))
        wait_until(lambda: (n := len(metric_lines(folder))) >= backed_up + 2 and n % 4 in (1, 2),
                   60, "steps after it")
        workers = job_processes(process.pid)
        assert len(workers) == 1  # the first job trains in a process of its own
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The job's process ends with its server: nothing keeps training unnoticed.
    wait_until(lambda: not any(alive(worker) for worker in workers), 10,
               "the job's process to end")
    before_restart = metric_lines(folder)
    saved = max(int(p.name[5:]) for p in (folder / "backup").glob("step-*"))
    assert len(before_restart) > saved  # steps after the newest backup were lost

    process = start_app(log, port, "--workspace", str(workspace))
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        assert client.predict(second["id"], api_name="/job_status")["status"] == "queued"
        done = wait_until(lambda: (s := client.predict(second["id"], api_name="/job_status"))
                          ["status"] in ("finished", "failed", "stopped") and s, 240,
                          "both jobs to finish")
        one = client.predict(first["id"], api_name="/job_status")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert one["status"] == "finished", one["message"]
    assert one["note"] == f"Continued from its backup at step {saved} after a restart."
    assert one["step"] == one["total_steps"] == 120
    after = metric_lines(folder)
    steps = [json.loads(line)["step"] for line in after]
    assert steps == list(range(1, 121))           # every step once
    assert after[:saved] == before_restart[:saved]  # the steps up to the backup kept as logged
    assert done["status"] == "finished" and done["step"] == 6
    jobs = {j["id"]: j for j in client_free_list(workspace)}
    assert jobs[second["id"]]["started_at"] >= jobs[first["id"]]["ended_at"]


def job_processes(server_pid: int) -> list:
    import psutil  # accelerate's dependency
    return [child for child in psutil.Process(server_pid).children()
            if "trainer.jobs.worker" in " ".join(child.cmdline())]


def alive(process) -> bool:
    import psutil
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def client_free_list(workspace: Path) -> list[dict]:
    """The job records as the job folders keep them (the server is gone)."""
    return [json.loads(p.read_text()) for p in (workspace / "jobs").glob("*/job.json")]
