"""Runs compared: the settings that differ between them, their final and best losses, and their
loss curves overlaid on one picture.

A run is a folder a run wrote (config.json, metrics.jsonl) or a job number, which names the
job's folder in the workspace (`<workspace>/jobs/<id>`, trainer/jobs/store.py). Read from the
files alone: no torch, no gradio; the CLI (`python -m trainer compare`) and the page's Compare
both call it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from trainer.errors import AtelierError
from trainer.io import atomic_save_png
from trainer.jobs.store import JOBS_FOLDER, RECORD_NAME

# Where a run's files went, not how it trained: two runs always differ there (a job's folder
# is its own; a shared server moves each job's output into it), so they are not "settings".
PLACE_KEYS = ("workspace_dir", "output_model_destination")
METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "config.json"

# The plot: one colour per run (the n-th run's), the smoothed training loss as a line and the
# validation loss as squares of the same colour.
PALETTE = ((79, 70, 229), (220, 38, 38), (5, 150, 105), (217, 119, 6), (147, 51, 234),
           (8, 145, 178), (190, 24, 93), (101, 163, 13))
PLOT_SIZE = (900, 500)
MARGIN = (70, 20, 20, 50)  # left, top, right, bottom: room for the axes' numbers


class CompareError(AtelierError):
    """Bad input: not a run folder, no such job, fewer than two runs."""


@dataclass
class Run:
    folder: Path
    label: str                                   # "job 3" or the folder's name
    config: dict[str, Any]
    loss: list[tuple[int, float, float]] = field(default_factory=list)  # step, loss, smoothed
    validation: list[tuple[int, float]] = field(default_factory=list)   # step, loss
    epochs: dict[int, int] = field(default_factory=dict)               # step -> epoch (0-based)

    @property
    def final_loss(self) -> float | None:
        return self.loss[-1][1] if self.loss else None

    @property
    def final_smoothed_loss(self) -> float | None:
        return self.loss[-1][2] if self.loss else None

    @property
    def steps(self) -> int:
        return self.loss[-1][0] if self.loss else 0

    @property
    def best_validation(self) -> tuple[float, int] | None:
        """(loss, step) of the lowest validation loss; the first such step on a tie."""
        if not self.validation:
            return None
        step, value = min(self.validation, key=lambda sv: (sv[1], sv[0]))
        return value, step

    def summary(self) -> dict[str, Any]:
        best = self.best_validation
        return {"folder": str(self.folder), "label": self.label, "steps": self.steps,
                "final_loss": _number(self.final_loss),
                "final_smoothed_loss": _number(self.final_smoothed_loss),
                "best_validation_loss": _number(best[0]) if best else None,
                "best_validation_step": best[1] if best else None}


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def resolve(argument: str, workspace: str | Path | None = None) -> tuple[Path, str]:
    """(folder, label) of a JOB_OR_FOLDER argument: a job number names `<workspace>/jobs/<n>`;
    anything else is a run's folder. CompareError naming the argument otherwise."""
    text = str(argument).strip()
    if text.isdigit() and not Path(text).is_dir():
        if workspace is None:
            from trainer.data.datasets import default_workspace
            workspace = default_workspace()
        folder = Path(workspace) / JOBS_FOLDER / str(int(text))
        if not folder.is_dir():
            raise CompareError(f"JOB_OR_FOLDER '{text}': there is no job {int(text)} in the "
                               f"workspace {workspace} (no folder {folder}).")
        return folder, f"job {int(text)}"
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise CompareError(f"JOB_OR_FOLDER '{text}': no such folder, and not a job number.")
    if not (folder / CONFIG_NAME).is_file() and not (folder / RECORD_NAME).is_file():
        raise CompareError(f"JOB_OR_FOLDER '{text}': not a run's folder (it has no "
                           f"{CONFIG_NAME}, which every run writes when it starts).")
    return folder, folder.name


def read_config(folder: Path) -> dict[str, Any]:
    """The config the run trained with (config.json), else the job's as submitted (job.json:
    a job that never started)."""
    try:
        return json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    try:
        return json.loads((folder / RECORD_NAME).read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def read_run(folder: str | Path, label: str | None = None) -> Run:
    """A run's config and curves from its folder. A metrics line cut short (a killed run) is
    skipped; a step logged twice (a run continued from a backup) keeps its last value."""
    folder = Path(folder)
    run = Run(folder, label or folder.name, read_config(folder))
    losses: dict[int, tuple[float, float | None]] = {}
    validation: dict[int, float] = {}
    try:
        lines = (folder / METRICS_NAME).read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record.get("loss"), (int, float)):  # a training step's line
            if isinstance(record.get("epoch"), int):  # (a validation line's counts epochs done)
                run.epochs[step] = record["epoch"]
            smooth = record.get("smooth_loss")
            losses[step] = (float(record["loss"]),
                            float(smooth) if isinstance(smooth, (int, float)) else None)
        if isinstance(record.get("validation_loss"), (int, float)):
            validation[step] = float(record["validation_loss"])
    # A line without smooth_loss (an older version's) gets the loop's own smoothing: an
    # exponential average (beta 0.9) with bias correction (trainer/metrics.py, which is not
    # imported here: it pulls torch into a command that needs none).
    average, count = 0.0, 0
    for step in sorted(losses):
        loss, smooth = losses[step]
        average, count = 0.9 * average + 0.1 * loss, count + 1
        fallback = average / (1 - 0.9 ** count)
        run.loss.append((step, loss, smooth if smooth is not None else fallback))
    run.validation = sorted(validation.items())
    return run


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys: {"unet": {"train": true}} -> {"unet.train":
    true}, lists by position ("concepts.0.path")."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, (dict, list)) and item:
            out.update(flatten(item, name))
        else:
            out[name] = item
    return out


MISSING = None  # a key one run's config lacks (an older version's) reads as null


def differences(configs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The dotted keys whose values are not the same in every config, with the value of each
    (in order), sorted by key; the run's place (PLACE_KEYS) left out."""
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    out = {}
    for key in keys:
        if key.split(".", 1)[0] in PLACE_KEYS:
            continue
        values = [f.get(key, MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out[key] = values
    return out


def read_runs(arguments: list[str], workspace: str | Path | None = None) -> list[Run]:
    if len(arguments) < 2:
        raise CompareError("JOB_OR_FOLDER: give two or more runs (job numbers or run folders) "
                           "to compare.")
    runs = []
    for argument in arguments:
        folder, label = resolve(argument, workspace)
        runs.append(read_run(folder, label))
    _distinct_labels(runs)
    return runs


def _distinct_labels(runs: list[Run]) -> None:
    """Folders of the same name (two runs' `ws`) labelled by as much of their paths as tells
    them apart ("a/ws", "b/ws")."""
    for depth in range(2, 64):
        labels = [r.label for r in runs]
        if len(set(labels)) == len(labels):
            return
        for run in runs:
            if labels.count(run.label) > 1 and not run.label.startswith("job "):
                run.label = "/".join(run.folder.resolve().parts[-depth:])


def comparison(runs: list[Run]) -> dict[str, Any]:
    """{"differences": {key: [value per run]}, "runs": [summary per run]}."""
    return {"differences": differences([r.config for r in runs]),
            "runs": [r.summary() for r in runs]}


def _shown(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)


def comparison_text(runs: list[Run]) -> str:
    """What `compare` prints: the differing settings as a table, then each run's losses."""
    result = comparison(runs)
    labels = [r.label for r in runs]
    lines = []
    if result["differences"]:
        rows = [["setting", *labels]] + [[key, *map(_shown, values)]
                                         for key, values in result["differences"].items()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines.append("Settings that differ:")
        for row in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    else:
        lines.append("The runs' settings are the same.")
    lines.append("")
    lines.append("Losses:")
    for run, summary in zip(runs, result["runs"]):
        best = ("–" if summary["best_validation_loss"] is None else
                f"{summary['best_validation_loss']:.4f} at step {summary['best_validation_step']}")
        lines.append(f"  {run.label} ({run.folder}): {summary['steps']} steps, final loss "
                     f"{_shown(summary['final_loss'])}, final smoothed loss "
                     f"{_shown(summary['final_smoothed_loss'])}, best validation loss {best}")
    return "\n".join(lines)


# --- The overlaid curves, drawn with PIL (matplotlib is not among the dependencies) -------------

def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw),
               default=10 * magnitude)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def plot_curves(runs: list[Run], *, size: tuple[int, int] = PLOT_SIZE) -> Image.Image:
    """The runs' smoothed training losses (lines) and validation losses (squares), one colour
    per run (PALETTE, in order), over the step, with a legend."""
    width, height = size
    left, top, right, bottom = MARGIN
    picture = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    points = [(s, v) for r in runs for s, _, v in r.loss] + [p for r in runs for p in r.validation]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    x_high = max((s for s, _ in points), default=1) or 1
    y_low = min((v for _, v in points), default=0.0)
    y_high = max((v for _, v in points), default=1.0)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad

    def at(step: float, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / x_high
        y = top + (height - top - bottom) * (1 - (value - y_low) / (y_high - y_low))
        return x, y

    grey, axis = (225, 225, 225), (90, 90, 90)
    for value in _ticks(y_low, y_high):
        y = at(0, value)[1]
        draw.line([(left, y), (width - right, y)], fill=grey)
        draw.text((4, y - 6), f"{value:.3g}", fill=axis)
    for step in _ticks(0, x_high):
        x = at(step, y_low)[0]
        draw.line([(x, top), (x, height - bottom)], fill=grey)
        draw.text((x - 8, height - bottom + 4), f"{step:g}", fill=axis)
    draw.rectangle([left, top, width - right, height - bottom], outline=axis)
    draw.text((width // 2 - 12, height - 18), "step", fill=axis)
    for n, run in enumerate(runs):
        colour = PALETTE[n % len(PALETTE)]
        line = [at(s, v) for s, _, v in run.loss if math.isfinite(v)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            x, y = line[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        for step, value in run.validation:
            if math.isfinite(value):
                x, y = at(step, value)
                draw.rectangle([x - 3, y - 3, x + 3, y + 3], fill=colour)
        # the legend: the run's line (smoothed loss) and square (validation loss) swatches
        legend_x, legend_y = width - right - 200, top + 6 + 16 * n
        draw.line([(legend_x, legend_y + 6), (legend_x + 18, legend_y + 6)], fill=colour,
                  width=3)
        draw.rectangle([legend_x + 24, legend_y + 3, legend_x + 30, legend_y + 9], fill=colour)
        draw.text((legend_x + 36, legend_y), run.label[:26], fill=(20, 20, 20))
    draw.text((left + 6, top + 4), "line: smoothed training loss   square: validation loss",
              fill=axis)
    return picture


def write_plot(runs: list[Run], path: str | Path) -> Path:
    """The overlaid curves as PNG at `path`, written atomically."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise CompareError(f"--plot '{path}': give a file name ending in .png.")
    if path.is_dir():
        raise CompareError(f"--plot '{path}' is a folder; give a file name ending in .png.")
    atomic_save_png(plot_curves(runs), path)
    return path
