"""The job queue through the session layer: order, cancel, reorder, concurrency, owners, two
submits at once, a damaged database, a config that no longer validates, a full disk during a
backup, the CLI kept out of a running job's folder, and each job in a process of its own
(two at once, Stop reaching it, a killed one failing its job only), and TensorBoard showing
each step of a resumed job once.

Most tests drive the queue with a stand-in for the training loop (`Gate`) that runs exactly as
long as the test says, in a thread of the test's process, so order and concurrency are
observed, not guessed from timings; the fault and process tests train the tiny model for real.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import AtelierError, ConfigError
from trainer.jobs import child, queue as queue_module, resume
from trainer.jobs.lock import FolderLock, refuse_server_job_folders
from trainer.jobs.queue import JobQueue, Viewer, space_defaults
from trainer.jobs.store import DB_NAME, RUNNING, JobStore
from trainer.loop import TrainResult, train


def tiny(model_dir, **extra):
    data = {"base_model_name": str(model_dir), "concepts": [{"path": str(DEMO_DATASET_DIR)}],
            "resolution": "64", "train_dtype": "FLOAT_32", "gradient_checkpointing": False,
            "learning_rate": 1e-3, "learning_rate_warmup_steps": 0, "lora_rank": 4,
            "batch_size": 1, "epochs": 1, "backup_after_unit": "NEVER"}
    data.update(extra)
    return config_from_dict(data, warn=lambda m: None)


def plain(**extra):
    """A config for the stand-in loop (nothing is loaded)."""
    return tiny("unused-model", **extra)


def wait_for(predicate, timeout=60.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Gate:
    """A stand-in for trainer.loop.train: each job runs until the test releases it by its
    seed (each test job has its own), and the gate records the order of starts and the most
    jobs that ran at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.release_events: dict[int, threading.Event] = {}
        self.started: list[int] = []
        self.running = 0
        self.most = 0

    def event(self, seed: int) -> threading.Event:
        with self.lock:
            return self.release_events.setdefault(seed, threading.Event())

    def release(self, seed: int) -> None:
        self.event(seed).set()

    def __call__(self, config, control, **kwargs):
        with self.lock:
            self.started.append(config.seed)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            control.emit("started", total_steps=2, steps_per_epoch=2, epochs=1, images=1)
            while not self.event(config.seed).wait(0.02):
                if control.stop_requested:
                    return TrainResult(str(Path(config.workspace_dir) / "out"), 1, 0, True)
            for step in (1, 2):
                control.emit("progress", step=step, total_steps=2, epoch=0, epochs=1,
                             epoch_step=step, steps_per_epoch=2, loss=0.5, smooth_loss=0.5,
                             lr={"unet": 1e-3}, lr_factor=1.0, eta_seconds=0.0, time=0.0)
            return TrainResult(str(Path(config.workspace_dir) / "out"), 2, 1, False)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def gate():
    return Gate()


def gated_queue(workspace: Path, gate: Gate, concurrency: int = 1) -> JobQueue:
    queue = JobQueue(train_fn=gate)
    queue.open(workspace, concurrency=concurrency)
    return queue


def status(queue: JobQueue, job_id: int) -> str:
    return queue.get(job_id).status


def test_jobs_run_in_queue_order_one_at_a_time(tmp_path, gate):
    queue = gated_queue(tmp_path, gate)
    submitted = [queue.submit(plain(seed=seed)) for seed in (1, 2, 3)]
    assert [position for _, position in submitted] == [0, 1, 2]
    ids = [job.id for job, _ in submitted]
    assert len(set(ids)) == 3
    wait_for(lambda: gate.started == [1], what="the first job")
    assert [status(queue, i) for i in ids] == ["running", "queued", "queued"]
    for folder in (queue.store.folder(i) for i in ids):
        assert (folder / "job.json").is_file()  # each job its own folder from the start
    for seed in (1, 2, 3):
        gate.release(seed)
    assert queue.wait(30)
    assert gate.started == [1, 2, 3] and gate.most == 1
    jobs = {job.id: job for job in queue.jobs()}
    for i in ids:
        assert jobs[i].status == "finished" and jobs[i].step == jobs[i].total_steps == 2
        assert jobs[i].ended_at >= jobs[i].started_at >= jobs[i].created_at
        # the job trained in its own folder, whatever workspace_dir the config named
        assert jobs[i].outputs == [str(queue.store.folder(i) / "out")]
    assert [job.id for job in queue.jobs()] == ids[::-1]  # newest first


def test_concurrency_limit(tmp_path, gate):
    queue = gated_queue(tmp_path, gate, concurrency=2)
    positions = [queue.submit(plain(seed=seed))[1] for seed in (1, 2, 3, 4)]
    assert positions == [0, 0, 1, 2]
    wait_for(lambda: len(gate.started) == 2, what="two jobs")
    time.sleep(0.2)
    assert sorted(gate.started) == [1, 2] and gate.running == 2
    gate.release(2)  # a slot frees: the next in the queue takes it
    wait_for(lambda: len(gate.started) == 3, what="the third job")
    assert gate.started[-1] == 3 and gate.running == 2
    for seed in (1, 3, 4):
        gate.release(seed)
    assert queue.wait(30)
    assert gate.most == 2 and gate.started[-1] == 4


def test_cancel_and_reorder(tmp_path, gate):
    queue = gated_queue(tmp_path, gate)
    ids = [queue.submit(plain(seed=seed))[0].id for seed in (1, 2, 3, 4)]
    wait_for(lambda: gate.started == [1], what="the first job")
    assert queue.move(ids[3], "up") == 2          # 4 goes before 3
    assert queue.move(ids[3], "up") == 1          # and before 2
    assert queue.move(ids[3], "up") == 1          # first already: stays
    assert queue.move(ids[1], "down") == 3        # 2 goes after 3
    assert [queue.queue_position(i) for i in ids] == [0, 3, 2, 1]
    with pytest.raises(AtelierError, match="not queued"):
        queue.move(ids[0], "down")                # the running job has no place to move
    with pytest.raises(AtelierError, match="direction"):
        queue.move(ids[2], "sideways")

    cancelled = queue.cancel(ids[2])
    assert cancelled.status == "stopped" and "before it ran" in cancelled.message
    assert queue.queue_position(ids[1]) == 2
    with pytest.raises(AtelierError, match="already ended"):
        queue.cancel(ids[2])

    queue.cancel(ids[0])  # the running job stops (gracefully, as Stop)
    wait_for(lambda: status(queue, ids[0]) == "stopped", what="the stop")
    for seed in (2, 4):
        gate.release(seed)
    assert queue.wait(30)
    assert gate.started == [1, 4, 2]  # the cancelled job 3 never ran
    assert [status(queue, i) for i in ids] == ["stopped", "finished", "stopped", "finished"]

    queue.delete(ids[2])
    assert not queue.store.folder(ids[2]).exists()
    with pytest.raises(AtelierError, match=f"no job {ids[2]}"):
        queue.get(ids[2])


def test_two_submits_at_the_same_instant_are_two_jobs(tmp_path, gate):
    queue = gated_queue(tmp_path, gate)
    first = queue.submit(plain(seed=1))[0]
    wait_for(lambda: gate.started == [1], what="the first job")
    barrier = threading.Barrier(2)
    results, errors = [], []

    def submit(seed):
        barrier.wait()
        try:
            results.append(queue.submit(plain(seed=seed)))
        except Exception as error:  # would be a lost submission
            errors.append(error)

    threads = [threading.Thread(target=submit, args=(seed,)) for seed in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    ids = {job.id for job, _ in results}
    assert len(ids) == 2 and first.id not in ids
    assert sorted(position for _, position in results) == [1, 2]
    for seed in (1, 2, 3):
        gate.release(seed)
    assert queue.wait(30)


def test_owners_see_and_act_on_their_own_jobs_only(tmp_path, gate):
    ann, bob, boss = Viewer("ann", admin=False), Viewer("bob", admin=False), Viewer("boss")
    queue = gated_queue(tmp_path, gate)
    mine = queue.submit(plain(seed=1), ann)[0]
    theirs = queue.submit(plain(seed=2), bob)[0]
    assert (mine.owner, theirs.owner) == ("ann", "bob")
    assert [j.id for j in queue.jobs(ann)] == [mine.id]
    assert [j.id for j in queue.jobs(bob)] == [theirs.id]
    assert {j.id for j in queue.jobs(boss)} == {mine.id, theirs.id}
    for act in (lambda: queue.get(mine.id, bob), lambda: queue.cancel(mine.id, bob),
                lambda: queue.delete(mine.id, bob), lambda: queue.move(mine.id, "up", bob)):
        with pytest.raises(AtelierError, match=f"There is no job {mine.id}"):
            act()  # another's job reads as no job at all
    wait_for(lambda: gate.started == [1], what="ann's job")
    # The footer: bob follows no running job of his; ann follows hers.
    assert queue.state(ann).status == "running"
    assert queue.state(bob).status == "idle" and "1 job(s) queued" in queue.state(bob).message
    assert queue.stop(bob) is False and queue.state(ann).status == "running"
    assert queue.cancel(theirs.id, boss).status == "stopped"  # an admin acts on anyone's
    gate.release(1)
    assert queue.wait(30)
    assert status(queue, mine.id) == "finished"


def test_a_chosen_output_path_clash_is_refused_before_the_job_starts(tmp_path, gate):
    queue = gated_queue(tmp_path, gate)
    target = tmp_path / "mine.safetensors"
    queue.submit(plain(seed=1, output_model_destination=str(target)))
    with pytest.raises(ConfigError, match="output_model_destination.*job 1"):
        queue.submit(plain(seed=2, output_model_destination=str(tmp_path / "mine")))
    second = queue.submit(plain(seed=2, output_model_destination=str(tmp_path / "other")))[0]
    assert second.config["output_model_destination"] == str(tmp_path / "other")
    for seed in (1, 2):
        gate.release(seed)
    assert queue.wait(30)
    # Once job 1 has ended, its path may be written again (a re-run of the same settings).
    queue.submit(plain(seed=3, output_model_destination=str(target)))
    gate.release(3)
    assert queue.wait(30)


def test_custom_code_and_paths_are_refused_at_submit_on_a_shared_server(tmp_path, gate):
    queue = JobQueue(train_fn=gate)
    queue.open(tmp_path, confine=True)
    with pytest.raises(ConfigError, match="learning_rate_scheduler"):
        queue.submit(plain(learning_rate_scheduler="CUSTOM",
                           custom_learning_rate_scheduler="torch.optim.lr_scheduler.StepLR"))
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    inside = {"base_model_name": "org/model", "workspace_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=r"concepts\[0\]\.path"):
        queue.submit(plain(**inside, concepts=[{"path": str(elsewhere)}]))
    with pytest.raises(ConfigError, match=r"base_model_name: 'unused-model' is outside"):
        queue.submit(plain(workspace_dir=inside["workspace_dir"]))  # a local model elsewhere
    with pytest.raises(ConfigError, match=r"workspace_dir"):
        queue.submit(plain(**{**inside, "workspace_dir": str(elsewhere)}))
    assert queue.jobs() == []
    # The bundled demo dataset is readable, as the page's Start allows it; a hub id passes.
    job, _ = queue.submit(plain(**inside, seed=5))
    assert [j.id for j in queue.jobs()] == [job.id]
    gate.release(5)
    assert queue.wait(30)


def test_a_damaged_database_is_moved_aside_and_rebuilt_from_the_job_folders(tmp_path, gate):
    queue = gated_queue(tmp_path, gate)
    done = queue.submit(plain(seed=1))[0]
    waiting = queue.submit(plain(seed=2))[0]
    later = queue.submit(plain(seed=3))[0]
    gate.release(1)
    wait_for(lambda: gate.started == [1, 2], what="the second job")
    queue.cancel(waiting.id)
    wait_for(lambda: gate.started == [1, 2, 3], what="the third job")
    gate.release(3)
    assert queue.wait(30)
    before = {j.id: (j.status, j.step, j.owner, j.config) for j in queue.jobs()}

    db = tmp_path / DB_NAME
    db.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    gate2 = Gate()
    reopened = JobQueue(train_fn=gate2)
    notice = reopened.open(tmp_path)
    assert "could not be used" in notice and "3 job(s) were rebuilt" in notice
    aside = list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")
    after = {j.id: (j.status, j.step, j.owner, j.config) for j in reopened.jobs()}
    assert after == before  # nothing silently emptied, nothing run again
    assert gate2.started == []
    # The rebuilt store goes on: new ids follow the old ones.
    new = reopened.submit(plain(seed=4))[0]
    assert new.id == later.id + 1 and done.id < new.id
    gate2.release(4)
    assert reopened.wait(30)

    # Another program's SQLite file in its place: reported and moved aside the same way.
    (tmp_path / "jobs").joinpath(str(new.id), "job.json").unlink()  # its record: gone too
    db.unlink()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    notice = JobQueue(train_fn=gate2).open(tmp_path)
    assert "not an Atelier job database" in notice and "notes" in notice
    assert len(list(tmp_path.glob(f"{DB_NAME}.corrupt-*"))) == 2
    assert {j.id for j in JobStore(tmp_path).all()} == set(before)


def test_a_config_that_no_longer_validates_fails_naming_the_key(tmp_path, tiny_sd15_dir):
    # Two jobs written by an older version: one whose config this version refuses.
    store = JobStore(tmp_path)
    bad = store.add("", {**json.loads(tiny(tiny_sd15_dir).to_json()), "resolution": "64x"})
    good = store.add("", json.loads(tiny(tiny_sd15_dir).to_json()))
    queue = JobQueue()
    queue.open(tmp_path)
    assert queue.wait(120)
    failed = queue.get(bad.id)
    assert failed.status == "failed" and "resolution" in failed.error
    assert "Traceback" not in failed.error
    assert queue.get(good.id).status == "finished"


def test_a_full_disk_during_a_backup_fails_that_job_and_the_queue_goes_on(
        tmp_path, tiny_sd15_dir, monkeypatch):
    import trainer.backup

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.backup, "save_file", no_space)
    queue = JobQueue(train_fn=train)  # in this process: the disk is full only here
    queue.open(tmp_path)
    full = queue.submit(tiny(tiny_sd15_dir, backup_after=2, backup_after_unit="STEP"))[0]
    after = queue.submit(tiny(tiny_sd15_dir, backup_before_save=False))[0]
    assert queue.wait(120)
    failed = queue.get(full.id)
    assert failed.status == "failed", failed.message
    assert "Could not write the backup" in failed.error and "No space left" in failed.error
    assert not list((queue.store.folder(full.id) / "backup").glob(".tmp-*"))  # nothing half
    assert not (queue.store.folder(full.id) / ".server.lock").exists()        # folder freed
    finished = queue.get(after.id)
    assert finished.status == "finished" and Path(finished.outputs[0]).is_file()


def test_metrics_are_cut_back_to_the_backup_a_restart_continues_from(tmp_path):
    folder = tmp_path / "job"
    (folder / "backup" / "step-4").mkdir(parents=True)
    (folder / "backup" / "step-4" / "progress.json").write_text(json.dumps({"step": 4}))
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(1, 7)] + ['{"step": 7, "lo']
    (folder / "metrics.jsonl").write_text("\n".join(lines))
    assert resume.newest_backup_step(folder) == 4
    resume.cut_metrics(folder, 4)
    kept = [json.loads(l)["step"] for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert kept == [1, 2, 3, 4]


def test_the_cli_refuses_a_job_folder_a_server_is_running(tmp_path, capsys):
    from trainer import cli
    folder = tmp_path / "jobs" / "7"
    lock = FolderLock(folder)
    lock.acquire()
    try:
        with pytest.raises(ConfigError, match="workspace_dir.*a job that an Atelier server"):
            refuse_server_job_folders({"workspace_dir": str(folder)})
        with pytest.raises(ConfigError, match="output_model_destination"):
            refuse_server_job_folders({"output_model_destination": str(folder / "o" / "x")})
        config = tmp_path / "c.json"
        config.write_text(json.dumps({"workspace_dir": str(folder)}))
        assert cli.main(["train", "--config", str(config)]) == 2
        assert "server is running now" in capsys.readouterr().err
    finally:
        lock.release()
    refuse_server_job_folders({"workspace_dir": str(folder)})  # free once the job ended
    # A lock file left by a killed server holds no lock: the folder is free.
    (folder / ".server.lock").write_text("12345")
    refuse_server_job_folders({"workspace_dir": str(folder)})


def test_on_a_space_backups_default_to_a_few_minutes(monkeypatch):
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert space_defaults({}) == {}
    monkeypatch.setenv("SPACE_ID", "someone/atelier")
    assert space_defaults({}) == {"backup_after": 5, "backup_after_unit": "MINUTE"}
    assert space_defaults({"backup_after": 2}) == {"backup_after": 2}  # the user's own wins
    from ui.page import initial_config
    config, _ = initial_config()
    assert (config.backup_after, config.backup_after_unit.value) == (5, "MINUTE")


def test_the_api_checks_a_config_as_start_does(monkeypatch, tmp_path):
    import gradio as gr

    from ui import api, state
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path))
    monkeypatch.setattr(state.OPTIONS, "confine_paths", True)
    outside = json.dumps({"base_model_name": "/etc/models/x", "workspace_dir": str(tmp_path)})
    with pytest.raises(gr.Error, match="base_model_name.*outside"):
        api.submit_job(outside, None)
    custom = json.dumps({"learning_rate_scheduler": "CUSTOM", "workspace_dir": str(tmp_path),
                         "custom_learning_rate_scheduler": "torch.optim.lr_scheduler.StepLR"})
    monkeypatch.setattr(state.SESSION, "allow_custom_code", False)
    with pytest.raises(gr.Error, match="learning_rate_scheduler: CUSTOM"):
        api.submit_job(custom, None)
    with pytest.raises(gr.Error, match="not valid JSON"):
        api.submit_job("{", None)
    assert api.start(outside, None).startswith("error: base_model_name")


def test_datasets_belong_to_who_made_them_with_a_login(monkeypatch, tmp_path):
    from PIL import Image

    from trainer.ownership import Access, Realm
    from ui import datasets_panel
    monkeypatch.setenv("ATELIER_WORKSPACE", str(tmp_path))
    image = tmp_path / "cat.png"
    Image.new("RGB", (8, 8)).save(image)
    realm = Realm(tmp_path, shared=True, confine=True)
    ann, bob, boss = (Access(realm, Viewer("ann", admin=False)),
                      Access(realm, Viewer("bob", admin=False)), Access(realm, Viewer("boss")))
    assert "Added 1" in datasets_panel.upload("anns", [str(image)], False, access=ann)["message"]
    assert "Added 1" in datasets_panel.upload("bobs", [str(image)], False, access=bob)["message"]
    shown = datasets_panel.refresh(None, ann)["dataset"]["choices"]
    assert shown == ["anns"] and datasets_panel.refresh(None, boss)["dataset"]["choices"] == [
        "anns", "bobs"]
    for refused in (datasets_panel.upload("bobs", [str(image)], True, access=ann),
                    datasets_panel.remove("bobs", ["cat.png"], access=ann),
                    datasets_panel.confirm_delete("bobs", access=ann)):
        assert "cannot be written by you" in refused["message"]
    assert datasets_panel.image_names("bobs", ann) == []
    assert (tmp_path / "datasets" / "bobs" / "cat.png").is_file()
    assert "Deleted" in datasets_panel.confirm_delete("bobs", access=boss)["message"]


# -- one process per job -----------------------------------------------------------------------

def metric_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"]
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def lora_tensors(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def test_two_jobs_train_at_once_each_in_its_own_process(tmp_path, tiny_sd15_dir):
    queue = JobQueue()
    queue.open(tmp_path, concurrency=2)
    jobs = [queue.submit(tiny(tiny_sd15_dir))[0] for _ in range(2)]  # the same settings
    wait_for(lambda: all(queue.process_id(job.id) for job in jobs), 60, "both processes")
    pids = [queue.process_id(job.id) for job in jobs]
    assert len(set(pids)) == 2 and os.getpid() not in pids
    for pid in pids:
        os.kill(pid, 0)  # both alive at this moment
    assert queue.wait(180)
    outputs = []
    for job in jobs:
        done = queue.get(job.id)
        assert done.status == "finished", done.message
        assert done.step == done.total_steps == 5
        assert metric_steps(queue.store.folder(job.id)) == [1, 2, 3, 4, 5]
        assert Path(done.outputs[0]).is_relative_to(queue.store.folder(job.id))
        outputs.append(lora_tensors(done.outputs[0]))
        assert not (queue.store.folder(job.id) / ".server.lock").exists()
    # Same settings, same seed: the same weights, so neither run disturbed the other.
    assert outputs[0].keys() == outputs[1].keys() and outputs[0]
    for key, tensor in outputs[0].items():
        assert tensor.equal(outputs[1][key]), key


def test_stop_and_save_now_reach_the_jobs_process(tmp_path, tiny_sd15_dir):
    queue = JobQueue()
    queue.open(tmp_path)
    job = queue.submit(tiny(tiny_sd15_dir, epochs=200))[0]
    folder = queue.store.folder(job.id)
    wait_for(lambda: queue.get(job.id).step >= 1, 60, "the first step")
    assert queue.process_id(job.id) not in (None, os.getpid())
    # Its folder stays the job's while the process trains: the CLI is refused there.
    with pytest.raises(ConfigError, match="workspace_dir"):
        refuse_server_job_folders({"workspace_dir": str(folder)})
    queue.request("save")
    wait_for(lambda: queue.get(job.id).outputs, 60, "the intermediate save")
    assert "-step" in Path(queue.get(job.id).outputs[0]).name
    queue.cancel(job.id)
    assert queue.wait(60)
    stopped = queue.get(job.id)
    assert stopped.status == "stopped", stopped.message
    assert 1 <= stopped.step < stopped.total_steps == 1000
    assert resume.newest_backup_step(folder) == stopped.step  # a backup to continue from
    assert Path(stopped.output_path).is_file()
    assert queue.process_id(job.id) is None


def test_a_killed_job_process_fails_its_job_and_the_queue_goes_on(tmp_path, tiny_sd15_dir):
    queue = JobQueue()
    queue.open(tmp_path)
    doomed = queue.submit(tiny(tiny_sd15_dir, epochs=200))[0]
    after = queue.submit(tiny(tiny_sd15_dir))[0]
    wait_for(lambda: queue.get(doomed.id).step >= 1, 60, "the first step")
    os.kill(queue.process_id(doomed.id), signal.SIGKILL)  # as the kernel's OOM killer does
    assert queue.wait(120)
    failed = queue.get(doomed.id)
    assert failed.status == "failed"
    assert "training process was killed by SIGKILL" in failed.error
    assert failed.message == failed.error
    assert not (queue.store.folder(doomed.id) / ".server.lock").exists()  # folder freed
    finished = queue.get(after.id)
    assert finished.status == "finished", finished.message
    assert Path(finished.outputs[0]).is_file()


def test_each_job_process_gets_its_own_gpu_or_a_share_of_the_cores(monkeypatch):
    env = {"PATH": "/bin"}
    pinned = [child.child_environment(slot, 2, 2, env)["CUDA_VISIBLE_DEVICES"]
              for slot in range(3)]
    assert pinned == ["0", "1", "0"]
    # A server started on some of the GPUs counts among those it sees.
    visible = {**env, "CUDA_VISIBLE_DEVICES": "3,5"}
    assert child.child_environment(1, 2, 2, visible)["CUDA_VISIBLE_DEVICES"] == "5"
    on_cpu = child.child_environment(1, 2, 0, env)
    assert "CUDA_VISIBLE_DEVICES" not in on_cpu
    assert on_cpu["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert child.child_environment(0, 2, 0, {**env, "OMP_NUM_THREADS": "3"})[
        "OMP_NUM_THREADS"] == "3"  # the user's own setting wins
    assert child.child_environment(0, 1, 0, env).get("OMP_NUM_THREADS") is None
    # The default: one job per GPU, one on a CPU.
    monkeypatch.setattr(queue_module, "cuda_device_count", lambda: 0)
    assert queue_module.default_concurrency() == 1
    monkeypatch.setattr(queue_module, "cuda_device_count", lambda: 4)
    assert queue_module.default_concurrency() == 4


def test_each_owners_jobs_share_their_own_cache_folder(tmp_path, gate, monkeypatch):
    """A job's process is pointed at its owner's latent/text cache (every job runs in a new
    folder, where a cache would serve no later job): the workspace's on a local server, each
    user's own on a shared one."""
    from trainer.data.cache import DATA_CACHE_ENV
    from trainer.ownership import Realm
    caches: dict[int, str] = {}

    class Child:  # the job's process, as the queue starts it; the gate trains
        def __init__(self, env, label):
            self.env, self.pid = env, None

        def __call__(self, config, control, **kwargs):
            caches[config.seed] = self.env[DATA_CACHE_ENV]
            return gate(config, control, **kwargs)
    monkeypatch.setattr(queue_module, "TrainInChild", Child)

    def run(queue, seed, viewer=Viewer()):
        queue.submit(plain(seed=seed, base_model_name="org/model",
                           workspace_dir=str(queue.realm.workspace / "run")), viewer)
        gate.release(seed)
        assert queue.wait(30)
        return Path(caches[seed])

    local = JobQueue()
    local.open(tmp_path / "local")
    assert run(local, 1) == run(local, 2) == (tmp_path / "local").resolve() / "cache"
    shared = JobQueue()
    workspace = tmp_path / "shared"
    shared.open(workspace, realm=Realm(workspace, shared=True, confine=True,
                                       public=(DEMO_DATASET_DIR,)))
    ann, bob = Viewer("ann", admin=False), Viewer("bob", admin=False)
    users = workspace.resolve() / "users"
    assert run(shared, 3, ann) == run(shared, 4, ann) == users / "ann" / "cache"
    assert run(shared, 5, bob) == users / "bob" / "cache"


def test_a_resumed_job_shows_each_step_once_in_tensorboard(tmp_path, tiny_sd15_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    queue = JobQueue(train_fn=train)  # the loop's own logging: no process needed
    queue.open(tmp_path)
    job = queue.submit(tiny(tiny_sd15_dir, epochs=2, backup_after=4, backup_after_unit="STEP",
                            backup_before_save=False))[0]
    assert queue.wait(120)
    folder = queue.store.folder(job.id)
    # As if the server had died after step 10 and before its backup at step 8 was written.
    shutil.rmtree(folder / "backup" / "step-8")
    assert resume.newest_backup_step(folder) == 4
    queue.store.update(job.id, status=RUNNING)
    again = JobQueue(train_fn=train)
    again.open(tmp_path)  # the job runs again from its backup at step 4
    assert again.wait(120)
    assert again.get(job.id).status == "finished"
    assert again.get(job.id).note == "Continued from its backup at step 4 after a restart."
    assert metric_steps(folder) == list(range(1, 11))
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(1, 11))
    assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_cancel_stops_a_job_that_is_still_preparing(tmp_path, tiny_sd15_dir):
    # A million epochs of 200 images: before step 1 the loop counts each epoch's steps, a
    # long preparation in which it never looks at Stop; the job's process is ended instead.
    from PIL import Image
    images = tmp_path / "many"
    images.mkdir()
    for i in range(200):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(images / f"{i}.png")
    queue = JobQueue()
    queue.open(tmp_path / "ws")
    slow = tiny(tiny_sd15_dir, epochs=1_000_000, concepts=[{"path": str(images)}])
    job = queue.submit(slow)[0]
    after = queue.submit(tiny(tiny_sd15_dir, epochs=1, seed=7))[0]
    wait_for(lambda: queue.get(job.id).message.startswith(("Reading", "Loading")), 120,
             "the job's preparation")
    asked = time.monotonic()
    queue.cancel(job.id)
    wait_for(lambda: queue.get(job.id).status != "running", 20, "the stop")
    assert time.monotonic() - asked < 10
    stopped = queue.get(job.id)
    assert stopped.status == "stopped", stopped.message
    assert stopped.step == 0 and not stopped.outputs and stopped.error is None
    assert "before the first step" in stopped.message
    assert not (queue.store.folder(job.id) / ".server.lock").exists()
    assert queue.wait(120)  # the queue goes on
    assert queue.get(after.id).status == "finished"
