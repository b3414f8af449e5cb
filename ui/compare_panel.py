"""The page's Compare: pick two or more jobs and see their loss and validation-loss curves on one
plot (x = step or epoch; every job's smoothed loss is the loop's same smoothing), the settings
that differ between them, and their sample grids side by side at the steps they share.

The reading and the differences are the engine's (trainer/compare.py, what `python -m trainer
compare` prints); the grids are trainer/sample_grid.py's, drawn as ui/sample_grid_panel.py draws
them. A visitor compares only jobs they may see (another owner's job reads as no job).
Handlers are plain functions of (viewer, values) returning `{name: value}`; `build_panel` binds
them.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from trainer.compare import Run, differences, read_run
from trainer.errors import AtelierError
from trainer.jobs.queue import Viewer
from trainer.ownership import Access
from ui import sample_grid_panel
from ui.files import message_html
from ui.state import SESSION, realm, viewer as viewer_of

MAX_GRIDS = 4     # grids side by side (the plot and the table take every job chosen)
MAX_JOBS = 8
X_CHOICES = ("step", "epoch")


def job_choices(viewer: Viewer) -> list[tuple[str, int]]:
    return [(f"Job {job.id} · {job.status}", job.id) for job in SESSION.jobs(viewer)]


def refresh(viewer: Viewer, selected=None) -> dict:
    """The job list (the visitor's), keeping what is still there of the selection."""
    choices = job_choices(viewer)
    ids = {value for _, value in choices}
    kept = [s for s in (selected or []) if s in ids]
    return {"jobs": gr.update(choices=choices, value=kept)}


def epoch_positions(run: Run) -> dict[int, float]:
    """step -> epochs trained at the end of it (1.5 = halfway through the second epoch), from
    the epoch each training step of the metrics lies in."""
    per_epoch: dict[int, list[int]] = {}
    for step, _, _ in run.loss:
        per_epoch.setdefault(run.epochs.get(step, 0), []).append(step)
    positions = {}
    for epoch, steps in per_epoch.items():
        for n, step in enumerate(sorted(steps), 1):
            positions[step] = epoch + n / len(steps)
    return positions


def curves_frame(runs: list[Run], x: str = "step") -> pd.DataFrame:
    """One series per job for the smoothed training loss and one for the validation loss,
    x = step, or epoch (fractional)."""
    data = {"x": [], "loss": [], "series": []}
    for run in runs:
        where = epoch_positions(run) if x == "epoch" else None
        for step, _, smooth in run.loss:
            if math.isfinite(smooth):
                data["x"].append(where.get(step, 0.0) if where else step)
                data["loss"].append(smooth)
                data["series"].append(f"{run.label} loss")
        for step, value in run.validation:
            if math.isfinite(value):
                data["x"].append(where.get(step, 0.0) if where else step)
                data["loss"].append(value)
                data["series"].append(f"{run.label} validation")
    return pd.DataFrame(data).rename(columns={"x": x})


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)


def settings_html(runs: list[Run]) -> str:
    """The keys whose values differ between the jobs, a row each, and their losses."""
    found = differences([r.config for r in runs])
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    if found:
        rows = "".join(f"<tr data-key='{html.escape(key)}'><td><code>{html.escape(key)}</code>"
                       f"</td>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in values)
                       + "</tr>" for key, values in found.items())
    else:
        rows = f"<tr><td colspan='{len(runs) + 1}'>The settings are the same.</td></tr>"
    summaries = [r.summary() for r in runs]
    losses = ""
    for label, key in (("final loss", "final_loss"), ("final smoothed loss",
                                                      "final_smoothed_loss")):
        losses += (f"<tr class='compare-loss'><td><i>{label}</i></td>"
                   + "".join(f"<td>{_cell(s[key])}</td>" for s in summaries) + "</tr>")
    losses += ("<tr class='compare-loss'><td><i>best validation loss</i></td>"
               + "".join("<td>–</td>" if s["best_validation_loss"] is None else
                         f"<td>{s['best_validation_loss']:.4f} (step "
                         f"{s['best_validation_step']})</td>" for s in summaries) + "</tr>")
    return (f"<table id='compare-table'><thead><tr><th>setting</th>{head}</tr></thead>"
            f"<tbody>{rows}{losses}</tbody></table>")


def compare(viewer: Viewer, selected, x: str = "step") -> dict:
    """The plot, the table and the grids of the chosen jobs, or a message saying why not."""
    ids = list(dict.fromkeys(selected or []))
    if len(ids) < 2:
        return {"message": message_html("Choose two or more jobs to compare.", ok=False)}
    if len(ids) > MAX_JOBS:
        return {"message": message_html(f"Choose at most {MAX_JOBS} jobs to compare.",
                                        ok=False)}
    access = Access(realm(), viewer)
    runs, folders = [], []
    try:
        for value in ids:
            from ui.jobs_panel import job_number
            job = SESSION.get(job_number(value), viewer)
            folder = SESSION.store.folder(job.id)
            if not access.can_read(folder):
                raise AtelierError(f"There is no job {job.id}.")
            runs.append(read_run(folder, f"job {job.id}"))
            folders.append(folder)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    # Both plots filled, the chosen one shown: a LinePlot's x column is fixed when it is
    # drawn (an update of `x` leaves the browser's plot reading the old column).
    x = x if x in X_CHOICES else "step"
    out = {"plot": gr.update(value=curves_frame(runs, "step"), visible=x == "step"),
           "plot_epoch": gr.update(value=curves_frame(runs, "epoch"), visible=x == "epoch"),
           "table": settings_html(runs), "message": ""}
    grids = [sample_grid_panel.grid_for(f, access) for f in folders[:MAX_GRIDS]]
    drawn = [g for g in grids if g]
    shared = set.intersection(*(set(g.steps) for g in drawn)) if drawn else set()
    note = ""
    if drawn and not shared:
        note = "The jobs drew their samples at no common step: each grid shows its own steps."
    elif len(drawn) > 1:
        note = f"The grids show the {len(shared)} step(s) at which every job drew samples."
    if len(ids) > MAX_GRIDS:
        note += f" Grids of the first {MAX_GRIDS} jobs."
    for n in range(MAX_GRIDS):
        grid = grids[n] if n < len(grids) else None
        if grid and shared:
            grid = grid.limited(shared)
        items, columns = sample_grid_panel.gallery_value(grid, every_column=True)
        out[f"grid{n}"] = gr.update(value=items, columns=columns, visible=n < len(grids),
                                    label=runs[n].label if n < len(runs) else "")
    out["grid_note"] = note.strip()
    return out


@dataclass
class ComparePanel:
    jobs: gr.Dropdown
    on_load: tuple   # (fn, inputs, outputs) for the page's load event: the visitor's jobs


def build_panel() -> ComparePanel:
    """Draw the panel and bind its events."""
    with gr.Accordion("Compare jobs", open=False, elem_id="section-compare-jobs"):
        with gr.Row(equal_height=True):
            jobs = gr.Dropdown(label="Jobs", choices=[], value=[], multiselect=True,
                               max_choices=MAX_JOBS, scale=4, elem_id="compare-jobs",
                               info="Two or more jobs: their curves, the settings that "
                                    "differ, and their samples at the same steps.")
            x = gr.Radio(list(X_CHOICES), value="step", label="x axis", scale=1,
                         elem_id="compare-x")
            refresh_btn = gr.Button("Refresh", elem_id="compare-refresh", scale=0,
                                    min_width=90)
            run = gr.Button("Compare", variant="primary", elem_id="compare-run", scale=0,
                            min_width=100)
        message = gr.HTML(elem_id="compare-message")
        # No first value: a LinePlot drawn first with an empty frame keeps that frame's (no)
        # series and never draws the jobs' lines later (gradio 6.31, seen in a browser).
        plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss (smoothed) and "
                           "validation loss", height=260, elem_id="compare-plot")
        plot_epoch = gr.LinePlot(x="epoch", y="loss", color="series", title="Loss (smoothed) "
                                 "and validation loss", height=260, visible=False,
                                 elem_id="compare-plot-epoch")
        table = gr.HTML(elem_id="compare-settings")
        grid_note = gr.Markdown(elem_id="compare-grid-note")
        with gr.Row(elem_id="compare-grids"):
            grids = [gr.Gallery(label=f"Job {n + 1}", columns=1, height="auto",
                                object_fit="contain", interactive=False, visible=False,
                                elem_id=f"compare-grid-{n}") for n in range(MAX_GRIDS)]
    names = {"jobs": jobs, "message": message, "plot": plot, "plot_epoch": plot_epoch,
             "table": table,
             "grid_note": grid_note, **{f"grid{n}": g for n, g in enumerate(grids)}}
    shown = ["message", "plot", "plot_epoch", "table", "grid_note",
             *[f"grid{n}" for n in range(MAX_GRIDS)]]

    def compared(selected, x_value, request: gr.Request):
        out = compare(viewer_of(request), selected, x_value)
        return [out.get(k, gr.skip()) for k in shown]

    def listed(selected, request: gr.Request):
        return refresh(viewer_of(request), selected)["jobs"]

    run.click(compared, [jobs, x], [names[k] for k in shown], api_name="compare_jobs")
    x.change(compared, [jobs, x], [names[k] for k in shown], api_name=False,
             show_progress="hidden")
    refresh_btn.click(listed, jobs, jobs, api_name="compare_refresh", show_progress="hidden")
    jobs.focus(listed, jobs, jobs, api_name=False, show_progress="hidden")
    return ComparePanel(jobs=jobs, on_load=(listed, jobs, jobs))
