"""The named endpoints through gradio_client, against the real `python app.py` (no browser)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def client(atelier_server):
    return gradio_client.Client(atelier_server[0], verbose=False)


def wait_state(client, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = client.predict(api_name="/state")
        if predicate(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def all_ended(client, timeout: float = 300) -> None:
    """Wait until no job runs or waits (the footer's state is one job's)."""
    deadline = time.monotonic() + timeout
    while any(job["status"] in ("queued", "running", "interrupted")
              for job in client.predict(api_name="/list_jobs")):
        assert time.monotonic() < deadline, "jobs still running"
        time.sleep(0.5)


def idle(state: dict) -> bool:
    return state["status"] not in ("running", "stopping")


def test_every_event_is_named(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    for name in ("/start", "/state", "/stop", "/default_config", "/start_from_page",
                 "/submit_job", "/job_status", "/list_jobs", "/cancel_job", "/move_job",
                 "/delete_job", "/jobs_open", "/jobs_load_settings",
                 "/sample_now", "/save_now", "/backup_now", "/poll", "/load_preset",
                 "/save_preset", "/export_config", "/import_config", "/switch_optimizer",
                 "/lr_curve", "/apply_visibility"):
        assert name in names, name


def test_start_state_stop_through_the_api(client, atelier_server):
    wait_state(client, idle, 300)
    config = json.loads(client.predict(api_name="/default_config"))
    config["epochs"] = 2
    config["sample_after_unit"] = "NEVER"
    config["workspace_dir"] = str(Path(atelier_server[1]) / "api-run")
    config["output_model_destination"] = str(Path(atelier_server[1]) / "api-run" / "a.safetensors")
    assert client.predict(json.dumps(config), api_name="/start") == "started"
    # A second start queues (issue 15), but never onto the running job's chosen output file.
    second = client.predict(json.dumps(config), api_name="/start")
    assert second.startswith("error:") and "output_model_destination" in second
    queued = client.predict(json.dumps({**config, "output_model_destination": ""}),
                            api_name="/start")
    assert queued.startswith("queued: job ") and queued.endswith("at position 1")
    all_ended(client)
    state = wait_state(client, idle, 300)
    assert state["status"] == "finished", state["message"]
    assert state["step"] == state["total_steps"] == 6
    assert Path(state["output_path"]).is_file()

    config["epochs"] = 5000
    assert client.predict(json.dumps(config), api_name="/start") == "started"
    wait_state(client, lambda s: s["step"] >= 2 and s["total_steps"] == 15000, 120)
    client.predict(api_name="/stop")
    state = wait_state(client, idle, 120)
    assert state["status"] == "stopped" and "saved to" in state["message"]


def test_bad_config_is_refused_with_its_message(client):
    answer = client.predict(json.dumps({"resolution": "512x"}), api_name="/start")
    assert answer.startswith("error:") and "resolution" in answer
    assert client.predict("{not json", api_name="/start").startswith("error: the config is not")
