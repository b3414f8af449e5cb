"""The page's workspace datasets: upload images (or zips) into `<workspace>/datasets/<name>/`,
see each dataset's counts, remove images, delete a dataset, and make one a concept in a click.

A visitor on a Space or a rented GPU has their images on their own machine: this panel is how
they get there. The import itself (checks, limits, staging) is trainer.data.imports, the same
code as `python -m trainer dataset import`; this module only draws it and reports.

Handlers are plain functions of named values returning `{name: value}` (names of the panel's
components), so tests call them directly; `build_panel` binds them.

With a login (--auth), a dataset records who created it: a visitor sees the datasets they
created and those made without a login, and changes only their own (an admin: all).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from trainer.data import datasets
from trainer.data.images import is_image_file
from trainer.data.imports import import_dataset
from trainer.errors import AtelierError
from trainer.jobs.queue import LOCAL, Viewer
from ui import paths, state, tables
from ui.files import message_html

REPORT_LINES = 20  # skipped files listed by name; the rest counted


def _workspace() -> Path:
    return paths.workspace_root()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def summary_markdown(summaries: list) -> str:
    if not summaries:
        return "No datasets in the workspace yet: name one and drop images or a zip below."
    rows = ["| dataset | images | captions | masks | size |", "|---|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.images} | {s.captions} | {s.masks} | {_size(s.bytes)} |"
             for s in summaries]
    return "\n".join(rows)


def visible(folder: Path, viewer: Viewer) -> bool:
    if viewer.admin:
        return True
    return datasets.dataset_owner(folder) in (None, viewer.name)


def check_may_change(folder: Path, viewer: Viewer) -> None:
    """AtelierError unless the viewer created the dataset (or is an admin)."""
    if viewer.admin or not folder.is_dir():
        return
    owner = datasets.dataset_owner(folder)
    if owner != viewer.name:
        if owner is None:
            raise AtelierError(f"Dataset '{folder.name}' was added without a login; only an "
                               "admin changes it. Choose another name for yours.")
        raise AtelierError(f"There is no dataset '{folder.name}' of yours; choose another "
                           "name.")


def image_names(name: str | None, viewer: Viewer = LOCAL) -> list[str]:
    """The dataset's images, relative to it ('/'-separated), for the remove chooser."""
    if not name:
        return []
    try:
        folder = datasets.dataset_path(_workspace(), name)
    except AtelierError:
        return []
    if not folder.is_dir() or not visible(folder, viewer):
        return []
    return sorted(file.relative_to(folder).as_posix() for file, _ in datasets.walk_files(folder)
                  if is_image_file(file))


def refresh(selected: str | None = None, viewer: Viewer = LOCAL) -> dict:
    """The table of datasets and the choosers, `selected` kept when it still exists."""
    try:
        summaries = [s for s in datasets.list_datasets(_workspace()) if visible(s.path, viewer)]
    except AtelierError as error:
        return {"table": f"⚠ {error}", "dataset": gr.update(choices=[]),
                "images": gr.update(choices=[], value=[])}
    names = [s.name for s in summaries]
    # A name typed for a new dataset stays in the box until its first upload.
    value = selected if selected else (names[0] if names else None)
    return {"table": summary_markdown(summaries),
            "dataset": gr.update(choices=names, value=value),
            "images": gr.update(choices=image_names(value, viewer), value=[])}


def report_html(report) -> str:
    added = len(report.added)
    lines = [f"Added {added} file(s) to '{report.dataset.name}'"
             + (f" ({len(report.replaced)} replaced)" if report.replaced else "") + "."]
    ok = not report.skipped
    if report.skipped:
        lines.append(f"Skipped or refused {len(report.skipped)}:")
        lines += [f"• {s.file}: {s.reason}" for s in report.skipped[:REPORT_LINES]]
        if len(report.skipped) > REPORT_LINES:
            lines.append(f"… and {len(report.skipped) - REPORT_LINES} more.")
    return message_html("\n".join(lines), ok=ok or added > 0)


def upload(name: str | None, files: list | None, replace: bool,
           viewer: Viewer = LOCAL) -> dict:
    """Import the uploaded files (images, captions, masks, zips) into dataset `name`."""
    name = (name or "").strip()
    if not name:
        return {"message": message_html("Name the dataset first (a new name creates it).",
                                        ok=False)}
    if not files:
        return {"message": message_html("Drop images, captions, masks or zip files in the "
                                        "upload box first.", ok=False)}
    # gradio keeps each upload's own file name as the last part of its temporary path.
    sources = [Path(getattr(f, "name", f)) for f in files]
    try:
        folder = datasets.dataset_path(_workspace(), name)
        check_may_change(folder, viewer)
        new = not folder.exists()
        report = import_dataset(sources, name, _workspace(), limits=state.IMPORT_LIMITS,
                                replace=bool(replace))
        if new and viewer.name and report.dataset.is_dir():
            datasets.set_dataset_owner(report.dataset, viewer.name)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    return {**refresh(name, viewer), "message": report_html(report), "files": None}


def has_subfolder_images(folder: Path) -> bool:
    return any(file.parent != folder for file, _ in datasets.walk_files(folder)
               if is_image_file(file))


def use_as_concept(name: str | None, frame: Any, viewer: Viewer = LOCAL) -> dict:
    """Add dataset `name` to the Data table as a concept (once)."""
    if not name:
        return {"message": message_html("Choose a dataset first.", ok=False)}
    try:
        folder = datasets.dataset_path(_workspace(), name)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    if not folder.is_dir() or not visible(folder, viewer):
        return {"message": message_html(f"There is no dataset '{name}' yet: upload its "
                                        "images first.", ok=False)}
    concepts = tables.concepts_from_frame(frame)
    path = str(folder)
    if any(str(c.get("path", "")).strip() == path for c in concepts):
        return {"message": message_html(f"'{name}' is already a concept in the Data table.")}
    concept = {"path": path}
    if has_subfolder_images(folder):
        concept["include_subdirectories"] = True  # a zip's folders are kept as they were
    return {"concepts": tables.concepts_frame([*concepts, concept]),
            "message": message_html(f"'{name}' added to the Data table as a concept.")}


def remove(name: str | None, images: list[str] | None, viewer: Viewer = LOCAL) -> dict:
    if not name or not images:
        return {"message": message_html("Choose a dataset and the images to remove.",
                                        ok=False)}
    try:
        check_may_change(datasets.dataset_path(_workspace(), name), viewer)
        removed = datasets.remove_images(_workspace(), name, images)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    return {**refresh(name, viewer),
            "message": message_html(f"Removed {len(removed)} file(s) from '{name}' "
                                    "(images with their captions and masks).")}


def ask_delete(name: str | None, viewer: Viewer = LOCAL) -> dict:
    if not name:
        return {"message": message_html("Choose a dataset first.", ok=False)}
    return {"confirm_row": gr.update(visible=True),
            "confirm_text": f"Delete dataset **{name}** and all its files? This cannot be "
                            "undone."}


def confirm_delete(name: str | None, viewer: Viewer = LOCAL) -> dict:
    hidden = {"confirm_row": gr.update(visible=False)}
    if not name:
        return {**hidden, "message": message_html("Choose a dataset first.", ok=False)}
    try:
        check_may_change(datasets.dataset_path(_workspace(), name), viewer)
        datasets.delete_dataset(_workspace(), name)
    except AtelierError as error:
        return {**hidden, "message": message_html(str(error), ok=False)}
    return {**hidden, **refresh(None, viewer),
            "message": message_html(f"Deleted dataset '{name}'.")}


def build_panel(concepts_table: gr.Dataframe):
    """Draw the panel (inside the Data section) and bind its events. Returns (fn, outputs)
    for the page's load event: with a login, the list is the visitor's, drawn on load."""
    first = refresh(None, Viewer(name="\0", admin=False) if state.OPTIONS.login else LOCAL)
    limits = state.IMPORT_LIMITS
    with gr.Accordion("Workspace datasets: upload your images", open=False,
                      elem_id="section-datasets"):
        table = gr.Markdown(first["table"], elem_id="datasets-table")
        with gr.Row(equal_height=True):
            dataset = gr.Dropdown(label="Dataset", allow_custom_value=True, interactive=True,
                                  elem_id="datasets-name", scale=3,
                                  choices=first["dataset"]["choices"],
                                  value=first["dataset"]["value"],
                                  info="Choose one, or type a new name to create it.")
            use = gr.Button("Use as concept", elem_id="datasets-use", scale=0, min_width=130)
            refresh_btn = gr.Button("Refresh", elem_id="datasets-refresh", scale=0,
                                    min_width=90)
        files = gr.File(label="Images, <name>.txt captions, <name>-masklabel.png masks, or zip "
                              "files (drop several)", file_count="multiple",
                        elem_id="datasets-files", height=120)
        with gr.Row(equal_height=True):
            replace = gr.Checkbox(label="Replace files the dataset already has", value=False,
                                  elem_id="datasets-replace")
            add = gr.Button("Add to dataset", variant="primary", elem_id="datasets-add",
                            scale=0, min_width=140)
        gr.Markdown(f"Limits: {limits.describe()}.", elem_id="datasets-limits")
        with gr.Row(equal_height=True):
            images = gr.Dropdown(label="Images to remove", multiselect=True, choices=
                                 first["images"]["choices"], value=[], scale=3,
                                 elem_id="datasets-images")
            remove_btn = gr.Button("Remove images", elem_id="datasets-remove", scale=0,
                                   min_width=130)
            delete_btn = gr.Button("Delete dataset…", variant="stop", elem_id="datasets-delete",
                                   scale=0, min_width=130)
        with gr.Row(visible=False, elem_id="datasets-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            confirm = gr.Button("Delete", variant="stop", elem_id="datasets-confirm-delete",
                                scale=0)
            cancel = gr.Button("Cancel", elem_id="datasets-cancel", scale=0)
        message = gr.HTML(elem_id="datasets-message")

    names = {"table": table, "dataset": dataset, "images": images, "message": message,
             "files": files, "replace": replace, "concepts": concepts_table,
             "confirm_row": confirm_row, "confirm_text": confirm_text}

    def bind(handler, inputs: list[str], outputs: list[str]):
        def run(request: gr.Request, *args):
            result = handler(*args, viewer=state.viewer(request))
            return {names[k]: v for k, v in result.items() if k in outputs}
        return run, [names[k] for k in inputs], [names[k] for k in outputs]

    listing = ["table", "dataset", "images"]
    for event, handler, inputs, outputs, api in [
        (refresh_btn.click, refresh, ["dataset"], listing, "datasets_refresh"),
        (add.click, upload, ["dataset", "files", "replace"], [*listing, "message", "files"],
         "datasets_upload"),
        (use.click, use_as_concept, ["dataset", "concepts"], ["concepts", "message"],
         "datasets_use"),
        (remove_btn.click, remove, ["dataset", "images"], [*listing, "message"],
         "datasets_remove"),
        (delete_btn.click, ask_delete, ["dataset"], ["confirm_row", "confirm_text",
                                                     "message"], None),
        (confirm.click, confirm_delete, ["dataset"], ["confirm_row", *listing, "message"],
         "datasets_delete"),
    ]:
        fn, ins, outs = bind(handler, inputs, outputs)
        event(fn, ins, outs, api_name=api or False, show_progress="minimal")
    cancel.click(lambda: gr.update(visible=False), None, confirm_row, api_name=False)
    def chosen(name: str | None, request: gr.Request):
        return gr.update(choices=image_names(name, state.viewer(request)), value=[])

    dataset.change(chosen, dataset, images, api_name=False, show_progress="hidden")

    def on_load(request: gr.Request):
        result = refresh(None, state.viewer(request))
        return [result[k] for k in listing]
    return on_load, [names[k] for k in listing]
