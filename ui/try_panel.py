"""The page's "Try it" panel: pick a LoRA of the workspace (the newest first), type a prompt,
and see the image without and with it side by side, at a chosen strength.

The drawing is the engine's (trainer.try_lora); this module lists the files, checks what a
visitor may use, and refuses while a training job holds the GPU. Handlers are plain functions
returning `{name: value}`, called directly by the tests; `build_panel` binds them.

On a shared server a visitor sees and tries only the LoRAs they may read (their own jobs';
an admin: all), listed when their page loads (never baked into the page, whose config every
visitor fetches), and the server's Try it limits (image size, steps) apply.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
from pydantic import ValidationError

from trainer.config import SampleConfig
from trainer.errors import AtelierError
from trainer.limits import refuse_over
from trainer.ownership import Access
from trainer.backup_lora import backup_step, find_lora_backups, lora_from_backup
from trainer.try_lora import find_loras, read_lora
from ui import paths, state
from ui.files import check_model_source, message_html, readable, writable

DEFAULT_SIZE = 512


def _access(access: Access | None) -> Access:
    return access if access is not None else state.access()


def lora_choices(access: Access | None = None) -> list[tuple[str, str]]:
    """(label, path) of the workspace's LoRA files the visitor may read, newest first: final
    outputs and intermediate saves (`<name>-stepNNNNNN.safetensors`), then the LoRA runs'
    backups (`backup/step-N` folders, drawn from through a LoRA file made on first use)."""
    access = _access(access)
    root = paths.workspace_root()
    files = [(str(path.relative_to(root)), str(path)) for path in find_loras(root)
             if access.can_read(path)]
    backups = [(f"{path.relative_to(root)} (backup at step {backup_step(path)})", str(path))
               for path in find_lora_backups(root) if access.can_read(path)]
    return files + backups


def refresh(current: str | None = None, access: Access | None = None) -> dict:
    choices = lora_choices(access)
    values = [value for _, value in choices]
    value = current if current in values else (values[0] if values else None)
    return {"lora": gr.update(choices=choices, value=value), **size_of(value, access)}


def size_of(path: str | None, access: Access | None = None) -> dict:
    """The LoRA's training size as the default image size (unknown, or not the visitor's to
    read: leave the fields)."""
    if not path or not _access(access).can_read(path):
        return {}
    try:
        size = read_lora(path).resolution
    except AtelierError:
        return {}
    return {"width": size, "height": size} if size else {}


def limits_text() -> str:
    """The server's Try it limits, as the panel shows them ("" when there are none)."""
    limits = state.LIMITS
    parts = []
    if limits.try_max_size:
        parts.append(f"images up to {limits.try_max_size} px a side")
    if limits.try_max_steps:
        parts.append(f"up to {limits.try_max_steps} steps")
    return f"This server draws {' and '.join(parts)}." if parts else ""


def check_limits(spec: SampleConfig) -> None:
    """AtelierError naming the field, the limit and its app.py option when `spec` asks for
    more than this server draws (a large image can exhaust a shared server's memory)."""
    limits = state.LIMITS
    refuse_over(spec.width, limits.try_max_size, "width:", "try_max_size")
    refuse_over(spec.height, limits.try_max_size, "height:", "try_max_size")
    refuse_over(spec.diffusion_steps, limits.try_max_steps, "steps:", "try_max_steps")


def generate(lora: str | None, prompt: str, negative: str, strength: float, seed: Any,
             steps: Any, cfg: Any, width: Any, height: Any, base_model_name: str = "",
             model_type: str = "", access: Access | None = None) -> dict:
    """(without, with) images of `prompt`, or a message saying why not."""
    def refuse(text: str) -> dict:
        return {"message": message_html(text, ok=False)}

    access = _access(access)

    if not lora:
        return refuse("No LoRA chosen: train one (or put a .safetensors LoRA in the "
                      "workspace) and press Refresh.")
    if state.SESSION.running:
        return refuse("A training job is running and holds the GPU: try the LoRA when it has "
                      "finished, or stop it.")
    try:
        spec = SampleConfig(prompt=prompt or "", negative_prompt=negative or "",
                            seed=seed, diffusion_steps=steps, cfg_scale=cfg,
                            width=width, height=height)
    except ValidationError as error:
        first = error.errors()[0]
        key = {"diffusion_steps": "steps", "cfg_scale": "CFG"}.get(first["loc"][0],
                                                                    first["loc"][0])
        return refuse(f"{key}: {first['msg']} (got {first.get('input')!r}).")
    if not spec.prompt.strip():
        return refuse("Type a prompt first.")
    try:
        check_limits(spec)
    except AtelierError as error:
        return refuse(str(error))
    if not state.TRY_LOCK.acquire(blocking=False):
        return refuse("Another image is being drawn, or training is starting: wait a moment.")
    try:
        if state.SESSION.running:  # started while this one waited for the lock
            return refuse("A training job is running and holds the GPU: try the LoRA when "
                          "it has finished, or stop it.")
        path = readable(lora, "lora", access)
        name = path.name
        if path.is_dir():  # a backup: its LoRA file, made once inside it
            writable(path, "lora", access)
            made = lora_from_backup(path)  # refuses a folder that is no LoRA run's backup
            path, name = made, f"The backup at step {backup_step(path)}"
        chosen = read_lora(path)
        check_model_source(chosen.base_model_name or base_model_name, "base_model_name",
                           access)
        # the engine checks the limits and the caller's paths again, before it loads
        without, with_lora = state.TRY.images(
            chosen, spec, strength, base_model_name=base_model_name, model_type=model_type,
            max_size=state.LIMITS.try_max_size, max_steps=state.LIMITS.try_max_steps,
            access=access)
    except AtelierError as error:
        return refuse(str(error))
    finally:
        state.TRY_LOCK.release()
    return {"without": without, "with": with_lora,
            "message": message_html(f"{name} at strength {strength:g}, seed {spec.seed}, "
                                    f"{spec.diffusion_steps} steps, CFG {spec.cfg_scale:g}.")}


def build_panel(base_model: gr.components.Component,
                model_type: gr.components.Component):
    """Draw the panel and bind its events; `base_model` and `model_type` are the page's
    fields, used for a LoRA file that does not name its base model. Returns (fn, outputs)
    for the page's load event: the visitor's own LoRAs, listed when their page opens."""
    # On a shared server the page's config holds no one's files: each visitor's list comes
    # with their page load. A local page is its one owner's and shows them at once.
    first = refresh(None) if not state.OPTIONS.shared else {
        "lora": {"choices": [], "value": None}}
    limits = state.LIMITS
    with gr.Accordion("Try it", open=False, elem_id="section-try"):
        with gr.Row(equal_height=True):
            lora = gr.Dropdown(label="LoRA", choices=first["lora"]["choices"],
                               value=first["lora"]["value"], scale=4, elem_id="try-lora",
                               info="Your LoRA files in the workspace, the newest first "
                                    "(intermediate saves included), then your runs' backups.")
            refresh_btn = gr.Button("Refresh", elem_id="try-refresh", scale=0, min_width=90)
        prompt = gr.Textbox(label="Prompt", elem_id="try-prompt", lines=2)
        negative = gr.Textbox(label="Negative prompt", elem_id="try-negative")
        with gr.Row():
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength",
                                 elem_id="try-strength", scale=3)
            seed = gr.Number(42, label="Seed", precision=0, elem_id="try-seed", minimum=0)
            # The server's limits are checked by `generate` (its message names the field and
            # the option), not by gradio's maximum (whose message names neither).
            steps = gr.Number(20, label="Steps", precision=0, elem_id="try-steps",
                              minimum=1, maximum=None if limits.try_max_steps else 200)
            cfg = gr.Number(7.0, label="CFG", elem_id="try-cfg", minimum=0)
            width = gr.Number(first.get("width", DEFAULT_SIZE), label="Width", precision=0,
                              elem_id="try-width", minimum=8, step=8)
            height = gr.Number(first.get("height", DEFAULT_SIZE), label="Height", precision=0,
                               elem_id="try-height", minimum=8, step=8)
        if limits_text():
            gr.Markdown(limits_text(), elem_id="try-limits")
        run = gr.Button("Generate", variant="primary", elem_id="try-generate")
        with gr.Row():
            without = gr.Image(label="Without the LoRA", interactive=False,
                               elem_id="try-without", height=320)
            with_lora = gr.Image(label="With the LoRA", interactive=False,
                                 elem_id="try-with", height=320)
        message = gr.HTML(elem_id="try-message")

    names = {"lora": lora, "width": width, "height": height, "without": without,
             "with": with_lora, "message": message}

    def outputs_of(result: dict) -> dict:
        return {names[k]: v for k, v in result.items() if k in names}

    def listed(current, request: gr.Request):
        return outputs_of(refresh(current, state.access(request)))

    def sized(path, request: gr.Request):
        return outputs_of(size_of(path, state.access(request)))

    def draw(request: gr.Request, *args):
        return outputs_of(generate(*args, access=state.access(request)))

    refresh_btn.click(listed, lora, [lora, width, height], api_name="try_refresh",
                      show_progress="hidden")
    lora.change(sized, lora, [width, height], api_name=False, show_progress="hidden")
    run.click(draw, [lora, prompt, negative, strength, seed, steps, cfg, width, height,
                     base_model, model_type], [without, with_lora, message],
              api_name="try_lora", concurrency_limit=1)

    def on_load(request: gr.Request):
        return listed(None, request)
    return on_load, [lora, width, height]
