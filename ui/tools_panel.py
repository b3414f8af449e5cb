"""The page's "Tools" section: drop a LoRA file, see what it is (Inspect), cut its rank (Resize,
by rank or kept energy), or bake it into a base model (Merge into), and download the result.

The work is the engine's (trainer/lora_tools/); this module checks what a visitor may read
and write, picks where results go, and shows the outcome. Handlers are plain functions
returning `{name: value}`, called directly by the tests; `build_panel` binds them.

Results are written to the visitor's own folder — `<workspace>/lora-tools/`, or on a shared
server `<workspace>/users/<user>/lora-tools/` — never to a path the visitor types, and the
base model of a merge must be one they may read (their files, the demo model, or a hub id).
The uploaded LoRA is read where gradio put it (the visitor's own upload); any other path is
checked like every path the page reads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from trainer.errors import AtelierError, ConfigError
from trainer.ownership import Access
from ui import state
from ui.files import check_model_source, message_html, readable
from ui.footer import servable

TOOLS_FOLDER = "lora-tools"
FORMATS = [("Single file (ComfyUI, A1111, Forge)", "ORIGINAL_SINGLE_FILE"),
           ("Diffusers folder", "DIFFUSERS")]


def _access(access: Access | None) -> Access:
    return access if access is not None else state.access()


def output_folder(access: Access | None = None) -> Path:
    """Where this visitor's tool results go (see the module note)."""
    access = _access(access)
    if access.realm.shared:
        return access.user_folder() / TOOLS_FOLDER
    return access.realm.workspace / TOOLS_FOLDER


def _output(name: str, access: Access) -> Path:
    """A new file name in the visitor's folder, checked writable."""
    folder = output_folder(access)
    stem = re.sub(r"[^\w.-]+", "-", name).strip(".-") or "lora"
    return access.check_write(folder / stem, "output")


def _uploaded(file: Any, access: Access) -> Path:
    """The LoRA the visitor dropped: a file in gradio's upload folder (theirs), or a path they
    may read."""
    if not file:
        raise ConfigError("LoRA file: drop a .safetensors LoRA file first.")
    from gradio.utils import get_upload_folder
    value = os.fspath(getattr(file, "name", file))
    path = Path(os.path.realpath(value))
    if Path(os.path.realpath(get_upload_folder())) in path.parents:
        return path
    return readable(value, "LoRA file", access)


def _stem(path: Path) -> str:
    return path.name.removesuffix(".safetensors")


def inspect_file(file: Any, access: Access | None = None) -> dict:
    from trainer.lora_tools.inspect import inspect
    access = _access(access)
    try:
        report = inspect(_uploaded(file, access), "LoRA file")
    except AtelierError as error:
        return {"report": "", "message": message_html(str(error), ok=False)}
    return {"report": report.text(), "message": message_html("Inspected.")}


def _number(value: Any, name: str, kind: type) -> Any:
    if value in (None, ""):
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number.") from None
    if kind is int and number != float(value):
        raise ConfigError(f"{name}: {value!r} is not a whole number.")
    return number


def resize_file(file: Any, rank: Any, energy: Any, access: Access | None = None,
                on_progress: Callable | None = None) -> dict:
    """Resize to `rank`, or to the kept `energy` when it is given (rank then ignored)."""
    from trainer.lora_tools.resize import resize
    access = _access(access)
    try:
        source = _uploaded(file, access)
        # an empty number field sends 0: no energy given, the rank decides
        energy = _number(energy, "Energy", float) or None
        rank = None if energy is not None else _number(rank, "Rank", int)
        suffix = f"-energy{energy:g}" if energy is not None else f"-rank{rank}"
        out = _output(f"{_stem(source)}{suffix}.safetensors", access)
        result = resize(source, out, rank=rank, energy=energy, on_progress=on_progress,
                        field_name="LoRA file")
    except AtelierError as error:
        return {"message": message_html(_page_words(error), ok=False)}
    return {"message": message_html(result.text()), "result": servable(result.output)}


def merge_into_file(file: Any, base: str, strength: Any, output_format: str,
                    access: Access | None = None, on_progress: Callable | None = None) -> dict:
    """Bake the LoRA into `base` at `strength`; a single file comes back for download, a
    diffusers folder is named where it lies."""
    from trainer.lora_tools.merge_into import merge_into
    access = _access(access)
    if state.SESSION.running:
        return {"message": message_html("A training job is running and holds the memory: "
                                        "merge when it has finished, or stop it.", ok=False)}
    try:
        source = _uploaded(file, access)
        base = (base or "").strip()
        if not base:
            raise ConfigError("Base model: name the model to merge into (a diffusers folder, "
                              "a single .safetensors file or a hub id).")
        check_model_source(base, "Base model", access)
        strength = _number(strength, "Strength", float)
        strength = 1.0 if strength is None else strength
        suffix = "" if output_format == "DIFFUSERS" else ".safetensors"
        out = _output(f"{_stem(source)}-merged{suffix}", access)
        result = merge_into(base, [(source, strength)], out, output_format=output_format,
                            on_progress=on_progress)
    except AtelierError as error:
        return {"message": message_html(_page_words(error), ok=False)}
    if result.output.is_dir():
        return {"message": message_html(f"{result.text()} The folder is {result.output}.")}
    return {"message": message_html(result.text()), "result": servable(result.output)}


def _page_words(error: Exception) -> str:
    """The engine names CLI flags; the page's fields are named otherwise."""
    text = str(error)
    for flag, field_name in (("--base:", "Base model:"), ("--lora ", "LoRA file "),
                             ("--lora:", "LoRA file:"), ("--rank", "Rank"),
                             ("--energy", "Energy")):
        text = text.replace(flag, field_name)
    return text


def build_panel() -> None:
    """Draw the section and bind its events."""
    with gr.Accordion("Tools", open=False, elem_id="section-tools"):
        gr.Markdown("LoRA tools: drop a LoRA file (yours or another trainer's), see what it "
                    "is, cut its rank, or bake it into a base model. Results go to your "
                    f"`{TOOLS_FOLDER}` folder in the workspace and can be downloaded below.")
        upload = gr.File(label="LoRA file (.safetensors)", file_types=[".safetensors"],
                         type="filepath", elem_id="tools-upload")
        inspect_btn = gr.Button("Inspect", elem_id="tools-inspect", size="sm")
        report = gr.Textbox(label="What it is", lines=8, max_lines=30, interactive=False,
                            elem_id="tools-report")
        with gr.Row(equal_height=True):
            rank = gr.Number(8, label="Rank", precision=0, minimum=1, elem_id="tools-rank",
                             info="Resize to this rank…")
            energy = gr.Number(None, label="or kept energy (0–1; empty or 0: the rank)",
                               minimum=0, maximum=1,
                               elem_id="tools-energy",
                               info="…or per layer the smallest rank that keeps this share "
                                    "(e.g. 0.9); when set, it wins.")
            resize_btn = gr.Button("Resize", elem_id="tools-resize", scale=0, min_width=110)
        with gr.Row(equal_height=True):
            base = gr.Textbox(label="Base model", elem_id="tools-base", scale=3,
                              info="Merge into: a diffusers folder, a single .safetensors "
                                   "file or a hub id.")
            strength = gr.Number(1.0, label="Strength", elem_id="tools-strength")
            output_format = gr.Dropdown(FORMATS, value="ORIGINAL_SINGLE_FILE",
                                        label="Output", elem_id="tools-format")
            merge_btn = gr.Button("Merge into", elem_id="tools-merge", scale=0,
                                  min_width=110)
        message = gr.HTML(elem_id="tools-message")
        result = gr.File(label="Result (download)", interactive=False, elem_id="tools-result")

    names = {"report": report, "message": message, "result": result}

    def shown(outcome: dict, outputs: list[str]) -> list:
        return [outcome.get(k, gr.skip()) for k in outputs]

    def progress_of(progress: gr.Progress) -> Callable:
        return lambda done, total, what: progress(done / max(total, 1), desc=what)

    def on_inspect(file, request: gr.Request):
        return shown(inspect_file(file, state.access(request)), ["report", "message"])

    def on_resize(file, rank_value, energy_value, request: gr.Request,
                  progress=gr.Progress()):
        return shown(resize_file(file, rank_value, energy_value, state.access(request),
                                 progress_of(progress)), ["message", "result"])

    def on_merge(file, base_value, strength_value, format_value, request: gr.Request,
                 progress=gr.Progress()):
        return shown(merge_into_file(file, base_value, strength_value, format_value,
                                     state.access(request), progress_of(progress)),
                     ["message", "result"])

    inspect_btn.click(on_inspect, upload, [names["report"], names["message"]],
                      api_name="tools_inspect")
    resize_btn.click(on_resize, [upload, rank, energy], [message, result],
                     api_name="tools_resize", concurrency_limit=1)
    merge_btn.click(on_merge, [upload, base, strength, output_format], [message, result],
                    api_name="tools_merge_into", concurrency_limit=1)
