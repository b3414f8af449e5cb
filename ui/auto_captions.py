"""The page's panel for captions, inside the dataset section: caption the chosen concept folder
with a captioning model (Florence-2, BLIP), preview it on the open image, and edit every
caption at once (add or remove a trigger word, find and replace).

The work is trainer.captions'; this module collects the settings and shows the results. Like
the automatic masks, a run refuses while training runs (training reads the captions), and
training does not start while a run writes them (state.MASK_RUNS holds both kinds of run).
Every folder, image and model is checked with the visitor's Access first (ui.files), and a
bulk edit never makes a caption longer than the server's limit (state.LIMITS).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from trainer.captions.edit import add_trigger, find_replace, remove_trigger
from trainer.captions.generate import (CaptionMode, CaptionSettings, caption_folder,
                                       preview_caption)
from trainer.captions.models import DEFAULT_CAPTION_MODEL
from trainer.errors import AtelierError, DatasetError
from trainer.limits import LIMIT_OPTIONS
from trainer.ownership import Access
from ui import state
from ui.dataset import (BROWSE_INPUTS, BROWSED, FOLDER_FIELD, IMAGE_FIELD, NO_IMAGE,
                        DatasetSection, call_safely, current_folder, refresh_gallery, wire)
from ui.files import (check_model_source, failed, message_html, readable, room_left,
                      writable, write_bounds)

MODES = [("Only images without a caption", CaptionMode.FILL.value),
         ("Replace every caption", CaptionMode.REPLACE.value)]
STYLES = [("Short", "short"), ("Detailed", "detailed")]
SETTINGS = ["caption_model", "caption_mode", "caption_style", "caption_prefix",
            "caption_suffix", "caption_max_length"]
EDITS = ["caption_trigger", "caption_find", "caption_replace_with"]
RUN_PREFIX = "captions:"  # its keys in state.MASK_RUNS, beside the mask runs'

_stop_requests: set[str] = set()
_stop_lock = state.MASK_RUNS_LOCK


def settings_from(values: dict[str, Any], access: Access | None = None) -> CaptionSettings:
    """The panel's values as CaptionSettings (the model's source checked on a shared server)."""
    model = str(values.get("caption_model") or "").strip() or DEFAULT_CAPTION_MODEL
    check_model_source(model, "Captioning model", access or state.access())
    limit = state.LIMITS.max_caption_chars
    added = len(values.get("caption_prefix") or "") + len(values.get("caption_suffix") or "")
    if limit is not None and added > limit:  # every caption of the run would be too long
        raise DatasetError(f"Prefix and suffix: {added:,} characters together, more than "
                           f"the {limit:,} a caption may have on this server "
                           f"({LIMIT_OPTIONS['max_caption_chars']}).")
    length = values.get("caption_max_length")
    return CaptionSettings(model=model, mode=values.get("caption_mode") or "fill",
                           style=values.get("caption_style") or "short",
                           prefix=values.get("caption_prefix") or "",
                           suffix=values.get("caption_suffix") or "",
                           max_length=int(length) if length else None,  # 0: the style's
                           online=state.OPTIONS.online)


def _writable_folder(concept: str | None, access: Access | None) -> Path:
    if state.SESSION.running:
        raise DatasetError("A training job is running and reads these captions: stop it or "
                           "wait for it to finish, then edit them.")
    if not concept:
        raise DatasetError("No concept folder: add one in the Data table.")
    return writable(concept, FOLDER_FIELD, access)


def preview_selected(selected: str | None, access: Access | None = None,
                     **values: Any) -> dict:
    """The caption a run would write for the image open in the canvas; writes nothing."""
    try:
        if not selected:
            raise DatasetError(NO_IMAGE)
        result = preview_caption(readable(selected, IMAGE_FIELD, access),
                                 settings_from(values, access))
    except AtelierError as error:
        return failed(error, "caption_message")
    old = f" (now: “{result.old.strip()}”)" if result.old and result.old.strip() else ""
    return {"caption_message": message_html(
        f"{Path(selected).name}: “{result.caption}”; a run {result.note}{old}.")}


def caption_concept(concept: str | None, progress: Callable | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    access: Access | None = None, **values: Any) -> dict:
    try:
        folder = _writable_folder(concept, access)
        room = room_left(folder, FOLDER_FIELD)
        summary = caption_folder(folder, settings_from(values, access), progress=progress,
                                 should_stop=should_stop, room=room)
    except AtelierError as error:
        return failed(error, "caption_message")
    return {"caption_message": message_html(summary.text(), ok=not summary.failed)}


def edit_concept(concept: str | None, action: str, caption_trigger: str = "",
                 caption_find: str = "", caption_replace_with: str = "",
                 access: Access | None = None) -> dict:
    """One bulk edit of every caption of the folder: add_trigger, remove_trigger, replace."""
    try:
        folder = _writable_folder(concept, access)
        word = (caption_trigger or "").strip()
        if action in ("add_trigger", "remove_trigger") and not word:
            raise DatasetError("Type the trigger word first.")
        # No caption may grow past the server's limit, nor the dataset past its quota.
        bounds = {"max_chars": state.LIMITS.max_caption_chars, **write_bounds()}
        if action == "add_trigger":
            summary = add_trigger(folder, word, **bounds)
        elif action == "remove_trigger":
            summary = remove_trigger(folder, word, **bounds)
        else:
            if not caption_find:
                raise DatasetError("Type the text to find first.")
            summary = find_replace(folder, caption_find, caption_replace_with or "", **bounds)
    except AtelierError as error:
        return failed(error, "caption_message")
    return {"caption_message": message_html(summary.text(), ok=not summary.failed)}


def request_stop(session: str) -> dict:
    with _stop_lock:
        if RUN_PREFIX + session not in state.MASK_RUNS:
            return {"caption_message": message_html("No caption run is in progress.")}
        _stop_requests.add(session)
    return {"caption_message": message_html("Stopping after the current image…")}


@dataclass
class CaptionPanel:
    section: DatasetSection
    caption_model: gr.Textbox
    caption_mode: gr.Dropdown
    caption_style: gr.Radio
    caption_prefix: gr.Textbox
    caption_suffix: gr.Textbox
    caption_max_length: gr.Number
    caption_preview: gr.Button
    caption_run: gr.Button
    caption_stop: gr.Button
    caption_trigger: gr.Textbox
    caption_add_trigger: gr.Button
    caption_remove_trigger: gr.Button
    caption_find: gr.Textbox
    caption_replace_with: gr.Textbox
    caption_replace: gr.Button
    caption_message: gr.HTML

    def component(self, name: str):
        return getattr(self, name) if name in self.__dataclass_fields__ else \
            self.section.component(name)


def build_panel(section: DatasetSection) -> CaptionPanel:
    with gr.Accordion("Captions for the whole folder", open=False,
                      elem_id="section-auto-captions"):
        gr.Markdown("Caption the concept folder chosen above with a captioning model "
                    "(Florence-2 or BLIP: a local folder, or a hub id when downloads are "
                    "allowed), or edit all its captions at once. **Preview** captions the "
                    "image open in the canvas without writing.", elem_classes=["table-info"])
        with gr.Row():
            model = gr.Textbox(label="Captioning model", value=DEFAULT_CAPTION_MODEL,
                               max_lines=1, elem_id="caption-model", scale=3)
            mode = gr.Dropdown(MODES, value=CaptionMode.FILL.value, label="Mode",
                               elem_id="caption-mode", scale=2)
            style = gr.Radio(STYLES, value="short", label="Style", elem_id="caption-style",
                             scale=1)
        with gr.Row():
            prefix = gr.Textbox(label="Prefix", placeholder="a trigger word, e.g. ohwx cat",
                                max_lines=1, elem_id="caption-prefix")
            suffix = gr.Textbox(label="Suffix", placeholder="e.g. film photo", max_lines=1,
                                elem_id="caption-suffix")
            max_length = gr.Number(0, label="Max length (tokens)", precision=0, minimum=0,
                                   elem_id="caption-max-length",
                                   info="0: the style's own (40 short, 120 detailed).")
        with gr.Row():
            preview = gr.Button("Preview", elem_id="caption-preview", size="sm")
            run = gr.Button("Caption folder", elem_id="caption-run", size="sm",
                            variant="primary")
            stop = gr.Button("Stop", elem_id="caption-stop", size="sm")
        with gr.Row(equal_height=True):
            trigger = gr.Textbox(label="Trigger word", max_lines=1, elem_id="caption-trigger",
                                 scale=2)
            add = gr.Button("Add to every caption", elem_id="caption-add-trigger", size="sm",
                            scale=1)
            remove = gr.Button("Remove from every caption", elem_id="caption-remove-trigger",
                               size="sm", scale=1)
        with gr.Row(equal_height=True):
            find = gr.Textbox(label="Find", max_lines=1, elem_id="caption-find", scale=2)
            replace_with = gr.Textbox(label="Replace with", max_lines=1,
                                      elem_id="caption-replace-with", scale=2)
            replace = gr.Button("Replace in every caption", elem_id="caption-replace",
                                size="sm", scale=1)
        message = gr.HTML(elem_id="caption-message")
    panel = CaptionPanel(section, model, mode, style, prefix, suffix, max_length, preview,
                         run, stop, trigger, add, remove, find, replace_with, replace, message)
    _bind(panel)
    return panel


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _bind(p: CaptionPanel) -> None:
    p.caption_preview.click(*wire(p, preview_selected, ["selected", *SETTINGS],
                                  ["caption_message"]), api_name="caption_preview")
    inputs = {p.component(name): name for name in ["concept", "concepts", *SETTINGS]}
    refresh = wire(p, refresh_gallery, BROWSE_INPUTS, BROWSED)

    def run_captions(data: dict, request: gr.Request,
                     progress=gr.Progress()) -> dict:  # noqa: B008
        session = _session(request)
        with _stop_lock:
            _stop_requests.discard(session)
            state.MASK_RUNS.add(RUN_PREFIX + session)

        def report(done: int, total: int, name: str) -> None:
            progress(done / max(total, 1), desc=f"Captions {done} / {total} · {name}")

        progress(0, desc="Captions: starting (loading the model)…")
        values = {name: data[component] for component, name in inputs.items()}
        concept = current_folder(values.pop("concept"), values.pop("concepts"))
        try:
            result = call_safely(caption_concept,
                                 {"concept": concept, "progress": report,
                                  "should_stop": lambda: session in _stop_requests,
                                  "access": state.access(request), **values},
                                 "caption_message")
        finally:
            with _stop_lock:
                _stop_requests.discard(session)
                state.MASK_RUNS.discard(RUN_PREFIX + session)
        return {p.caption_message: result.get("caption_message", gr.skip())}

    p.caption_run.click(run_captions, set(inputs), [p.caption_message],
                        api_name="caption_folder").then(*refresh, show_progress="hidden")
    def stop_run(request: gr.Request) -> str:
        return request_stop(_session(request))["caption_message"]

    p.caption_stop.click(stop_run, None, p.caption_message, api_name="caption_stop",
                         queue=False)

    edit_inputs = {p.component(name): name for name in ["concept", "concepts", *EDITS]}
    for button, action in ((p.caption_add_trigger, "add_trigger"),
                           (p.caption_remove_trigger, "remove_trigger"),
                           (p.caption_replace, "replace")):
        def run_edit(data: dict, request: gr.Request, action=action) -> dict:
            values = {name: data[component] for component, name in edit_inputs.items()}
            concept = current_folder(values.pop("concept"), values.pop("concepts"))
            result = call_safely(edit_concept, {"concept": concept, "action": action,
                                                "access": state.access(request), **values},
                                 "caption_message")
            return {p.caption_message: result.get("caption_message", gr.skip())}
        button.click(run_edit, set(edit_inputs), [p.caption_message],
                     api_name=f"caption_{action}").then(*refresh, show_progress="hidden")
