"""The page's "Try it" panel: pick a LoRA of the workspace (the newest first), type a prompt,
and see the image without and with it side by side, at a chosen strength.

The drawing is the engine's (trainer.try_lora); this module lists the files, checks what a
visitor may use, and refuses while a training job holds the GPU. Handlers are plain functions
returning `{name: value}`, called directly by the tests; `build_panel` binds them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
from pydantic import ValidationError

from trainer.config import SampleConfig
from trainer.errors import AtelierError
from trainer.try_lora import find_loras, read_lora
from ui import paths, state
from ui.files import check_allowed, check_model_source, message_html

DEFAULT_SIZE = 512


def lora_choices() -> list[tuple[str, str]]:
    """(label, path) of the workspace's LoRA files, newest first."""
    root = paths.workspace_root()
    return [(str(path.relative_to(root)), str(path)) for path in find_loras(root)]


def refresh(current: str | None = None) -> dict:
    choices = lora_choices()
    values = [value for _, value in choices]
    value = current if current in values else (values[0] if values else None)
    return {"lora": gr.update(choices=choices, value=value), **size_of(value)}


def size_of(path: str | None) -> dict:
    """The LoRA's training size as the default image size (unknown: leave the fields)."""
    if not path:
        return {}
    try:
        size = read_lora(path).resolution
    except AtelierError:
        return {}
    return {"width": size, "height": size} if size else {}


def generate(lora: str | None, prompt: str, negative: str, strength: float, seed: Any,
             steps: Any, cfg: Any, width: Any, height: Any, base_model_name: str = "",
             model_type: str = "") -> dict:
    """(without, with) images of `prompt`, or a message saying why not."""
    def refuse(text: str) -> dict:
        return {"message": message_html(text, ok=False)}

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
    if not state.TRY_LOCK.acquire(blocking=False):
        return refuse("Another image is being drawn, or training is starting: wait a moment.")
    try:
        if state.SESSION.running:  # started while this one waited for the lock
            return refuse("A training job is running and holds the GPU: try the LoRA when "
                          "it has finished, or stop it.")
        path = check_allowed(Path(lora))
        chosen = read_lora(path)
        check_model_source(chosen.base_model_name or base_model_name, "base_model_name")
        without, with_lora = state.TRY.images(chosen, spec, strength,
                                              base_model_name=base_model_name,
                                              model_type=model_type)
    except AtelierError as error:
        return refuse(str(error))
    finally:
        state.TRY_LOCK.release()
    return {"without": without, "with": with_lora,
            "message": message_html(f"{path.name} at strength {strength:g}, seed {spec.seed}, "
                                    f"{spec.diffusion_steps} steps, CFG {spec.cfg_scale:g}.")}


def build_panel(base_model: gr.components.Component,
                model_type: gr.components.Component) -> None:
    """Draw the panel and bind its events; `base_model` and `model_type` are the page's
    fields, used for a LoRA file that does not name its base model."""
    first = refresh(None)
    with gr.Accordion("Try it", open=False, elem_id="section-try"):
        with gr.Row(equal_height=True):
            lora = gr.Dropdown(label="LoRA", choices=first["lora"]["choices"],
                               value=first["lora"]["value"], scale=4, elem_id="try-lora",
                               info="The workspace's LoRA files, the newest first.")
            refresh_btn = gr.Button("Refresh", elem_id="try-refresh", scale=0, min_width=90)
        prompt = gr.Textbox(label="Prompt", elem_id="try-prompt", lines=2)
        negative = gr.Textbox(label="Negative prompt", elem_id="try-negative")
        with gr.Row():
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength",
                                 elem_id="try-strength", scale=3)
            seed = gr.Number(42, label="Seed", precision=0, elem_id="try-seed", minimum=0)
            steps = gr.Number(20, label="Steps", precision=0, elem_id="try-steps",
                              minimum=1, maximum=200)
            cfg = gr.Number(7.0, label="CFG", elem_id="try-cfg", minimum=0)
            width = gr.Number(first.get("width", DEFAULT_SIZE), label="Width", precision=0,
                              elem_id="try-width", minimum=8, step=8)
            height = gr.Number(first.get("height", DEFAULT_SIZE), label="Height", precision=0,
                               elem_id="try-height", minimum=8, step=8)
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

    refresh_btn.click(lambda current: outputs_of(refresh(current)), lora,
                      [lora, width, height], api_name="try_refresh", show_progress="hidden")
    lora.change(lambda path: outputs_of(size_of(path)), lora, [width, height],
                api_name=False, show_progress="hidden")
    run.click(lambda *args: outputs_of(generate(*args)),
              [lora, prompt, negative, strength, seed, steps, cfg, width, height, base_model,
               model_type], [without, with_lora, message], api_name="try_lora",
              concurrency_limit=1)
