"""The page's Jobs panel: every job the visitor may see (status, queue position, progress,
start and end, duration, final loss, outputs), cancel / move / delete, and a finished job
opened: its loss and LR curves, samples, config and output files. "Load these settings" (bound
by the page, which owns the fields) fills the page from the opened job's config.

Handlers are plain functions of (values, viewer) returning `{name: value}`, so tests call them
directly; `build_panel` binds them with the visitor taken from the gradio request.
"""
from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from trainer.errors import AtelierError
from trainer.finetune import config_path
from trainer.jobs.queue import Viewer
from trainer.jobs.queue import job_number as engine_job_number
from trainer.jobs.resume import METRICS_NAME
from trainer.jobs.store import Job
from trainer.ownership import Access
from ui import footer, sample_grid_panel
from ui.files import message_html
from ui.state import OPTIONS, SESSION, realm, viewer as viewer_of

REFRESH_SECONDS = 2.0
MAX_ROWS = 200
CSS = """
#jobs-table table { width: 100%; border-collapse: collapse; font-size: 13px;
  font-variant-numeric: tabular-nums; }
#jobs-table th, #jobs-table td { padding: 3px 8px; border-bottom: 1px solid
  var(--border-color-primary); text-align: left; vertical-align: top; }
#jobs-table .job-note { opacity: .75; font-size: 12px; }
"""




def job_number(value) -> int:
    """A job id as the store keys it, from what a page or a program sent (an int, a whole
    float, a string of digits: the engine's `job_number`); AtelierError naming job_id for
    anything else (text, 10**30, a NUL byte)."""
    number = engine_job_number(int(value) if isinstance(value, float) and value.is_integer()
                               else value)
    if number is None:
        shown = value if isinstance(value, str) and value.isprintable() else repr(value)
        shown = shown.strip("'") if isinstance(value, str) else shown
        shown = shown if len(shown) <= 40 else shown[:40] + "…"
        raise AtelierError(f"job_id: '{shown}' is not a job number.")
    return number


def _chosen(selected) -> int | None:
    """The chooser's job, None when none is chosen or the value is no job number."""
    try:
        return None if selected in (None, "") else job_number(selected)
    except AtelierError:
        return None


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "–"


def _loss(job: Job) -> str:
    value = job.smooth_loss if job.smooth_loss is not None else job.loss
    return "–" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _best_validation(job: Job) -> str:
    if job.best_validation_loss is None:
        return "–"
    return f"{job.best_validation_loss:.4f} (step {job.best_validation_step})"


def _outputs(job: Job) -> str:
    names = [Path(p).name for p in job.outputs if Path(p).exists()]
    return ", ".join(names) or "–"


def table_html(jobs: list[Job], show_owner: bool) -> str:
    if not jobs:
        return "<div id='jobs-empty'>No jobs yet: Start queues one.</div>"
    heads = ["Job", *(["Owner"] if show_owner else []), "Status", "Queue", "Progress",
             "Started", "Ended", "Duration", "Final loss", "Best validation", "Outputs"]
    rows = []
    for job in jobs[:MAX_ROWS]:
        position = SESSION.queue_position(job.id)
        progress = f"{job.step} / {job.total_steps}" if job.total_steps else "–"
        message = job.error or job.note or ""
        cells = [f"{job.id}", *([html.escape(job.owner or '–')] if show_owner else []),
                 f"<span class='job-status'>{job.status}</span>"
                 + (f"<div class='job-note'>{html.escape(message)}</div>" if message else ""),
                 f"<span class='job-position'>{position if position else '–'}</span>",
                 progress, _when(job.started_at), _when(job.ended_at),
                 footer.format_seconds(job.duration), _loss(job), _best_validation(job),
                 html.escape(_outputs(job))]
        rows.append(f"<tr data-job-id='{job.id}' data-status='{job.status}' "
                    f"data-position='{position if position is not None else ''}'>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in heads)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def refresh(viewer: Viewer, selected=None) -> dict:
    jobs = SESSION.jobs(viewer)
    ids = [job.id for job in jobs]
    value = _chosen(selected) if _chosen(selected) in ids else (ids[0] if ids else None)
    notice = SESSION.store.notice if SESSION.store is not None and viewer.admin else ""
    return {"table": table_html(jobs, show_owner=OPTIONS.login and viewer.admin),
            "choice": gr.update(choices=[(f"Job {i}", i) for i in ids], value=value),
            "store_notice": message_html(notice, ok=False) if notice else ""}


def _act(action, done, viewer: Viewer, selected) -> dict:
    if selected in (None, ""):
        return {"message": message_html("Choose a job first.", ok=False)}
    try:
        text = done(action(job_number(selected), viewer))
    except AtelierError as error:
        return {**refresh(viewer, selected), "message": message_html(str(error), ok=False)}
    return {**refresh(viewer, selected), "message": message_html(text)}


def cancel(viewer: Viewer, selected) -> dict:
    return _act(SESSION.cancel, lambda job: f"Job {job.id}: {job.message}", viewer, selected)


def move(direction: str):
    def run(viewer: Viewer, selected) -> dict:
        return _act(lambda i, v: SESSION.move(i, direction, v),
                    lambda position: f"Job {selected} is now at queue position {position}.",
                    viewer, selected)
    return run


def delete(viewer: Viewer, selected) -> dict:
    out = _act(lambda i, v: SESSION.delete(i, v), lambda _: f"Deleted job {selected}.",
               viewer, selected)
    out["detail"] = gr.update(visible=False)
    return out


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def curves(records: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(loss frame, LR frame) in the footer's plot shapes."""
    steps = [r for r in records if "loss" in r]  # the others are validation measurements
    loss = [(r["step"], r["loss"], r.get("smooth_loss", r["loss"])) for r in steps]
    lr = [(r["step"], max((r.get("lr") or {}).values(), default=0.0)) for r in steps]
    validation = [(r["step"], r["validation_loss"]) for r in records if "validation_loss" in r]
    from trainer.session import JobState
    state = JobState(loss_history=loss, lr_history=lr, validation_history=validation)
    return footer.loss_frame(state), footer.lr_frame(state)


def open_job(viewer: Viewer, selected) -> dict:
    """The job's curves, samples, config and outputs (the files among them that the viewer
    may read: an output written outside the job's folder is checked on its own)."""
    if selected in (None, ""):
        return {"message": message_html("Choose a job first.", ok=False)}
    try:
        job = SESSION.get(job_number(selected), viewer)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    access = Access(realm(), viewer)
    folder = SESSION.store.folder(job.id)
    loss, lr = curves(read_metrics(folder) if access.can_read(folder) else [])
    samples = sorted((p for p in (folder / "samples").glob("**/*.png")
                      if access.can_read(p)), key=lambda p: p.stat().st_mtime)
    gallery = [(footer.servable(p), p.stem) for p in reversed(samples)]
    # The samples as one grid picture (a row per prompt, a column per sampling point) first
    # among the files. (A grid gallery in this update stopped the page from applying any of
    # it: seen in the browser with gradio 6.31; the Samples tab draws the grid.)
    grid = sample_grid_panel.grid_for(folder, access)
    files = [sample_grid_panel.grid_file(folder, access)] if grid else []
    for output in job.outputs:
        for candidate in (Path(output), config_path(Path(output))):
            if (candidate.is_file() and access.can_read(candidate)
                    and footer.servable(candidate) not in files):
                files.append(footer.servable(candidate))
    facts = [f"**Job {job.id}** · {job.status}",
             f"step {job.step} / {job.total_steps}" if job.total_steps else "",
             f"final loss {_loss(job)}", f"duration {footer.format_seconds(job.duration)}"]
    summary = " · ".join(f for f in facts if f)
    for line in (job.note, job.error or job.message):
        if line:
            summary += f"\n\n{line}"
    return {"detail": gr.update(visible=True), "summary": summary, "loss": loss, "lr": lr,
            "gallery": gallery, "config": json.dumps(job.config, indent=2),
            "files": files or None, "message": ""}


@dataclass
class JobsPanel:
    choice: gr.Dropdown
    load: gr.Button
    message: gr.HTML
    refresh: object              # the page binds it to its load event too
    refresh_inputs: list
    refresh_outputs: list


def build_panel() -> JobsPanel:
    """Draw the panel and bind its events; the page binds `load` (it owns the fields)."""
    with gr.Accordion("Jobs", open=True, elem_id="section-jobs"):
        store_notice = gr.HTML(elem_id="jobs-store-notice")
        table = gr.HTML("", elem_id="jobs-table")
        with gr.Row(equal_height=True):
            choice = gr.Dropdown(label="Job", choices=[], value=None, scale=2, min_width=140,
                                 elem_id="jobs-choice", interactive=True)
            open_btn = gr.Button("Open", elem_id="jobs-open", scale=0, min_width=80)
            up = gr.Button("Move up", elem_id="jobs-up", scale=0, min_width=90)
            down = gr.Button("Move down", elem_id="jobs-down", scale=0, min_width=100)
            cancel_btn = gr.Button("Cancel / stop", variant="stop", elem_id="jobs-cancel",
                                   scale=0, min_width=120)
            delete_btn = gr.Button("Delete", elem_id="jobs-delete", scale=0, min_width=80)
        message = gr.HTML(elem_id="jobs-message")
        with gr.Column(visible=False, elem_id="jobs-detail") as detail:
            summary = gr.Markdown(elem_id="jobs-summary")
            load = gr.Button("Load these settings", elem_id="jobs-load", size="sm")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss",
                                        height=200, elem_id="jobs-loss",
                                        color_map={"loss": "#94a3b8", "smoothed": "#4f46e5"})
                lr_plot = gr.LinePlot(x="step", y="learning rate", title="Learning rate",
                                      height=200, elem_id="jobs-lr")
            gallery = gr.Gallery(label="Samples", columns=8, height=180, elem_id="jobs-gallery",
                                 object_fit="contain", interactive=False)
            config = gr.Code(label="Config", language="json", elem_id="jobs-config",
                             interactive=False)
            files = gr.File(label="Outputs", file_count="multiple", interactive=False,
                            elem_id="jobs-files")
    seen = gr.State(None)  # (table HTML, job choices) last sent
    timer = gr.Timer(REFRESH_SECONDS)
    names = {"table": table, "choice": choice, "message": message, "detail": detail,
             "summary": summary, "loss": loss_plot, "lr": lr_plot, "gallery": gallery,
             "config": config, "files": files, "store_notice": store_notice}

    def bind(handler, outputs: list[str], api_name: str):
        out = [names[k] for k in outputs]

        def run(selected, request: gr.Request):
            result = handler(viewer_of(request), selected)
            return [result.get(k, gr.skip()) for k in outputs]
        run.__name__ = api_name
        return run, out

    listing = ["table", "choice", "store_notice", "message"]
    for button, handler, outputs, api in [
            (open_btn, open_job, ["detail", "summary", "loss", "lr", "gallery", "config",
                                  "files", "message"], "jobs_open"),
            (cancel_btn, cancel, listing, "jobs_cancel"), (up, move("up"), listing, "jobs_up"),
            (down, move("down"), listing, "jobs_down"),
            (delete_btn, delete, [*listing, "detail"], "jobs_delete")]:
        fn, out = bind(handler, outputs, api)
        button.click(fn, choice, out, api_name=api, show_progress="minimal")

    def tick(last, selected, request: gr.Request):
        """Redraw the table when it changed; the job chooser only when the list of jobs
        changed, so that a running job's progress never resets what the visitor picks."""
        result = refresh(viewer_of(request), selected)
        table_now, ids = result["table"], result["choice"]["choices"]
        table_then, ids_then = last or ("", None)
        if table_now == table_then and ids == ids_then:
            return gr.skip(), gr.skip(), gr.skip(), last
        return (table_now if table_now != table_then else gr.skip(),
                result["choice"] if ids != ids_then else gr.skip(),
                result["store_notice"], (table_now, ids))

    tick_outputs = [table, choice, store_notice, seen]
    timer.tick(tick, [seen, choice], tick_outputs, api_name="jobs_refresh",
               show_progress="hidden")
    return JobsPanel(choice=choice, load=load, message=message, refresh=tick,
                     refresh_inputs=[seen, choice], refresh_outputs=tick_outputs)
