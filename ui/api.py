"""JSON endpoints for programs (gradio_client): submit configs as jobs, watch and cancel them.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860")                  # auth=("ann", "secret") with --auth
    config = client.predict(api_name="/default_config")      # the demo, as JSON
    job = client.predict(config, api_name="/submit_job")      # {"id": 1, "queue_position": 0}
    client.predict(job["id"], api_name="/job_status")         # status, step, total_steps, loss, ...
    client.predict(api_name="/list_jobs")                     # every job you may see
    client.predict(job["id"], api_name="/cancel_job")         # queued: dropped; running: stops
    client.predict(job["id"], "up", api_name="/move_job")     # a queued job one place up/down
    client.predict(job["id"], api_name="/delete_job")         # an ended job and its folder

A refused config raises gradio_client's AppError with the message naming the key. The older
`/start` (returns "started", "queued: ..." or "error: ...") and `/state` (the job the caller
follows, as the footer shows it) remain.

Every endpoint answers for the caller only (their own jobs; an admin's: all), and every
refusal is one sentence: a bug's raw exception text goes to the server's log, never to the
caller.
"""
from __future__ import annotations

import functools
import json
import logging

import gradio as gr

from trainer.config import TrainConfig, check_supported, config_from_dict
from trainer.errors import AtelierError, ConfigError
from trainer.jobs.queue import space_defaults
from trainer.jobs.store import Job
from ui import paths, presets
from ui.jobs_panel import job_number
from ui.state import SESSION, check_paths, start_training, viewer

log = logging.getLogger(__name__)


def parse_config(config_json: str) -> TrainConfig:
    """A JSON config (partial: defaults fill the rest) checked as the page's Start checks
    it; ConfigError names the key."""
    try:
        data = json.loads(config_json) if isinstance(config_json, str) else config_json
    except json.JSONDecodeError as error:
        raise ConfigError(f"the config is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError("The config must be a JSON object.")
    config = config_from_dict(space_defaults(paths.localize_config(data)),
                              warn=lambda message: None)
    check_supported(config)
    check_paths(config)
    return config


def job_dict(job: Job) -> dict:
    """What /job_status and /list_jobs say of a job."""
    return {"id": job.id, "status": job.status, "step": job.step,
            "total_steps": job.total_steps, "loss": job.loss, "smooth_loss": job.smooth_loss,
            "outputs": job.outputs, "queue_position": SESSION.queue_position(job.id),
            "owner": job.owner, "message": job.message, "error": job.error, "note": job.note,
            "backup_step": job.backup_step, "best_validation_loss": job.best_validation_loss,
            "best_validation_step": job.best_validation_step, "created_at": job.created_at,
            "started_at": job.started_at, "ended_at": job.ended_at}


def start(config_json: str, request: gr.Request) -> str:
    """Queue a JSON config. Returns 'started', 'queued: job N at position P' or
    'error: <why it was refused>'."""
    try:
        job, position = start_training(parse_config(config_json), viewer(request))
    except AtelierError as error:
        return f"error: {error}"
    return "started" if position == 0 else f"queued: job {job.id} at position {position}"


def submit_job(config_json: str, request: gr.Request) -> dict:
    """Queue a JSON config as a job: {"id", "queue_position"} (0 = it runs now)."""
    try:
        job, position = start_training(parse_config(config_json), viewer(request))
    except AtelierError as error:
        raise gr.Error(str(error), print_exception=False) from None
    return {"id": job.id, "queue_position": position}


def _job_call(action, job_id):
    """`action(job number)`; gr.Error with one sentence for a value that is no job number
    (text, 10**30) or a job the caller may not see."""
    try:
        return action(job_number(job_id))
    except AtelierError as error:
        raise gr.Error(str(error), print_exception=False) from None


def job_status(job_id: int, request: gr.Request) -> dict:
    """{"id", "status", "step", "total_steps", "loss", "outputs", "queue_position", ...};
    status is queued, running, finished, stopped, failed or interrupted."""
    return job_dict(_job_call(lambda i: SESSION.get(i, viewer(request)), job_id))


def list_jobs(request: gr.Request) -> list:
    """Every job the caller may see, newest first, as /job_status describes them."""
    return [job_dict(job) for job in SESSION.jobs(viewer(request))]


def cancel_job(job_id: int, request: gr.Request) -> dict:
    """Cancel a queued job, or stop a running one after its current step (it saves)."""
    return job_dict(_job_call(lambda i: SESSION.cancel(i, viewer(request)), job_id))


def move_job(job_id: int, direction: str, request: gr.Request) -> dict:
    """Move a queued job one place 'up' or 'down' in the queue."""
    if direction not in ("up", "down"):
        raise gr.Error("direction: write 'up' or 'down'.", print_exception=False)
    _job_call(lambda i: SESSION.move(i, direction, viewer(request)), job_id)
    return job_dict(_job_call(lambda i: SESSION.get(i, viewer(request)), job_id))


def delete_job(job_id: int, request: gr.Request) -> dict:
    """Delete an ended job with its folder."""
    number = _job_call(lambda i: i, job_id)
    _job_call(lambda i: SESSION.delete(i, viewer(request)), number)
    return {"id": number, "deleted": True}


def state(request: gr.Request) -> dict:
    """The caller's followed job, as the footer shows it: status, message, epoch/epochs,
    step/total_steps, loss, smooth_loss, lr, eta_seconds, samples, warnings, output_path,
    error."""
    data = SESSION.state(viewer(request)).as_dict()
    # "file", not "path": gradio_client takes {"path": ...} dicts for files to download.
    data["samples"] = [{("file" if k == "path" else k): v for k, v in sample.items()}
                       for sample in data["samples"]]
    data["loss_history"] = data["loss_history"][-200:]
    data["validation_history"] = data["validation_history"][-200:]
    data["lr_history"] = data["lr_history"][-200:]
    return json.loads(json.dumps(data, default=str))


def default_config() -> str:
    """The demo preset as a full JSON config (a starting point for `start`)."""
    from ui.page import initial_config
    config, memory = initial_config()
    return json.dumps(presets.export_dict(config, memory))


def one_sentence(fn):
    """`fn` whose failures reach the caller as one sentence: a refusal's own message, and for
    anything else (a bug, a library's error) a line saying so, its details in the log only."""
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except AtelierError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception:
            log.exception("The API call %s failed", fn.__name__)
            raise gr.Error(f"{fn.__name__} failed on the server (the server's log says why); "
                           "check the values sent.", print_exception=False) from None
    return guarded


def register() -> None:
    """Name every endpoint (inside the page's Blocks)."""
    for fn in (start, state, default_config, submit_job, job_status, list_jobs, cancel_job,
               move_job, delete_job):
        gr.api(one_sentence(fn), api_name=fn.__name__)
