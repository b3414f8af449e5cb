"""The footer: Start / Stop / Sample now / Save now, the epoch and step bars, status, ETA, loss,
and (just above it) the loss and learning-rate plots and the download of the finished model.

Everything shown is rendered from the session's `JobState`, polled by a `gr.Timer`, so a
reloaded page or a second browser shows the running job as it is.
"""
from __future__ import annotations

import hashlib
import html
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from trainer.session import JobState

MAX_PLOT_POINTS = 1000
PLOT_SECONDS = 3.0
STATUS_WORDS = {"idle": "Idle", "running": "Training", "stopping": "Stopping",
                "finished": "Finished", "stopped": "Stopped", "failed": "Failed"}


def progress_bar(label: str, value: int, total: int, fraction: float, elem: str) -> str:
    """An HTML bar reading 'label x / y', filled to `fraction`."""
    fraction = max(0.0, min(1.0, fraction))
    text = f"{label} {value} / {total}" if total else f"{label} – / –"
    return (f'<div class="atelier-bar" id="{elem}" data-value="{value}" data-total="{total}">'
            f'<div class="atelier-bar-fill" style="width:{fraction * 100:.1f}%"></div>'
            f'<span class="atelier-bar-text">{html.escape(text)}</span></div>')


def format_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def bars(state: JobState) -> tuple[str, str]:
    """(epoch bar, step bar). The epoch bar reads the epoch being trained (1-based) and fills
    with the share really done, the current epoch's steps included."""
    epochs, total = state.epochs, state.total_steps
    if state.status == "finished":
        epoch, done = epochs, 1.0
    else:
        epoch = min(state.epoch + 1, epochs) if state.step else 0
        partial = state.epoch_step / state.steps_per_epoch if state.steps_per_epoch else 0.0
        if state.steps_per_epoch and state.epoch_step == state.steps_per_epoch:
            partial = 1.0
        done = (state.epoch + partial) / epochs if epochs else 0.0
    epoch_html = progress_bar("Epoch", epoch, epochs, done, "epoch-bar")
    step_html = progress_bar("Step", state.step, total, state.step / total if total else 0.0,
                             "step-bar")
    return epoch_html, step_html


def status_html(state: JobState) -> str:
    word = STATUS_WORDS.get(state.status, state.status)
    loss = "–" if state.loss is None else f"{state.loss:.4f}"
    smooth = "–" if state.smooth_loss is None else f"{state.smooth_loss:.4f}"
    lr = max(state.lr.values()) if state.lr else None
    eta = format_seconds(state.eta_seconds) if state.running else "–"
    facts = [("ETA", eta), ("Elapsed", format_seconds(state.elapsed_seconds)
                            if state.status != "idle" else "–"),
             ("Loss", loss), ("Smoothed loss", smooth),
             ("LR", "–" if lr is None else f"{lr:.2e}")]
    cells = "".join(f'<span class="atelier-fact"><b>{k}</b> <span data-fact="{k}">'
                    f'{html.escape(v)}</span></span>' for k, v in facts)
    return (f'<div class="atelier-status atelier-{state.status}" id="job-status" '
            f'data-status="{state.status}">'
            f'<span class="atelier-badge">{word}</span> '
            f'<span class="atelier-message" id="job-message">{html.escape(state.message)}</span>'
            f'<div class="atelier-facts">{cells}</div></div>')


def warnings_markdown(state: JobState) -> str:
    if not state.warnings:
        return ""
    shown = state.warnings[-8:]
    more = len(state.warnings) - len(shown)
    lines = [f"- ⚠ {w}" for w in shown]
    if more:
        lines.insert(0, f"- … {more} earlier warnings")
    return "**Warnings**\n" + "\n".join(lines)


def _thin(rows: list, limit: int = MAX_PLOT_POINTS) -> list:
    if len(rows) <= limit:
        return rows
    stride = math.ceil(len(rows) / limit)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


LOSS_SERIES = ("loss", "smoothed", "validation")


def loss_frame(state: JobState) -> pd.DataFrame:
    """The training loss, its smoothed line and the validation loss (a point per
    measurement). Every series has a row from the start, an empty point where it has none
    yet: a LinePlot whose colour column starts without a series never draws it later
    (gradio 6.31)."""
    data = {"step": [], "loss": [], "series": []}
    for step, loss, smooth in _thin(state.loss_history):
        data["step"] += [step, step]
        data["loss"] += [loss, smooth]
        data["series"] += ["loss", "smoothed"]
    for step, value in _thin(state.validation_history):
        data["step"].append(step)
        data["loss"].append(value)
        data["series"].append("validation")
    for series in LOSS_SERIES:
        if series not in data["series"]:
            data["step"].append(0)
            data["loss"].append(math.nan)
            data["series"].append(series)
    return pd.DataFrame(data)


def lr_frame(state: JobState) -> pd.DataFrame:
    rows = _thin(state.lr_history)
    return pd.DataFrame({"step": [r[0] for r in rows], "learning rate": [r[1] for r in rows]})


# --- Files the browser may fetch ----------------------------------------------------------------
#
# The workspace is not a folder gradio's file route serves (app.py gives it no allowed_paths):
# a file reaches the browser only when a handler returns it, after asking `access.can_read`
# whether this visitor may see it. Gradio then copies it into its cache under a name made of
# a hash of its content, and serves that copy; nobody can name another user's file there.

_SERVE_DIR = Path(tempfile.gettempdir()) / "atelier-serve"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def servable(path: str | os.PathLike) -> str:
    """A path gradio accepts to copy into its cache: as is inside the working folder or the
    temp folder (gradio's own rule), else a copy in a temp folder (a workspace elsewhere, such
    as /data on a Space, still shows its samples and downloads)."""
    source = Path(path).resolve()
    roots = [Path(tempfile.gettempdir()).resolve(), Path.cwd().resolve()]
    # gradio refuses a dot-file of the working folder; a copy has no such rule
    if any(_inside(source, root) for root in roots) and not source.name.startswith("."):
        return str(source)
    digest = hashlib.sha256(str(source.parent).encode("utf-8")).hexdigest()[:16]
    target = _SERVE_DIR / digest / source.name.lstrip(".")
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return str(target)


def _readable(path: str | os.PathLike, access) -> bool:
    """`path` is a file this visitor may see (no `access`: a local caller, every file)."""
    return os.path.isfile(path) and (access is None or access.can_read(path))


def gallery_items(state: JobState, access=None) -> list[tuple[str, str]]:
    """The job's samples, newest first, those `access` may read."""
    items = []
    for sample in reversed(state.samples):  # newest first
        if _readable(sample["path"], access):
            caption = f"step {sample['step']} · {sample['prompt']}"
            items.append((servable(sample["path"]), caption))
    return items


def download_files(state: JobState, access=None) -> list[str] | None:
    """The finished (or stopped) model and the config beside it, when they exist (and
    `access` may read them)."""
    if state.status not in ("finished", "stopped") or not state.output_path:
        return None
    files = []
    model = Path(state.output_path)
    for candidate in (model, model.with_suffix(".json")):
        if _readable(candidate, access):
            files.append(servable(candidate))
    return files or None


def limits_line(limits, import_limits) -> str:
    """What a shared server allows one visitor (trainer/limits.py, app.py's options), as the
    footer's one line."""
    parts = []
    if limits.max_steps_per_job:
        parts.append(f"{limits.max_steps_per_job:,} steps per job")
    if limits.max_jobs_per_user:
        parts.append(f"{limits.max_jobs_per_user} running or queued jobs per user")
    if limits.try_max_size or limits.try_max_steps:
        what = [f"{limits.try_max_size} px" if limits.try_max_size else "",
                f"{limits.try_max_steps} steps" if limits.try_max_steps else ""]
        parts.append("Try it " + ", ".join(w for w in what if w))
    if limits.max_caption_chars:
        parts.append(f"captions of {limits.max_caption_chars:,} characters")
    parts.append(f"uploads {import_limits.describe()}")
    return "<small>This shared server's limits: " + html.escape(" · ".join(parts)) + ".</small>"


@dataclass
class Snapshot:
    """What a page last showed, to skip re-sending unchanged plots and images each second."""
    status: str = ""
    step: int = -1
    samples: int = -1
    message: str = ""
    warnings: int = -1
    output: str | None = None
    eta: str = ""
    # When the plots were last sent (not part of the comparison): they are redrawn at most
    # every PLOT_SECONDS while a job runs, so the browser spends its CPU on little else.
    plotted_at: float = field(default=0.0, compare=False)
    plotted_step: int = field(default=-1, compare=False)

    def plots_due(self, last: "Snapshot | None") -> bool:
        """Whether to send the plots now; records it when so."""
        now = time.monotonic()
        due = (last is None or last.status != self.status
               or (self.step != last.plotted_step and now - last.plotted_at >= PLOT_SECONDS))
        if due:
            self.plotted_at, self.plotted_step = now, self.step
        else:
            self.plotted_at, self.plotted_step = last.plotted_at, last.plotted_step
        return due

    @classmethod
    def of(cls, state: JobState) -> "Snapshot":
        return cls(state.status, state.step, len(state.samples), state.message,
                   len(state.warnings), state.output_path,
                   format_seconds(state.elapsed_seconds) if state.running else "")
