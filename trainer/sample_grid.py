"""The samples of a run as a grid: one row per sample prompt, one column per sampling point
(the step, and the epoch it fell in), each cell the image drawn for that prompt at that step.

Read from the run's folder, so a finished run, a reloaded page and a running job (its child
process writes the files) all show the same grid:
    config.json        the sample prompts, by index (trainer/loop.py writes it at the start)
    samples/step{step:06d}-{index}.png     what trainer/sampling.py drew
    metrics.jsonl      the epoch of each step (`{"step": N, "epoch": E, ...}` lines)

`render_grid` draws the grid as one picture with the prompts and steps written on it (what the
page's Download and Publish give); `write_grid_image` writes it atomically. No torch, no gradio:
the page, the CLI and Publish all call it.
"""
from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from trainer.io import atomic_save_png

SAMPLE_NAME = re.compile(r"step(\d+)-(\d+)\.png")
GRID_NAME = "sample-grid.png"  # beside config.json, not in samples/ (galleries glob that)
# A training step's metrics line starts with its step, its epoch (0-based) and its loss
# (MetricsLog writes the dict in the loop's order): reading them with a pattern keeps a long
# run's metrics.jsonl quick to scan. (A validation line's "epoch" counts the epochs done.)
STEP_EPOCH = re.compile(r'\{"step": (\d+), "epoch": (\d+), "loss": ')

# The picture's layout, in pixels: a column of prompts on the left, a row of step labels on
# top, cells of at most MAX_CELL a side (larger samples are scaled down), PAD between them.
LABEL_WIDTH = 220
HEADER_HEIGHT = 40
PAD = 4
MAX_CELL = 256
# At most this many columns in the picture: a long run's points are thinned evenly, the first
# and the last always kept (a 200-point grid of 256 px cells would be 52,000 px wide).
MAX_COLUMNS = 24
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (235, 235, 235)
TEXT = (20, 20, 20)


@dataclass(frozen=True)
class SamplePoint:
    """A column: the step the samples were drawn after, and the epoch (1-based) that step
    belongs to, None where the metrics do not say."""
    step: int
    epoch: int | None = None

    @property
    def label(self) -> str:
        return f"step {self.step}" + (f" · epoch {self.epoch}" if self.epoch else "")


@dataclass(frozen=True)
class SampleGrid:
    folder: Path
    prompts: dict[int, str]                 # row: sample index -> its prompt
    points: tuple[SamplePoint, ...]         # columns, by step
    cells: dict[tuple[int, int], Path] = field(default_factory=dict)  # (index, step) -> file

    @property
    def rows(self) -> list[int]:
        return sorted(self.prompts)

    @property
    def steps(self) -> list[int]:
        return [p.step for p in self.points]

    def cell(self, index: int, step: int) -> Path | None:
        return self.cells.get((index, step))

    def __bool__(self) -> bool:
        return bool(self.cells)

    def limited(self, steps) -> "SampleGrid":
        """The same grid with only the columns of `steps` (those it has)."""
        wanted = set(steps)
        points = tuple(p for p in self.points if p.step in wanted)
        return SampleGrid(self.folder, self.prompts, points,
                          {k: v for k, v in self.cells.items() if k[1] in wanted})

    def thinned(self, most: int) -> "SampleGrid":
        """At most `most` columns, spread evenly over the run, first and last kept."""
        if len(self.points) <= most:
            return self
        if most <= 1:
            return self.limited([self.points[-1].step])
        last = len(self.points) - 1
        picks = sorted({round(i * last / (most - 1)) for i in range(most)})
        return self.limited([self.points[i].step for i in picks])


def read_prompts(folder: Path) -> list[str] | None:
    """The sample prompts of the run's config.json, by index; None without a readable one."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return [str(s.get("prompt", "")) for s in config.get("samples") or []]
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def read_step_epochs(folder: Path, steps=None) -> dict[int, int]:
    """step -> the epoch (1-based) it belongs to, from metrics.jsonl (only `steps` when given)."""
    path = Path(folder) / "metrics.jsonl"
    wanted = set(steps) if steps is not None else None
    epochs: dict[int, int] = {}
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                match = STEP_EPOCH.match(line)
                if match is None:
                    continue
                step = int(match.group(1))
                if wanted is None or step in wanted:
                    epochs[step] = int(match.group(2)) + 1
    except OSError:
        pass
    return epochs


def read_grid(folder: str | Path, *, up_to_step: int | None = None,
              may_read: Callable[[Path], bool] | None = None) -> SampleGrid:
    """The grid of the run in `folder` (empty when it drew no samples). Only files `may_read`
    allows (a shared server's ownership rule) and, with `up_to_step`, steps at or before it.
    An image whose index the config has no prompt for (a file left by an earlier run in the
    same folder with more prompts) is left out."""
    folder = Path(folder)
    prompts = read_prompts(folder)
    cells: dict[tuple[int, int], Path] = {}
    samples = folder / "samples"
    if samples.is_dir():
        for file in samples.iterdir():
            match = SAMPLE_NAME.fullmatch(file.name)
            if match is None:
                continue
            step, index = int(match.group(1)), int(match.group(2))
            if up_to_step is not None and step > up_to_step:
                continue
            if prompts is not None and index >= len(prompts):
                continue
            if not file.is_file() or (may_read is not None and not may_read(file)):
                continue
            cells[(index, step)] = file
    steps = sorted({step for _, step in cells})
    epochs = read_step_epochs(folder, steps) if steps else {}
    indices = sorted({index for index, _ in cells})
    names = {i: (prompts[i] if prompts is not None and i < len(prompts) else f"prompt {i + 1}")
             for i in indices}
    return SampleGrid(folder, names, tuple(SamplePoint(s, epochs.get(s)) for s in steps), cells)


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)  # a scalable font where FreeType is there
    except TypeError:  # an older Pillow: the bitmap font
        return ImageFont.load_default()


def cell_size(grid: SampleGrid, most: int = MAX_CELL) -> tuple[int, int]:
    """The size every cell is drawn at: the largest sample's, scaled down so that its longer
    side is at most `most`."""
    width = height = 1
    for path in grid.cells.values():
        try:
            with Image.open(path) as image:
                width, height = max(width, image.width), max(height, image.height)
        except OSError:
            continue
    scale = min(1.0, most / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def grid_image_size(columns: int, rows: int, cell: tuple[int, int]) -> tuple[int, int]:
    """The picture's size for `columns` x `rows` cells of `cell` pixels."""
    return (LABEL_WIDTH + PAD + columns * (cell[0] + PAD),
            HEADER_HEIGHT + PAD + rows * (cell[1] + PAD))


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw, lines: int) -> list[str]:
    """`text` wrapped into at most `lines` lines that fit `width` pixels (… where cut)."""
    words = max(8, int(width / max(1.0, draw.textlength("n", font=font))))
    wrapped = textwrap.wrap(text, width=words) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1].rstrip() + "…"
    return [line if draw.textlength(line, font=font) <= width else line[:words - 1] + "…"
            for line in wrapped]


def render_grid(grid: SampleGrid, *, most_columns: int = MAX_COLUMNS,
                most_cell: int = MAX_CELL) -> Image.Image:
    """The grid as one RGB picture: the prompts down the left, the steps (and epochs) across
    the top, each sample in its cell (an empty cell grey). ValueError for an empty grid."""
    if not grid:
        raise ValueError("The run has drawn no samples yet, so there is no grid to draw.")
    grid = grid.thinned(most_columns)
    cell = cell_size(grid, most_cell)
    rows, points = grid.rows, grid.points
    picture = Image.new("RGB", grid_image_size(len(points), len(rows), cell), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = _font()
    line_height = 16
    for column, point in enumerate(points):
        x = LABEL_WIDTH + PAD + column * (cell[0] + PAD)
        top = [f"step {point.step}"] + ([f"epoch {point.epoch}"] if point.epoch else [])
        for n, text in enumerate(top):
            draw.text((x, 4 + n * line_height), _fit(text, font, cell[0], draw, 1)[0],
                      fill=TEXT, font=font)
    for row, index in enumerate(rows):
        y = HEADER_HEIGHT + PAD + row * (cell[1] + PAD)
        most_lines = max(1, cell[1] // line_height)
        for n, text in enumerate(_fit(grid.prompts[index], font, LABEL_WIDTH - 2 * PAD, draw,
                                      most_lines)):
            draw.text((PAD, y + n * line_height), text, fill=TEXT, font=font)
        for column, point in enumerate(points):
            x = LABEL_WIDTH + PAD + column * (cell[0] + PAD)
            path = grid.cell(index, point.step)
            tile = None
            if path is not None:
                try:
                    with Image.open(path) as image:
                        tile = image.convert("RGB")
                        tile.thumbnail(cell)  # keeps the aspect; centred below
                except OSError:
                    tile = None
            if tile is None:
                draw.rectangle([x, y, x + cell[0] - 1, y + cell[1] - 1], fill=EMPTY_CELL)
                continue
            picture.paste(tile, (x + (cell[0] - tile.width) // 2,
                                 y + (cell[1] - tile.height) // 2))
    return picture


def write_grid_image(grid: SampleGrid, path: str | Path | None = None, **options) -> Path:
    """Render the grid and write it as PNG, atomically (a failed write leaves the old file or
    none); to `<run folder>/sample-grid.png` unless `path` says. Returns the path."""
    path = Path(path) if path is not None else grid.folder / GRID_NAME
    atomic_save_png(render_grid(grid, **options), path)
    return path
