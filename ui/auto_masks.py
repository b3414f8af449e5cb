"""The page's panel for automatic masks (SPEC §4 "Automatic"), inside the dataset section.

A method (CLIPSeg text prompt, the image's alpha channel, or a colour key) and a mode (replace
all / create only missing / add / subtract) with threshold, smoothing and grow; "Preview" shows
what the settings make of the image open in the canvas, "Apply to folder" runs them over the
chosen concept folder with a progress bar and reports what was written, skipped and failed.
The work is trainer.masks.generate's; this module only collects the settings and shows results.
The folder, the open image and the CLIPSeg model are checked with the visitor's Access first.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.data.images import mask_path_for
from trainer.errors import AtelierError, DatasetError
from trainer.masks import painted
from trainer.masks.generate import (
    DEFAULT_CLIPSEG_MODEL,
    MaskMethod,
    MaskMode,
    MaskSettings,
    generate_masks,
    preview_mask,
)
from trainer.ownership import Access
from ui import state
from ui.dataset import (
    BROWSE_INPUTS,
    BROWSED,
    FOLDER_FIELD,
    IMAGE_FIELD,
    NO_IMAGE,
    OPENED,
    DatasetSection,
    call_safely,
    current_folder,
    has_unsaved_paint,
    open_image,
    refresh_gallery,
    wire,
)
from ui.files import (check_model_source, failed, message_html, readable, room_left,
                      writable)

PREVIEW_SIZE = 256  # px, the long side of each preview image

METHODS = [("Text prompt (CLIPSeg)", MaskMethod.CLIPSEG.value),
           ("Alpha channel", MaskMethod.ALPHA.value),
           ("Colour key", MaskMethod.COLOR.value)]
MODES = [("Create only missing masks", MaskMode.FILL.value),
         ("Replace all masks", MaskMode.REPLACE.value),
         ("Add to existing masks", MaskMode.ADD.value),
         ("Subtract from existing masks", MaskMode.SUBTRACT.value)]
SETTINGS = ["method", "mode", "prompt", "model", "color", "tolerance", "threshold", "smooth",
            "grow"]
PREVIEWS = ["auto_image", "auto_old", "auto_new", "auto_overlay", "auto_note", "auto_message"]

# "Stop" asks a running Apply to end after its current image. Keyed by the browser session,
# so one visitor's Stop never ends another's run. The runs in progress are listed in
# state.MASK_RUNS (training refuses to start meanwhile).
_stop_requests: set[str] = set()
_stop_lock = state.MASK_RUNS_LOCK


def settings_from(values: dict[str, Any], access: Access | None = None) -> MaskSettings:
    """The panel's values as MaskSettings, checked (MaskError names the bad field)."""
    settings = MaskSettings(**{name: values[name] for name in SETTINGS})
    if values.get("method") == MaskMethod.CLIPSEG.value:
        check_model_source(str(values.get("model") or ""), "CLIPSeg model",
                           access or state.access())
    settings.check()
    return settings


def preview_selected(selected: str | None, access: Access | None = None,
                     **values: Any) -> dict:
    """Image, old mask, new mask and overlay for the image open in the canvas; writes
    nothing."""
    try:
        if not selected:
            raise DatasetError(NO_IMAGE)
        path = readable(selected, IMAGE_FIELD, access)
        readable(mask_path_for(path), "Mask file", access)  # its old mask is shown too
        result = preview_mask(path, settings_from(values, access))
    except AtelierError as error:
        return {**failed(error, "auto_message"), "auto_note": ""}
    small = painted.shrink(result.image, PREVIEW_SIZE)
    fit = small.size
    return {"auto_image": small,
            "auto_old": result.old_mask.resize(fit) if result.old_mask is not None else None,
            "auto_new": result.new_mask.resize(fit),
            "auto_overlay": painted.overlay(small, result.new_mask.resize(fit)),
            "auto_note": f"**{path.name}**: {result.note}.",
            "auto_message": ""}


def training_running() -> bool:
    return state.SESSION.state().running


def apply_to_folder(concept: str | None,
                    progress: Callable[[int, int, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    selected: str | None = None, editor: Any = None, baseline: Any = None,
                    access: Access | None = None, **values: Any) -> dict:
    """Run the settings over the chosen concept folder; the summary names what was written,
    skipped and failed (with reasons).

    When the image open in the canvas (`selected`) gets a new mask, the result also holds
    `open_image`'s outputs, so the canvas shows the mask now on disk; otherwise the canvas is
    left as it is, unsaved paint included."""
    try:
        if training_running():
            raise DatasetError("A training job is running and may be reading these masks: "
                               "stop it or wait for it to finish, then apply.")
        if not concept:
            raise DatasetError("No concept folder: add one in the Data table.")
        folder = writable(concept, FOLDER_FIELD, access)
        room = room_left(folder, FOLDER_FIELD)
        settings = settings_from(values, access)
        unsaved = has_unsaved_paint(selected, editor, baseline, access)
        summary = generate_masks(folder, settings, progress=progress, should_stop=should_stop,
                                 room=room)
    except AtelierError as error:
        return failed(error, "auto_message")
    text = summary.text()
    result = {}
    open_name = _name_in(folder, selected)
    if open_name is not None and open_name in summary.written:
        result = {key: value for key, value in open_image(selected, access).items()
                  if key != "message"}
        text += (f" The canvas now shows the new mask of {open_name}"
                 + ("; the paint you had not saved on it was replaced." if unsaved else "."))
    return {**result, "auto_message": message_html(text, ok=not summary.failed)}


def _name_in(folder: Path, selected: str | None) -> str | None:
    """`selected`'s name relative to `folder` (as MaskSummary lists it), or None."""
    if not selected:
        return None
    try:
        return Path(selected).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def request_stop(session: str) -> dict:
    with _stop_lock:
        if session not in state.MASK_RUNS:
            return {"auto_message": message_html("No mask run is in progress.")}
        _stop_requests.add(session)
    return {"auto_message": message_html("Stopping after the current image…")}


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


# --- Layout and events ---------------------------------------------------------------------------

@dataclass
class AutoMaskPanel:
    section: DatasetSection
    method: gr.Radio
    mode: gr.Dropdown
    prompt: gr.Textbox
    model: gr.Textbox
    clipseg_row: gr.Row
    color: gr.ColorPicker
    tolerance: gr.Slider
    color_row: gr.Row
    threshold: gr.Slider
    smooth: gr.Slider
    grow: gr.Slider
    preview: gr.Button
    apply: gr.Button
    stop: gr.Button
    auto_message: gr.HTML
    auto_note: gr.Markdown
    auto_image: gr.Image
    auto_old: gr.Image
    auto_new: gr.Image
    auto_overlay: gr.Image

    def component(self, name: str):
        """A component of this panel, or of the dataset section it sits in."""
        return getattr(self, name) if name in self.__dataclass_fields__ else \
            self.section.component(name)


def build_panel(section: DatasetSection) -> AutoMaskPanel:
    """Draw the panel (inside the dataset section) and bind its events."""
    with gr.Accordion("Generate masks automatically", open=False, elem_id="section-auto-masks"):
        gr.Markdown("Make masks for the whole concept folder chosen above. **Preview** shows "
                    "what the settings make of the image open in the canvas; **Apply to "
                    "folder** writes the masks (each write is atomic).",
                    elem_classes=["table-info"])
        with gr.Row():
            method = gr.Radio(METHODS, value=MaskMethod.CLIPSEG.value, label="Method",
                              elem_id="auto-mask-method",
                              info="CLIPSeg finds what the prompt names; alpha keeps the "
                                   "opaque part of transparent images; colour key keeps "
                                   "everything that is not the background colour.")
            mode = gr.Dropdown(MODES, value=MaskMode.FILL.value, label="Mode",
                               elem_id="auto-mask-mode",
                               info="What happens to images that already have a mask.")
        with gr.Row() as clipseg_row:
            prompt = gr.Textbox(label="Prompt", placeholder="a person", max_lines=1,
                                elem_id="auto-mask-prompt",
                                info="What training should focus on, in a few words.")
            model = gr.Textbox(label="CLIPSeg model", value=DEFAULT_CLIPSEG_MODEL, max_lines=1,
                               elem_id="auto-mask-model",
                               info="A local model folder or a Hugging Face hub id.")
        with gr.Row(visible=False) as color_row:
            color = gr.ColorPicker(value="#ffffff", label="Background colour",
                                   elem_id="auto-mask-color",
                                   info="The colour left out of the mask (click the swatch).")
            tolerance = gr.Slider(0, 255, value=30, step=1, label="Tolerance",
                                  elem_id="auto-mask-tolerance",
                                  info="How far (0-255 per channel) a pixel may differ from "
                                       "the background colour and still count as background.")
        with gr.Row():
            threshold = gr.Slider(0, 1, value=0.3, step=0.01, label="Threshold",
                                  elem_id="auto-mask-threshold",
                                  info="Pixels scoring above this are in the mask.")
            smooth = gr.Slider(0, 64, value=0, step=1, label="Smooth (px)",
                               elem_id="auto-mask-smooth", info="Blur the mask's edges.")
            grow = gr.Slider(0, 64, value=0, step=1, label="Grow (px)",
                             elem_id="auto-mask-grow",
                             info="Widen the mask by this many pixels.")
        with gr.Row():
            preview = gr.Button("Preview", elem_id="auto-mask-preview", size="sm")
            apply = gr.Button("Apply to folder", elem_id="auto-mask-apply", size="sm",
                              variant="primary")
            stop = gr.Button("Stop", elem_id="auto-mask-stop", size="sm")
        auto_message = gr.HTML(elem_id="auto-mask-message")
        auto_note = gr.Markdown(elem_id="auto-mask-note")
        with gr.Row():
            images = [gr.Image(label=label, interactive=False, height=180, type="pil",
                               format="png", elem_id=f"auto-mask-{key}")
                      for label, key in (("Image", "image"), ("Old mask", "old"),
                                         ("New mask", "new"), ("Overlay (outside dimmed)",
                                                               "overlay"))]
    panel = AutoMaskPanel(section, method, mode, prompt, model, clipseg_row, color, tolerance,
                          color_row, threshold, smooth, grow, preview, apply, stop,
                          auto_message, auto_note, *images)
    _bind(panel)
    return panel


def _bind(p: AutoMaskPanel) -> None:
    def show_method_fields(method: str) -> tuple:
        return (gr.update(visible=method == MaskMethod.CLIPSEG.value),
                gr.update(visible=method == MaskMethod.COLOR.value))

    p.method.change(show_method_fields, p.method, [p.clipseg_row, p.color_row],
                    api_name="auto_mask_method", show_progress="hidden", queue=False)

    p.preview.click(*wire(p, preview_selected, ["selected", *SETTINGS], PREVIEWS),
                    api_name="auto_mask_preview")

    inputs = {p.component(name): name
              for name in ["concept", "concepts", "selected", "editor", "baseline", *SETTINGS]}
    outputs = ["auto_message", *OPENED]

    # Gradio finds its progress tracker by this default value (its documented idiom).
    def run_apply(data: dict, request: gr.Request,
                  progress=gr.Progress()) -> dict:  # noqa: B008
        session = _session(request)
        with _stop_lock:
            _stop_requests.discard(session)
            state.MASK_RUNS.add(session)

        def report(done: int, total: int, name: str) -> None:
            progress(done / max(total, 1), desc=f"Masks {done} / {total} · {name}")

        def should_stop() -> bool:
            return session in _stop_requests

        progress(0, desc="Masks: starting (loading the model if needed)…")
        values = {name: data[component] for component, name in inputs.items()}
        try:
            result = call_safely(apply_to_folder,
                                 {"concept": current_folder(values.pop("concept"),
                                                            values.pop("concepts")),
                                  "progress": report, "should_stop": should_stop,
                                  "access": state.access(request), **values}, "auto_message")
        finally:
            with _stop_lock:
                _stop_requests.discard(session)
                state.MASK_RUNS.discard(session)
        return {p.component(name): result.get(name, gr.skip()) for name in outputs}

    p.apply.click(run_apply, set(inputs), [p.component(name) for name in outputs],
                  api_name="auto_mask_apply").then(
        *wire(p, refresh_gallery, BROWSE_INPUTS, BROWSED), api_name="auto_mask_refresh",
        show_progress="hidden")

    def stop_apply(request: gr.Request) -> str:
        return request_stop(_session(request))["auto_message"]

    p.stop.click(stop_apply, None, p.auto_message, api_name="auto_mask_stop", queue=False)
