"""The page's workspace datasets: upload images (or zips) into `<workspace>/datasets/<name>/`,
see each dataset's counts, remove images, delete a dataset, and make one a concept in a click.

A visitor on a Space or a rented GPU has their images on their own machine: this panel is how
they get there. The import itself (checks, limits, staging) is trainer.data.imports, the same
code as `python -m trainer dataset import`; this module only draws it and reports.

Handlers are plain functions of named values returning `{name: value}` (names of the panel's
components), so tests call them directly; `build_panel` binds them.

On a shared server a dataset records who created it (the login name; ":anonymous" for the
visitor of a server without a login), and the one ownership rule (trainer/ownership.py, through
the visitor's Access) decides the rest: a visitor lists, reads and uses as a concept their own
datasets and those imported with the CLI (no owner), and changes only their own; an admin
reaches all. A local server is unchanged: everything is the user's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.data import datasets
from trainer.data.images import is_image_file
from trainer.data.imports import import_dataset
from trainer.errors import AtelierError
from trainer.ownership import Access, Viewer
from ui import paths, state, tables
from ui.files import discard_uploads, message_html

FIELD = "Dataset"  # the name refusals give the dataset chosen

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


def _access(access: Access | None) -> Access:
    # No request (a test, a caller without one): the visitor of a server without a login.
    return access if access is not None else state.access()


def dataset_folders() -> list[Path]:
    """The workspace's dataset folders, by name, not yet walked (datasets.list_datasets
    counts every file of every dataset; the panel counts only those the visitor may read)."""
    root = datasets.datasets_root(_workspace())
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                   and not p.name.startswith(datasets.HIDDEN_PREFIX)), key=lambda p: p.name)


def visible(folder: Path, access: Access | None = None) -> bool:
    return _access(access).can_read(folder)


def check_may_change(folder: Path, access: Access | None = None) -> None:
    """ConfigError naming the dataset unless the visitor may change it (their own, or they
    are an admin). A dataset that does not exist yet is anyone's to create."""
    if os.path.lexists(folder):
        _access(access).check_write(folder, FIELD)


def image_names(name: str | None, access: Access | None = None) -> list[str]:
    """The dataset's images, relative to it ('/'-separated), for the remove chooser."""
    if not name:
        return []
    try:
        folder = datasets.dataset_path(_workspace(), name)
    except AtelierError:
        return []
    if not folder.is_dir() or not visible(folder, access):
        return []
    return sorted(file.relative_to(folder).as_posix() for file, _ in datasets.walk_files(folder)
                  if is_image_file(file))


def refresh(selected: str | None = None, access: Access | None = None) -> dict:
    """The table of datasets and the choosers (the visitor's), `selected` kept when it still
    exists."""
    access = _access(access)
    try:
        # Only the visitor's datasets are walked and counted: never another user's files.
        summaries = [datasets.summarize(folder) for folder in dataset_folders()
                     if visible(folder, access)]
    except AtelierError as error:
        return {"table": f"⚠ {error}", "dataset": gr.update(choices=[]),
                "images": gr.update(choices=[], value=[])}
    names = [s.name for s in summaries]
    # A name typed for a new dataset stays in the box until its first upload.
    value = selected if selected else (names[0] if names else None)
    return {"table": summary_markdown(summaries),
            "dataset": gr.update(choices=names, value=value),
            "images": gr.update(choices=image_names(value, access), value=[])}


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
           access: Access | None = None) -> dict:
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
    access = _access(access)
    try:
        folder = datasets.dataset_path(_workspace(), name)
        check_may_change(folder, access)
        report = import_dataset(sources, name, _workspace(), limits=state.IMPORT_LIMITS,
                                replace=bool(replace),
                                owner=access.viewer.owner_token if records_owner(access)
                                else None)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False), "files": None}
    finally:  # taken or refused: the uploaded files leave gradio's upload folder now
        discard_uploads(files)
    return {**refresh(name, access), "message": report_html(report), "files": None}


def records_owner(access: Access) -> bool:
    """Whether a new dataset records who made it: on a shared server, and with a login (as
    before; a local server without one leaves it unowned, like a CLI import)."""
    return access.realm.shared or bool(access.viewer.name)


def has_subfolder_images(folder: Path) -> bool:
    return any(file.parent != folder for file, _ in datasets.walk_files(folder)
               if is_image_file(file))


def use_as_concept(name: str | None, frame: Any, access: Access | None = None) -> dict:
    """Add dataset `name` to the Data table as a concept (once)."""
    if not name:
        return {"message": message_html("Choose a dataset first.", ok=False)}
    try:
        folder = datasets.dataset_path(_workspace(), name)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    if not folder.is_dir() or not visible(folder, access):
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


def remove(name: str | None, images: list[str] | None, access: Access | None = None) -> dict:
    if not name or not images:
        return {"message": message_html("Choose a dataset and the images to remove.",
                                        ok=False)}
    try:
        check_may_change(datasets.dataset_path(_workspace(), name), access)
        removed = datasets.remove_images(_workspace(), name, images)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    return {**refresh(name, access),
            "message": message_html(f"Removed {len(removed)} file(s) from '{name}' "
                                    "(images with their captions and masks).")}


def ask_delete(name: str | None, access: Access | None = None) -> dict:
    if not name:
        return {"message": message_html("Choose a dataset first.", ok=False)}
    try:  # refused now, not after the confirmation
        check_may_change(datasets.dataset_path(_workspace(), name), access)
    except AtelierError as error:
        return {"message": message_html(str(error), ok=False)}
    return {"message": "", "confirm_row": gr.update(visible=True),
            "confirm_text": f"Delete dataset **{name}** and all its files? This cannot be "
                            "undone."}


def confirm_delete(name: str | None, access: Access | None = None) -> dict:
    hidden = {"confirm_row": gr.update(visible=False)}
    if not name:
        return {**hidden, "message": message_html("Choose a dataset first.", ok=False)}
    try:
        check_may_change(datasets.dataset_path(_workspace(), name), access)
        datasets.delete_dataset(_workspace(), name)
    except AtelierError as error:
        return {**hidden, "message": message_html(str(error), ok=False)}
    return {**hidden, **refresh(None, access),
            "message": message_html(f"Deleted dataset '{name}'.")}


def build_panel(concepts_table: gr.Dataframe):
    """Draw the panel (inside the Data section) and bind its events. Returns (fn, inputs,
    outputs) for the page's load event (`demo.load(*returned)`): the visitor's list, drawn
    when the page opens."""
    # Drawn once at start for every visitor: with a login, only what every user may read
    # (the datasets imported with the CLI); the page's load event lists the visitor's own.
    first = refresh(None, Access(state.realm(), Viewer(name=":nobody", admin=False))
                    if state.OPTIONS.login else state.access())
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
            result = handler(*args, access=state.access(request))
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
        return gr.update(choices=image_names(name, state.access(request)), value=[])

    dataset.change(chosen, dataset, images, api_name=False, show_progress="hidden")

    def on_load(request: gr.Request):
        result = refresh(None, state.access(request))
        return [result[k] for k in listing]
    # (fn, inputs, outputs): the load event takes no input, only the request.
    return on_load, None, [names[k] for k in listing]
