"""The page's sample grid: one row per sample prompt, one column per sampling point (step and
epoch), for the job the page follows (or the one opened from Jobs), with a slider through time,
a click to enlarge (the gallery's own preview) and "Download grid" (one PNG with the prompts
and steps written on it, trainer/sample_grid.py).

It is drawn from the run's folder, not from the browser's memory: a reloaded page, a second
browser and an ended job show the same grid. Every image reaches the browser the way the
footer's gallery does (`footer.servable`, after the visitor's `access.can_read`).

The gallery lays the cells out row by row with as many columns as points shown, so each
prompt is a row; a cell the run has no image for (a sample that failed) is a grey tile.
Handlers are plain functions returning `{name: value}` (tests call them directly);
`build_panel` binds them, and `SampleGridPanel.poll` is what the page's timer calls.
"""
from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from trainer.errors import AtelierError
from trainer.jobs.store import Job
from trainer.ownership import Access
from trainer.sample_grid import SampleGrid, read_grid, write_grid_image
from trainer.session import JobState
from ui import footer
from ui.files import message_html
from ui.state import SESSION, access as access_of

WINDOW = 6  # sampling points shown at once; the slider moves the window through the run
_GRIDS_DIR = Path(tempfile.gettempdir()) / "atelier-grids"


def folder_of(state_or_job) -> Path | None:
    """The run folder to draw: a job's folder, a JobState's (where its samples are), or a
    folder given as is; None when there is none yet (a job that has drawn nothing)."""
    if state_or_job is None:
        return None
    if isinstance(state_or_job, Job):
        return SESSION.store.folder(state_or_job.id) if SESSION.store is not None else None
    if isinstance(state_or_job, JobState):
        if not state_or_job.samples:
            return None
        return Path(state_or_job.samples[-1]["path"]).parent.parent  # <run>/samples/<file>
    return Path(state_or_job)


def grid_for(folder: str | Path | None, access: Access | None = None) -> SampleGrid | None:
    """The grid of the run in `folder`, only its images the visitor may read; None when the
    visitor may not read the folder (or there is none)."""
    if not folder:
        return None
    folder = Path(folder)
    if access is not None and not access.can_read(folder):
        return None
    return read_grid(folder, may_read=access.can_read if access is not None else None)


def _empty_tile(size: tuple[int, int]) -> str:
    """A grey PNG of `size`, for a cell with no image (made once per size, in the temp
    folder that gradio serves from)."""
    path = _GRIDS_DIR / f"empty-{size[0]}x{size[1]}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (235, 235, 235)).save(path)
    return str(path)


def window(grid: SampleGrid, last: int | None) -> tuple[int, int]:
    """The columns shown, [start, end): the WINDOW points that end at point `last` (1-based,
    as the slider counts; None: the newest)."""
    count = len(grid.points)
    end = count if last is None else max(1, min(int(last), count))
    return max(0, end - WINDOW), end


def gallery_value(grid: SampleGrid | None, last: int | None = None,
                  every_column: bool = False) -> tuple[list[tuple[str, str]], int]:
    """(gallery items row by row, number of columns): the cells of the shown window (every
    column with `every_column`), each captioned with its prompt and sampling point."""
    if not grid:
        return [], 1
    start, end = (0, len(grid.points)) if every_column else window(grid, last)
    points = grid.points[start:end]
    items, empty = [], None
    for index in grid.rows:
        for point in points:
            path = grid.cell(index, point.step)
            caption = f"{grid.prompts[index]} · {point.label}"
            if path is None:
                if empty is None:
                    with Image.open(next(iter(grid.cells.values()))) as first:
                        empty = _empty_tile(first.size)
                items.append((empty, caption + " (no image)"))
            else:
                items.append((footer.servable(path), caption))
    return items, max(1, len(points))


def header_markdown(grid: SampleGrid | None, last: int | None = None) -> str:
    """What the grid shows, in words: its rows (the prompts) and the columns in view."""
    if not grid:
        return "No samples yet: they appear here as the run draws them (Sampling → Sample every)."
    start, end = window(grid, last)
    shown = grid.points[start:end]
    rows = " · ".join(f"**{n}.** {grid.prompts[i]}" for n, i in enumerate(grid.rows, 1))
    return (f"Rows (one per prompt): {rows}  \nColumns {start + 1}–{end} of "
            f"{len(grid.points)}: {shown[0].label} … {shown[-1].label}")


def grid_update(state_or_job, access: Access | None = None, last: int | None = None) -> dict:
    """Everything the panel shows for a job (a JobState the page follows, a Job opened from
    Jobs, or a run folder), as `{name: value}`: "gallery", "slider", "header", "folder".
    The slider follows the newest point unless `last` picks one."""
    folder = folder_of(state_or_job)
    grid = grid_for(folder, access)
    items, columns = gallery_value(grid, last)
    count = len(grid.points) if grid else 0
    _, end = window(grid, last) if grid else (0, 0)
    return {"gallery": gr.update(value=items, columns=columns),
            # (a slider's maximum must exceed its minimum: hidden below two points anyway)
            "slider": gr.update(minimum=1, maximum=max(2, count), value=max(1, end),
                                interactive=count > WINDOW, visible=count > 0),
            "header": header_markdown(grid, last),
            "folder": str(folder) if folder is not None and grid is not None else None}


def scroll(folder: str | None, last, access: Access | None = None) -> dict:
    """The window of columns that ends at point `last` (the slider moved)."""
    grid = grid_for(folder, access)
    items, columns = gallery_value(grid, last)
    return {"gallery": gr.update(value=items, columns=columns),
            "header": header_markdown(grid, last)}


def grid_file(folder: str | Path | None, access: Access | None = None) -> str | None:
    """The whole grid as one PNG (every image the visitor may read), written to the temp
    folder gradio serves from; None when there is nothing to draw."""
    grid = grid_for(folder, access)
    if not grid:
        return None
    folder = Path(folder)
    digest = hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:16]
    path = _GRIDS_DIR / digest / f"sample-grid-{folder.name}.png"
    return str(write_grid_image(grid, path))


def download(folder: str | None, access: Access | None = None) -> dict:
    path = grid_file(folder, access)
    if path is None:
        return {"file": gr.update(value=None, visible=False),
                "message": message_html("No samples yet, so there is no grid to download.",
                                        ok=False)}
    return {"file": gr.update(value=path, visible=True), "message": ""}


@dataclass
class SampleGridPanel:
    gallery: gr.Gallery
    slider: gr.Slider
    header: gr.Markdown
    folder: gr.State
    outputs: list   # what `poll` and `show` update, for the page's timer and Jobs → Open

    def poll(self, state_or_job, access: Access | None = None) -> dict:
        """{component: value} for the page's poll (call it when the samples changed)."""
        names = {"gallery": self.gallery, "slider": self.slider, "header": self.header,
                 "folder": self.folder}
        return {names[k]: v for k, v in grid_update(state_or_job, access).items()}

    def show(self, selected, request: gr.Request) -> list:
        """A handler: the grid of job `selected` (the Jobs panel's chooser), for Open."""
        from ui.jobs_panel import job_number
        try:
            job = SESSION.get(job_number(selected), access_of(request).viewer)
        except AtelierError:  # no job chosen, another owner's: leave the grid as it is
            return [gr.skip()] * len(self.outputs)
        out = self.poll(job, access_of(request))
        return [out.get(c, gr.skip()) for c in self.outputs]


def build_panel() -> SampleGridPanel:
    """Draw the grid and bind its slider and download; the page's poll fills it."""
    with gr.Accordion("Sample grid", open=True, elem_id="section-sample-grid"):
        header = gr.Markdown(header_markdown(None), elem_id="sample-grid-header")
        slider = gr.Slider(1, 2, value=1, step=1, label="Through the run (last column shown)",
                           elem_id="sample-grid-slider", interactive=False, visible=False)
        gallery = gr.Gallery(label="One row per prompt, one column per sampling point",
                             elem_id="sample-grid", columns=1, height="auto",
                             object_fit="contain", interactive=False, allow_preview=True)
        with gr.Row():
            download_btn = gr.Button("Download grid", elem_id="sample-grid-download", size="sm",
                                     scale=0, min_width=140)
            message = gr.HTML(elem_id="sample-grid-message")
        file = gr.File(label="Sample grid (PNG)", interactive=False, visible=False,
                       elem_id="sample-grid-file")
    folder = gr.State(None)

    def scrolled(folder_value, last, request: gr.Request):
        out = scroll(folder_value, last, access_of(request))
        return out["gallery"], out["header"]

    slider.release(scrolled, [folder, slider], [gallery, header], api_name="sample_grid_scroll",
                   show_progress="hidden")

    def downloaded(folder_value, request: gr.Request):
        out = download(folder_value, access_of(request))
        return out["file"], out["message"]

    download_btn.click(downloaded, folder, [file, message], api_name="sample_grid_download")
    return SampleGridPanel(gallery=gallery, slider=slider, header=header, folder=folder,
                           outputs=[gallery, slider, header, folder])
