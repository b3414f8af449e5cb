"""The page's dataset browser: the images of the current concepts, each caption editable, and a
canvas to paint each image's mask (SPEC §4 "Paint").

The section sits under "Data". Its gallery lists the images of one enabled concept folder of the
Data table, each labelled with its mask state and caption; picking one opens it in the caption
box and in a gr.ImageEditor, whose one layer is the mask painted in translucent white. Save
writes `<stem>-masklabel.png` at the image's size through trainer.masks.store (atomic).

Handlers are plain functions of named values returning `{name: value}` (names of
`DatasetSection`'s fields), so tests call them directly; `wire` binds them to components.
Pixel work lives in trainer.masks.painted and trainer.data.browse, never here.

Every folder and image a handler touches is checked first with the visitor's `Access` (the
`access` argument; `wire` gives each handler the one of the request's visitor): on a shared
server a visitor browses and edits their own datasets only, reads the shared demo dataset and
the datasets imported with the CLI, and an admin reaches everything.
"""
from __future__ import annotations

import inspect
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.data import browse
from trainer.data.images import load_image_rgb, mask_path_for, oriented_size
from trainer.errors import AtelierError, DatasetError
from trainer.masks import painted
from trainer.masks.store import existing_mask, write_mask
from trainer.ownership import Access
from ui import state, tables
from ui.files import failed, message_html, readable, writable, write_bounds

log = logging.getLogger(__name__)

THUMBNAIL_DIR = Path(tempfile.gettempdir()) / "atelier-thumbnails"
PREVIEW_SIZE = 384  # the saved-mask preview beside the canvas, long side in px
EDITOR_HEIGHT = 520
NO_IMAGE = "Select an image in the gallery first."
FOLDER_FIELD = "Concept folder"   # the names refusals give the values checked
IMAGE_FIELD = "Image"

CSS = """
#dataset-gallery .caption-label { font-size: 11px; white-space: normal; overflow: hidden;
  display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical;
  max-height: 2.9em; }
#dataset-message .atelier-error, #auto-mask-message .atelier-error { color: #b91c1c;
  font-weight: 600; white-space: pre-wrap; }
#dataset-message .atelier-ok, #auto-mask-message .atelier-ok { color: #166534; }
#mask-buttons button { min-width: 80px; }
"""


# --- Concepts ---------------------------------------------------------------------------------------

def enabled_concepts(frame: Any) -> list[dict]:
    """The Data table's enabled concepts (rows with a folder), as config dicts."""
    return [item for item in tables.concepts_from_frame(frame)
            if item.get("enabled", True) is not False and str(item.get("path", "")).strip()]


def concept_choices(frame: Any, current: str | None) -> dict:
    """The concept chooser: the enabled folders (shown only when there are several)."""
    folders = list(dict.fromkeys(str(c["path"]) for c in enabled_concepts(frame)))
    value = current if current in folders else (folders[0] if folders else None)
    return {"concept": gr.update(choices=folders, value=value, visible=len(folders) > 1)}


def _caption_source(frame: Any, folder: str) -> str:
    for item in enabled_concepts(frame):
        if str(item["path"]) == folder:
            source = item.get("prompt_source", "sample")
            return str(getattr(source, "value", source)).lower()
    return "sample"


# --- Browsing ---------------------------------------------------------------------------------------

def browse_folder(folder: str | None, only_unmasked: bool = False, frame: Any = None,
                  selected: str | None = None, access: Access | None = None) -> dict:
    """The gallery of `folder`: thumbnails labelled with mask state and caption."""
    empty = {"gallery": [], "entries": []}
    if not folder:
        return {**empty, "info": "No enabled concept: add a folder of images in the Data "
                                 "table above, then press Refresh."}
    try:
        path = readable(folder, FOLDER_FIELD, access)
        all_entries = [e for e in browse.list_entries(path)
                       if _stays_in(e.image, path, access)]
    except AtelierError as error:
        return {**empty, "info": f"⚠ {error}"}
    shown = [e for e in all_entries if not (only_unmasked and e.has_mask)]
    try:
        items = [(str(browse.thumbnail(e.image, THUMBNAIL_DIR)), e.label()) for e in shown]
    except OSError as error:  # the thumbnail cache cannot be written (a full /tmp)
        return {**empty, "info": f"⚠ Cannot draw thumbnails in {THUMBNAIL_DIR}: "
                                 f"{error.strerror or error}"}
    entries = [str(e.image) for e in shown]
    masked = sum(e.has_mask for e in all_entries)
    info = (f"**{len(all_entries)}** images in `{folder}` · **{masked}** with a mask · "
            f"**{len(all_entries) - masked}** without")
    if only_unmasked:
        info += f" · showing the {len(shown)} without a mask"
    if not all_entries:
        info = f"⚠ Folder `{folder}` holds no images."
    source = _caption_source(frame, folder) if frame is not None else "sample"
    if source != "sample":
        info += (f"  \nThis concept's caption source is **{source}**: training does not read "
                 "the .txt captions shown here.")
    index = entries.index(selected) if selected in entries else None
    return {"gallery": gr.update(value=items, selected_index=index), "entries": entries,
            "info": info}


def _stays_in(image: Path, folder: Path, access: Access | None) -> bool:
    """Whether a listed image may be shown: it lies in the (resolved) folder, or it is a link
    to a file the visitor may read anyway. A link out of a folder never shows another
    user's picture."""
    target = Path(os.path.realpath(image))
    return target.parent == folder or (state.access() if access is None else access).can_read(
        target)


# --- Opening an image -------------------------------------------------------------------------------

def _existing_image(selected: str | None, write: bool = False,
                    access: Access | None = None) -> Path:
    if not selected:
        raise DatasetError(NO_IMAGE)
    path = (writable if write else readable)(selected, IMAGE_FIELD, access)
    # Its caption and mask are read with it: a link out of the folder is checked too.
    readable(browse.caption_path(path), "Caption file", access)
    readable(mask_path_for(path), "Mask file", access)
    if not path.parent.is_dir():
        raise DatasetError(f"The folder '{path.parent}' no longer exists; press Refresh.")
    if not path.is_file():
        raise DatasetError(f"The image '{path.name}' no longer exists (moved or deleted?); "
                           "press Refresh.")
    return path


def title_for(path: Path) -> str:
    """The line above the caption: name, size, mask and caption state (no pixels decoded)."""
    width, height = oriented_size(path)
    state = "has a mask" if mask_path_for(path).is_file() else "has no mask yet"
    note = "" if browse.caption_path(path).is_file() else " · no caption file yet"
    return f"**{path.name}** · {width}×{height} · {state}{note}"


def open_image(selected: str | None, access: Access | None = None) -> dict:
    """The image in the canvas with its saved mask as the editable layer, its caption in the
    caption box, and the saved mask's overlay as the preview."""
    try:
        path = _existing_image(selected, access=access)
        image = load_image_rgb(path)
        mask = existing_mask(path)
        caption = browse.read_caption(path)
    except AtelierError as error:
        return failed(error)
    shown = painted.preview(image, mask, PREVIEW_SIZE) if mask is not None else None
    return {"selected": str(path), "baseline": mask,
            "editor": painted.editor_value(image, mask),
            "caption": caption or "", "caption_for": str(path),
            "title": title_for(path),
            "preview": shown, "message": ""}


def select_image(entries: list[str] | None, index: int | None,
                 access: Access | None = None) -> dict:
    entries = entries or []
    if index is None or not 0 <= index < len(entries):
        return failed(DatasetError(NO_IMAGE))
    return open_image(entries[index], access)


# --- Captions ---------------------------------------------------------------------------------------

def save_caption(selected: str | None, caption: str | None,
                 caption_for: str | None = None, access: Access | None = None) -> dict:
    try:
        path = _existing_image(selected, write=True, access=access)
        if caption_for and Path(caption_for) != path:
            raise DatasetError(f"The caption box still holds the caption of "
                               f"'{_name(caption_for)}', not of '{path.name}': wait until "
                               "the image has opened, then save.")
        written = browse.save_caption(path, caption or "",
                                      max_chars=state.LIMITS.max_caption_chars,
                                      **write_bounds())
    except AtelierError as error:
        return failed(error)
    return {"message": message_html(f"Saved the caption to {written.name}."),
            "caption": browse.read_caption(path) or "", "title": title_for(path)}


# --- Masks --------------------------------------------------------------------------------------------

def _editor_holds_image(value: Any) -> bool:
    return isinstance(value, dict) and value.get("background") is not None


def _name(path: str) -> str:
    """A file name for a message (a browser-sent value may hold anything)."""
    return path.replace("\x00", "").rsplit("/", 1)[-1][:120]


def save_mask(selected: str | None, editor: Any, baseline: Any,
              access: Access | None = None) -> dict:
    """Write the painted mask as `<stem>-masklabel.png` (the image's size, atomic)."""
    try:
        path = _existing_image(selected, write=True, access=access)
        if not _editor_holds_image(editor):
            raise DatasetError("The canvas is empty: select the image again in the gallery.")
        image = load_image_rgb(path)
        if not painted.same_picture(editor["background"], image):
            raise DatasetError(f"The canvas does not show '{path.name}' (still loading, or "
                               "the file changed): select the image again, then paint.")
        mask = painted.mask_from_editor(editor, image.size, baseline)
        written = write_mask(path, mask, access=access, **write_bounds())
    except AtelierError as error:
        return failed(error)
    except OSError as error:  # a read-only folder, a full disk: the old mask is kept
        return failed(DatasetError(f"Cannot write the mask of '{_name(selected or '')}': "
                                   f"{error.strerror or 'the file system refused'}."))
    coverage = painted.coverage(mask)
    # The baseline stays the mask the canvas was opened with: the layer is unchanged, so the
    # next Save reads it the same way.
    return {"message": message_html(f"Saved {written.name} ({mask.width}×{mask.height}, "
                                    f"{coverage:.0%} white)."),
            "preview": painted.preview(image, mask, PREVIEW_SIZE), "title": title_for(path)}


def reset_mask(selected: str | None, editor: Any, baseline: Any, how: str,
               access: Access | None = None) -> dict:
    """Clear / Fill all / Invert: a new mask drawn into the canvas (saved only by Save)."""
    try:
        path = _existing_image(selected, access=access)
        image = load_image_rgb(path)
        if how == "clear":
            mask = painted.cleared(image.size)
        elif how == "fill":
            mask = painted.filled(image.size)
        elif how == "invert":
            # What the canvas holds now, painted strokes included (unless it still shows
            # another image: then the mask it was opened with).
            current = painted.canvas_mask(editor, image, baseline)
            if current is None:
                current = baseline
            mask = painted.inverted(current if current is not None
                                    else painted.cleared(image.size))
        else:
            raise ValueError(f"unknown mask action {how!r}")
    except AtelierError as error:
        return failed(error)
    done = {"clear": "Cleared", "fill": "Filled", "invert": "Inverted"}[how]
    return {"editor": painted.editor_value(image, mask), "baseline": mask,
            "message": message_html(f"{done} the mask in the canvas; press Save mask to write "
                                    "it.")}


# --- Layout and events ---------------------------------------------------------------------------

@dataclass
class DatasetSection:
    accordion: gr.Accordion
    concept: gr.Dropdown
    only_unmasked: gr.Checkbox
    refresh: gr.Button
    info: gr.Markdown
    gallery: gr.Gallery
    entries: gr.State     # the gallery's image paths, in its order
    selected: gr.State    # the image open in the canvas (a path) or None
    baseline: gr.State    # the mask the canvas was opened with ("L" image) or None
    title: gr.Markdown
    caption: gr.Textbox
    save_caption: gr.Button
    editor: gr.ImageEditor
    clear: gr.Button
    fill: gr.Button
    invert: gr.Button
    save_mask: gr.Button
    preview: gr.Image
    message: gr.HTML
    concepts: gr.Dataframe  # the Data table (an input, not drawn here)
    # The image whose caption the caption box holds, kept in the browser beside the box (a
    # hidden textbox, not server state): a Save clicked before a newly opened image's caption
    # arrived sends the old caption with the old name, never under the new image's name.
    caption_for: gr.Textbox

    def component(self, name: str) -> gr.components.Component:
        return getattr(self, name)

    def components(self, names: list[str]) -> list:
        return [self.component(name) for name in names]


def call_safely(fn: Callable[..., dict], kwargs: dict, message: str | None) -> dict:
    """`fn(**kwargs)`; a bug shows as a short message in the output named `message` (or an
    error toast), never as a stack trace in the page: the trace goes to the server log. On a
    shared server the visitor sees no exception text (it may name other users' files)."""
    try:
        return fn(**kwargs) or {}
    except Exception as error:
        log.exception("%s failed", getattr(fn, "__name__", fn))
        text = ("An unexpected error stopped this action; the server log has the details."
                if state.OPTIONS.shared else
                f"Unexpected error ({type(error).__name__}: {error}); see the server log.")
        if message is None:
            raise gr.Error(text) from None
        return failed(RuntimeError(text), message)


def takes_access(fn: Callable) -> bool:
    return "access" in inspect.signature(fn).parameters


def wire(section: Any, fn: Callable[..., dict], inputs: list[str],
         outputs: list[str]) -> tuple[Callable, set, list]:
    """(handler, input set, output list) for Gradio: the handler reads its inputs by name and
    returns `{name: value}`; names missing from the result leave their component as it is.
    A handler with an `access` parameter gets the Access of the request's visitor."""
    components = {name: section.component(name) for name in inputs}
    out = [section.component(name) for name in outputs]
    message = next((name for name in outputs if name.endswith("message")), None)
    with_access = takes_access(fn)

    def run(data: dict, request: gr.Request) -> dict:
        kwargs = {name: data[component] for name, component in components.items()}
        if with_access:
            kwargs["access"] = state.access(request)
        result = call_safely(fn, kwargs, message)
        return {section.component(name): result.get(name, gr.skip()) for name in outputs}

    run.__name__ = fn.__name__
    return run, set(components.values()), out


OPENED = ["selected", "baseline", "editor", "caption", "caption_for", "title", "preview",
          "message"]
BROWSED = ["gallery", "entries", "info"]


def build_section(concepts_table: gr.Dataframe, concepts: list,
                  panels: Sequence[Callable[[DatasetSection], Any]] = ()) -> DatasetSection:
    """Draw the section (inside the page's Blocks) and bind its events. Each of `panels` is
    then drawn at the section's end, given the section (the automatic-mask panel)."""
    browse.prune_thumbnails(THUMBNAIL_DIR)  # once per page build, i.e. per server start
    items = [c.model_dump(mode="json") if hasattr(c, "model_dump") else dict(c)
             for c in concepts]
    folders = list(dict.fromkeys(str(c["path"]) for c in items
                                 if c.get("enabled", True) and c.get("path")))
    with gr.Accordion("Images, captions and masks", open=False,
                      elem_id="section-dataset") as accordion:
        with gr.Row(equal_height=True):
            # allow_custom_value: when the Data table changes, the chooser's new choices are
            # set on the server before the browser has its new value; an event sent in
            # between (opening this section, a refresh) carries the old folder, which gradio
            # would refuse as not among the choices, failing the event ("Error" in the info
            # line, an empty gallery). current_folder() maps such a value to the table's
            # folder instead.
            concept = gr.Dropdown(choices=folders, value=folders[0] if folders else None,
                                  label="Concept folder", visible=len(folders) > 1, scale=3,
                                  elem_id="dataset-concept", interactive=True,
                                  allow_custom_value=True,
                                  info="The enabled concept folders of the Data table.")
            only_unmasked = gr.Checkbox(label="Only images without a mask", value=False,
                                        elem_id="dataset-unmasked", scale=1)
            refresh = gr.Button("Refresh", elem_id="dataset-refresh", scale=0, min_width=96)
        info = gr.Markdown(elem_id="dataset-info")
        gallery = gr.Gallery(label="Images (✓ = has a mask; click one to edit it)",
                             elem_id="dataset-gallery", columns=6, height=260,
                             allow_preview=False, object_fit="contain", interactive=False,
                             fit_columns=False)
        entries = gr.State([])
        selected = gr.State(None)
        baseline = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                editor = gr.ImageEditor(
                    label="Mask: paint white where training should focus (eraser removes)",
                    type="pil", image_mode="RGBA", format="png", sources=[], transforms=[],
                    layers=False, height=EDITOR_HEIGHT, elem_id="mask-editor",
                    interactive=True, fixed_canvas=False,
                    brush=gr.Brush(colors=[(painted.BRUSH_COLOR, painted.BRUSH_OPACITY)],
                                   default_color=(painted.BRUSH_COLOR, painted.BRUSH_OPACITY),
                                   color_mode="fixed", default_size="auto"),
                    eraser=gr.Eraser(default_size="auto"))
                with gr.Row(elem_id="mask-buttons"):
                    clear = gr.Button("Clear", elem_id="mask-clear", size="sm")
                    fill = gr.Button("Fill all", elem_id="mask-fill", size="sm")
                    invert = gr.Button("Invert", elem_id="mask-invert", size="sm")
                    save_mask_btn = gr.Button("Save mask", elem_id="mask-save", size="sm",
                                              variant="primary")
            with gr.Column(scale=2):
                title = gr.Markdown(NO_IMAGE, elem_id="dataset-selected")
                caption = gr.Textbox(label="Caption", lines=3, elem_id="dataset-caption",
                                     info="Saved to <image name>.txt beside the image; several "
                                          "lines are alternative captions.")
                save_caption_btn = gr.Button("Save caption", elem_id="caption-save",
                                             size="sm")
                caption_for = gr.Textbox(visible=False, elem_id="dataset-caption-for")
                message = gr.HTML(elem_id="dataset-message")
                preview = gr.Image(label="Saved mask (outside dimmed)", interactive=False,
                                   elem_id="mask-preview", height=220, type="pil",
                                   format="png")
        section = DatasetSection(accordion, concept, only_unmasked, refresh, info, gallery,
                                 entries, selected, baseline, title, caption,
                                 save_caption_btn, editor, clear, fill, invert, save_mask_btn,
                                 preview, message, concepts_table, caption_for)
        _bind(section)
        for panel in panels:
            panel(section)
    return section


def current_folder(concept: str | None, concepts: Any) -> str | None:
    """The concept folder to act on. The chooser may still hold a folder the Data table no
    longer lists: the table changed (an import, a preset) and its update to the chooser has
    not arrived yet. Then the table's first enabled folder, as the chooser is about to show."""
    folders = [str(c["path"]) for c in enabled_concepts(concepts)]
    if folders and concept not in folders:
        return folders[0]
    return concept


def refresh_gallery(concept, only_unmasked, concepts, selected,
                    access: Access | None = None) -> dict:
    """browse_folder under the section's component names (for `wire`)."""
    return browse_folder(current_folder(concept, concepts), only_unmasked, concepts, selected,
                         access)


def has_unsaved_paint(selected: str | None, editor: Any, baseline: Any,
                      access: Access | None = None) -> bool:
    """Whether the canvas holds paint that differs from the open image's saved mask."""
    if not selected:
        return False
    try:
        path = _existing_image(selected, access=access)
        image = load_image_rgb(path)
        saved = existing_mask(path)
    except AtelierError:
        return False
    now = painted.canvas_mask(editor, image, baseline)
    return now is not None and not painted.same_mask(now, saved)


BROWSE_INPUTS = ["concept", "only_unmasked", "concepts", "selected"]


def _bind(s: DatasetSection) -> None:
    browse_inputs = BROWSE_INPUTS
    gr.on([s.accordion.expand, s.refresh.click, s.concept.change, s.only_unmasked.change],
          *wire(s, refresh_gallery, browse_inputs, BROWSED),
          api_name="dataset_browse", show_progress="minimal")

    def choose_concepts(concepts, concept) -> dict:
        return concept_choices(concepts, concept)

    s.concepts.change(*wire(s, choose_concepts, ["concepts", "concept"], ["concept"]),
                      api_name="dataset_concepts", show_progress="hidden")

    opened = s.components(OPENED)
    entries = s.entries

    def on_select(data: dict, evt: gr.SelectData, request: gr.Request) -> dict:
        index = evt.index if evt is not None else None
        result = call_safely(select_image, {"entries": data[entries], "index": index,
                                            "access": state.access(request)}, "message")
        return {component: result.get(name, gr.skip()) for name, component in
                zip(OPENED, opened)}

    s.gallery.select(on_select, {entries}, opened, api_name="dataset_select",
                     show_progress="minimal")

    # After a save the gallery is listed again: its labels show captions and mask states.
    s.save_caption.click(*wire(s, save_caption, ["selected", "caption", "caption_for"],
                               ["message", "caption", "title"]),
                         api_name="dataset_save_caption").then(
        *wire(s, refresh_gallery, browse_inputs, BROWSED), api_name="dataset_after_caption",
        show_progress="hidden")

    for button, how in ((s.clear, "clear"), (s.fill, "fill"), (s.invert, "invert")):
        def action(selected, editor, baseline, access=None, how=how) -> dict:
            return reset_mask(selected, editor, baseline, how, access)
        action.__name__ = f"mask_{how}"
        button.click(*wire(s, action, ["selected", "editor", "baseline"],
                           ["editor", "baseline", "message"]), api_name=f"mask_{how}")

    s.save_mask.click(*wire(s, save_mask, ["selected", "editor", "baseline"],
                            ["message", "preview", "title"]), api_name="mask_save").then(
        *wire(s, refresh_gallery, browse_inputs, BROWSED), api_name="dataset_after_mask",
        show_progress="hidden")


