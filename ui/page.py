"""The page: one Gradio Blocks, top to bottom as SPEC §1 lays it out.

Every config field is drawn from its metadata (ui/fields.py) into `fields`, a dict
`config key -> component`. Events take their inputs as a *set* of components, so a handler
receives `{component: value}` and reads each value by key through `fields`; nothing depends on
the order of components.

Training state lives on the server (ui/state.py SESSION); a `gr.Timer` polls it, so a reload or
a second browser shows the running job.
"""
from __future__ import annotations

import html
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.config import (ConceptConfig, SampleConfig, TrainConfig, check_supported,
                            config_from_dict)
from trainer.errors import AtelierError, ConfigError
from ui import fields as F
from ui import footer, lr_preview, optimizers, paths, presets, tables
from ui.state import SESSION, check_paths

log = logging.getLogger(__name__)

TOP_BAR_KEYS = ("model_type", "training_method")
LR_KEYS = ("learning_rate", "learning_rate_scheduler", "learning_rate_warmup_steps",
           "learning_rate_min_factor", "learning_rate_cycles", "epochs", "batch_size",
           "gradient_accumulation_steps")
OPEN_SECTIONS = {"Optimizer", "Learning-rate scheduler", "Main settings"}
FIELDS_PER_ROW = 3
POLL_SECONDS = 1.0

CSS = """
.gradio-container { padding-bottom: 210px !important; }
#atelier-title h1 { margin: 0; font-size: 1.6em; }
#atelier-title p { margin: 2px 0 0; opacity: .75; }
#topbar-presets, #topbar-model { align-items: flex-end; }
#topbar-presets button { white-space: nowrap; }
#footer { position: fixed; left: 0; right: 0; bottom: 0; z-index: 60; margin: 0 !important;
  padding: 8px 16px 10px; background: var(--background-fill-primary);
  border-top: 1px solid var(--border-color-primary); box-shadow: 0 -4px 16px rgba(0,0,0,.08); }
#footer .footer-buttons button { min-width: 96px; }
.atelier-bar { position: relative; height: 26px; border-radius: 6px; overflow: hidden;
  background: var(--neutral-200); min-width: 160px; }
.dark .atelier-bar { background: var(--neutral-700); }
.atelier-bar-fill { position: absolute; top: 0; bottom: 0; left: 0;
  background: var(--color-accent); opacity: .85; transition: width .4s; }
.atelier-bar-text { position: relative; padding-left: 10px; line-height: 26px; font-size: 14px;
  font-weight: 600; font-variant-numeric: tabular-nums; }
.atelier-status { font-size: 14px; }
.atelier-badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600;
  background: var(--neutral-200); color: var(--neutral-800); }
.atelier-running .atelier-badge, .atelier-stopping .atelier-badge { background: #dbeafe; color: #1e40af; }
.atelier-finished .atelier-badge { background: #dcfce7; color: #166534; }
.atelier-stopped .atelier-badge { background: #fef3c7; color: #92400e; }
.atelier-failed .atelier-badge { background: #fee2e2; color: #991b1b; }
.atelier-failed .atelier-message { color: #b91c1c; font-weight: 600; }
.atelier-facts { display: flex; flex-wrap: wrap; gap: 4px 18px; margin-top: 4px;
  font-variant-numeric: tabular-nums; }
#notice .atelier-error { color: #b91c1c; font-weight: 600; white-space: pre-wrap; }
#notice .atelier-ok { color: #166534; }
.atelier-dialog { position: fixed !important; top: 8vh; left: 50%; transform: translateX(-50%);
  width: min(680px, 94vw) !important; max-height: 80vh; overflow: auto; z-index: 100;
  background: var(--background-fill-primary); border: 1px solid var(--border-color-primary);
  border-radius: 10px; box-shadow: 0 12px 48px rgba(0,0,0,.35); padding: 16px !important; }
#optimizer-more { max-width: 56px; min-width: 56px; font-size: 20px; }
"""

HEADER = ("<div id='atelier-title'><h1>Atelier</h1><p>Train Stable Diffusion 1.5 / SDXL LoRAs "
          "in the browser. Press <b>Start</b> to train the built-in demo, or load a preset.</p>"
          "</div>")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def field_elem_id(key: str) -> str:
    return "field-" + key.replace(".", "-").replace("_", "-")


# --- Components from specs ----------------------------------------------------------------------

class ConfigNumber(gr.Number):
    """gr.Number whose range error names the field (Gradio's own says only 'Value -1 is less
    than minimum value 0')."""

    is_template = True  # drawn by the frontend's Number
    # No __init__ of its own: Gradio reads a component's properties from its __init__ signature.
    field_name = ""

    def preprocess(self, payload: float | None) -> float | int | None:
        if payload is None:
            return None
        if self.minimum is not None and payload < self.minimum:
            raise gr.Error(f"{self.field_name}: {payload:g} is below the minimum {self.minimum:g}.")
        if self.maximum is not None and payload > self.maximum:
            raise gr.Error(f"{self.field_name}: {payload:g} is above the maximum {self.maximum:g}.")
        return self.round_to_precision(payload, self.precision)


def tooltip(spec: F.FieldSpec) -> str:
    text = spec.info
    if spec.range_text():
        text += f" Range: {spec.range_text()}."
    if spec.optional and "empty" not in text.lower():
        text += " Empty = not set."
    return text


def _step(spec: F.FieldSpec) -> float:
    if spec.kind == "int":
        return 1
    if spec.maximum is not None and spec.maximum <= 1:
        return 0.01
    default = spec.default
    if isinstance(default, (int, float)) and 0 < abs(default) < 1:
        import math
        return 10 ** math.floor(math.log10(abs(default)))
    return 1


def make_component(spec: F.FieldSpec, value: Any, visible: bool = True,
                   **layout: Any) -> gr.Component:
    common = dict(label=spec.label, info=tooltip(spec), elem_id=field_elem_id(spec.key),
                  interactive=True, visible=visible, min_width=200)
    common.update(layout)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "enum":
        return gr.Dropdown(choices=spec.choice_pairs(), value=value, **common)
    if spec.kind in ("int", "float"):
        number = ConfigNumber(value=value, minimum=spec.minimum, maximum=spec.maximum,
                              precision=0 if spec.kind == "int" else None, step=_step(spec),
                              **common)
        number.field_name = f"{spec.label} ({spec.key})"
        return number
    return gr.Textbox(value="" if value is None else str(value), max_lines=1, **common)


def draw_fields(keys: list[str], values: dict, choices: dict, fields: dict) -> None:
    """Fields in rows of FIELDS_PER_ROW, each stored under its key."""
    for start in range(0, len(keys), FIELDS_PER_ROW):
        with gr.Row():
            for key in keys[start:start + FIELDS_PER_ROW]:
                spec = F.SPECS[key]
                fields[key] = make_component(spec, values.get(key), F.applies(spec, choices))


# --- The page's own data ------------------------------------------------------------------------

@dataclass
class Page:
    fields: dict[str, gr.Component] = field(default_factory=dict)
    sections: dict[str, gr.Accordion] = field(default_factory=dict)
    concepts: gr.Dataframe | None = None
    samples: gr.Dataframe | None = None
    opt_memory: gr.State | None = None     # optimizer_defaults {OPTIMIZER: {param: value}}
    opt_current: gr.State | None = None    # the optimizer whose values the dialog shows

    def config_inputs(self) -> set:
        return set(self.fields.values()) | {self.concepts, self.samples, self.opt_memory,
                                            self.opt_current}

    def values(self, data: dict) -> dict[str, Any]:
        return {key: data[component] for key, component in self.fields.items()}

    def lists(self, data: dict) -> dict[str, list]:
        return {"concepts": tables.concepts_from_frame(data[self.concepts]),
                "samples": tables.samples_from_frame(data[self.samples])}

    def config(self, data: dict) -> tuple[TrainConfig, dict[str, dict]]:
        """The page's config (ConfigError names the bad key) and its optimizer_defaults."""
        values = self.values(data)
        raw = F.values_to_dict(values)
        raw.update(self.lists(data))
        config = config_from_dict(raw, warn=lambda message: None)
        memory = dict(data[self.opt_memory] or {})
        current = config.optimizer.optimizer.value
        memory[current] = {spec.name: values[spec.key]
                           for spec in optimizers.parameter_specs()}
        return config, memory


def complete(updates: dict, outputs: list) -> dict:
    """A handler's partial `{component: value}` with every other output left as it is."""
    return {component: updates.get(component, gr.skip()) for component in outputs}


def partial(fn, outputs: list):
    """Wrap a handler returning a partial dict so that Gradio gets every output."""
    def run(data):
        return complete(fn(data) or {}, outputs)
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def error_html(message: str) -> str:
    return f"<div class='atelier-error'>{html.escape(message)}</div>"


def ok_html(message: str) -> str:
    return f"<div class='atelier-ok'>{html.escape(message)}</div>"


# --- Build ------------------------------------------------------------------------------------------

def initial_config() -> tuple[TrainConfig, dict]:
    try:
        config, memory, _ = presets.merge_preset(presets.read_preset(presets.DEFAULT_PRESET), None)
        return config, memory
    except AtelierError as error:  # no demo preset: the defaults
        log.warning("Demo preset not loaded: %s", error)
        return TrainConfig(), {}


def build_page() -> gr.Blocks:
    config, memory = initial_config()
    values = F.config_to_values(config)
    choices = {"model_type": values["model_type"], "training_method": values["training_method"]}
    page = Page()
    fields = page.fields
    optimizer_key = optimizers.OPTIMIZER_KEY
    current_optimizer = values[optimizer_key]

    with gr.Blocks(title="Atelier — Stable Diffusion LoRA trainer") as demo:
        page.opt_memory = gr.State(memory)
        page.opt_current = gr.State(current_optimizer)
        seen = gr.State(None)

        gr.HTML(HEADER)

        # 1. Top bar
        with gr.Row(elem_id="topbar", equal_height=False):
            with gr.Column(scale=3, min_width=600):
                with gr.Row(elem_id="topbar-presets"):
                    preset_dd = gr.Dropdown(choices=presets.choices(),
                                            value=presets.DEFAULT_PRESET, label="Preset",
                                            elem_id="preset", scale=3, min_width=140)
                    load_btn = gr.Button("Load", elem_id="preset-load", scale=0, min_width=70)
                    preset_name = gr.Textbox(label="Preset name", placeholder="my preset",
                                             elem_id="preset-name", scale=2, min_width=120,
                                             max_lines=1)
                    save_btn = gr.Button("Save as…", elem_id="preset-save", scale=0,
                                         min_width=90)
                    export_btn = gr.Button("Export config", elem_id="export", scale=0,
                                           min_width=120)
                    import_btn = gr.UploadButton("Import", file_types=[".json"],
                                                 file_count="single", elem_id="import",
                                                 scale=0, min_width=90)
            with gr.Column(scale=2, min_width=340):
                with gr.Row(elem_id="topbar-model"):
                    for key in TOP_BAR_KEYS:
                        fields[key] = make_component(F.SPECS[key], values[key], min_width=160)
        report = gr.Markdown(elem_id="topbar-report")
        export_file = gr.File(label="Exported config (for python -m trainer train --config)",
                              visible=False, elem_id="export-file", interactive=False)

        # 2. Model
        with gr.Accordion("Model", open=True, elem_id="section-model"):
            keys = [k for k in F.keys_in_section(F.MODEL_SECTION) if k not in TOP_BAR_KEYS]
            draw_fields(keys, values, choices, fields)

        # 3. Data
        with gr.Accordion("Data", open=True, elem_id="section-data"):
            page.concepts = gr.Dataframe(
                value=tables.concepts_frame(config.model_dump(mode="json")["concepts"]),
                headers=tables.column_labels(ConceptConfig),
                datatype=tables.datatypes(ConceptConfig), interactive=True,
                label="Concepts", show_label=True, elem_id="concepts", row_count=None,
                max_height=300)
            with gr.Row():
                add_concept_btn = gr.Button("Add concept", size="sm", elem_id="add-concept",
                                            scale=0, min_width=120)
                concepts_info = gr.Markdown(concepts_summary(config.concepts),
                                            elem_id="concepts-info")
            with gr.Accordion("Concept columns", open=False):
                gr.Markdown(tables.column_help(ConceptConfig))

        # 4. Training: one accordion per section, in SPEC order
        gr.Markdown("## Training", elem_id="training-heading")
        opt_parts: dict[str, Any] = {}
        lr_parts: dict[str, Any] = {}
        for section in F.sections():
            keys = F.keys_in_section(section)
            with gr.Accordion(F.section_label(section, choices["model_type"]),
                              open=section in OPEN_SECTIONS, elem_id="section-" + slug(section),
                              visible=F.section_applies(section, choices)) as accordion:
                page.sections[section] = accordion
                if section == "Optimizer":
                    with gr.Row(equal_height=True):
                        fields[optimizer_key] = make_component(F.SPECS[optimizer_key],
                                                               current_optimizer)
                        opt_parts["more"] = gr.Button("⋯", elem_id="optimizer-more", scale=0,
                                                      min_width=56)
                    opt_parts["summary"] = gr.Markdown(
                        optimizers.summary(current_optimizer, {
                            s.name: values[s.key] for s in optimizers.parameter_specs()}),
                        elem_id="optimizer-summary")
                    opt_parts["hint"] = gr.Markdown(optimizers.HINTS.get(current_optimizer, ""),
                                                    elem_id="optimizer-hint")
                    keys = [k for k in keys if k != optimizer_key
                            and k not in {s.key for s in optimizers.parameter_specs()}]
                draw_fields(keys, values, choices, fields)
                if section == "Learning-rate scheduler":
                    frame, caption = lr_preview.curve_frame(config)
                    lr_parts["plot"] = gr.LinePlot(frame, x="step", y="learning rate",
                                                   title="Learning rate over the run",
                                                   height=220, elem_id="lr-curve",
                                                   x_title="optimizer step",
                                                   y_title="learning rate")
                    lr_parts["caption"] = gr.Markdown(caption, elem_id="lr-curve-caption")

        # 5. Sampling
        with gr.Accordion("Sampling", open=True, elem_id="section-sampling"):
            page.samples = gr.Dataframe(
                value=tables.samples_frame(config.model_dump(mode="json")["samples"]),
                headers=tables.column_labels(SampleConfig),
                datatype=tables.datatypes(SampleConfig), interactive=True,
                label="Sample prompts", elem_id="samples", max_height=260)
            with gr.Row():
                add_sample_btn = gr.Button("Add prompt", size="sm", elem_id="add-sample",
                                           scale=0, min_width=120)
                sample_now_2 = gr.Button("Sample now", size="sm", elem_id="sample-now-2",
                                         scale=0, min_width=120)
            draw_fields(F.keys_in_section("Sampling"), values, choices, fields)
            with gr.Accordion("Sample columns", open=False):
                gr.Markdown(tables.column_help(SampleConfig))
            gallery = gr.Gallery(label="Samples (newest first)", elem_id="gallery", columns=6,
                                 height=260, object_fit="contain", interactive=False)

        # The optimizer "⋯" dialog: a column shown over the page.
        with gr.Column(visible=False, elem_id="optimizer-dialog",
                       elem_classes=["atelier-dialog"]) as dialog:
            dialog_title = gr.Markdown(f"### {current_optimizer} parameters",
                                       elem_id="optimizer-dialog-title")
            param_keys = [s.key for s in optimizers.parameter_specs()]
            draw_fields(param_keys, values, choices, fields)
            with gr.Row():
                restore_btn = gr.Button("Restore defaults", elem_id="optimizer-restore")
                close_btn = gr.Button("Close", variant="primary", elem_id="optimizer-close")

        # Progress: plots, warnings, download (the fixed footer bar is below)
        with gr.Accordion("Progress", open=True, elem_id="section-progress"):
            with gr.Row():
                loss_plot = gr.LinePlot(footer.loss_frame(SESSION.state()), x="step", y="loss",
                                        color="series", title="Loss", height=220,
                                        color_map={"loss": "#94a3b8", "smoothed": "#4f46e5"},
                                        elem_id="loss-plot")
                lr_live = gr.LinePlot(footer.lr_frame(SESSION.state()), x="step",
                                      y="learning rate", title="Learning rate", height=220,
                                      elem_id="lr-plot")
            warnings_md = gr.Markdown(elem_id="job-warnings")
            download = gr.File(label="Trained model (download)", file_count="multiple",
                               interactive=False, elem_id="download")

        # 7. Footer, always visible
        with gr.Column(elem_id="footer"):
            with gr.Row(equal_height=True):
                with gr.Row(elem_classes=["footer-buttons"], scale=3):
                    start_btn = gr.Button("Start", variant="primary", elem_id="start",
                                          min_width=90)
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop",
                                         interactive=False, min_width=90)
                    sample_btn = gr.Button("Sample now", elem_id="sample-now",
                                           interactive=False, min_width=90)
                    save_now_btn = gr.Button("Save now", elem_id="save-now",
                                             interactive=False, min_width=90)
                epoch_bar = gr.HTML(footer.bars(SESSION.state())[0], elem_id="epoch-bar-box",
                                    scale=2)
                step_bar = gr.HTML(footer.bars(SESSION.state())[1], elem_id="step-bar-box",
                                   scale=2)
            with gr.Row():
                status = gr.HTML(footer.status_html(SESSION.state()), elem_id="status-box",
                                 scale=3)
                notice = gr.HTML("", elem_id="notice", scale=2)

        timer = gr.Timer(POLL_SECONDS)

        # --- events ---------------------------------------------------------------------------
        params = [fields[k] for k in param_keys]
        visibility_targets = [fields[k] for k, s in F.SPECS.items() if s.applies_to]

        def visibility(model_type: str, method: str) -> list:
            chosen = {"model_type": model_type, "training_method": method}
            updates = [gr.update(visible=F.section_applies(section, chosen),
                                 label=F.section_label(section, model_type))
                       for section in page.sections]
            updates += [gr.update(visible=F.applies(k, chosen))
                        for k, s in F.SPECS.items() if s.applies_to]
            return updates

        gr.on([fields["model_type"].change, fields["training_method"].change], visibility,
              inputs=[fields["model_type"], fields["training_method"]],
              outputs=list(page.sections.values()) + visibility_targets,
              api_name="apply_visibility", show_progress="hidden", queue=False)

        # LR curve of the current settings
        lr_inputs = {fields[k] for k in LR_KEYS} | {page.concepts}

        def redraw_lr(data: dict) -> tuple:
            raw = F.values_to_dict({k: data[fields[k]] for k in LR_KEYS}) if all(
                data[fields[k]] not in (None, "") for k in LR_KEYS) else None
            if raw is None:
                return lr_preview.empty_frame(), "Fill in the learning rate, schedule and " \
                                                 "epoch settings to see the curve."
            raw["concepts"] = tables.concepts_from_frame(data[page.concepts])
            try:
                return lr_preview.curve_frame(config_from_dict(raw, warn=lambda m: None))
            except ConfigError as error:
                return lr_preview.empty_frame(), f"No preview: {error}"

        gr.on([fields[k].change for k in LR_KEYS] + [page.concepts.change], redraw_lr,
              inputs=lr_inputs, outputs=[lr_parts["plot"], lr_parts["caption"]],
              api_name="lr_curve", trigger_mode="always_last", show_progress="hidden")

        def summarize_concepts(frame) -> str:
            items = tables.concepts_from_frame(frame)
            try:
                concepts = [ConceptConfig.model_validate(item) for item in items]
            except Exception as error:  # a bad cell: the Start button names it
                return f"Check the table: {error}".splitlines()[0]
            return concepts_summary(concepts)

        page.concepts.change(summarize_concepts, page.concepts, concepts_info,
                             api_name="concepts_summary", show_progress="hidden")

        def add_row(frame, model) -> Any:
            import pandas as pd
            row = tables.to_frame(model, [model().model_dump(mode="json")])
            if frame is None or len(frame) == 0:
                return row
            row.columns = frame.columns
            return pd.concat([frame, row], ignore_index=True)

        add_concept_btn.click(lambda f: add_row(f, ConceptConfig), page.concepts, page.concepts,
                              api_name="add_concept")
        add_sample_btn.click(lambda f: add_row(f, SampleConfig), page.samples, page.samples,
                             api_name="add_sample")

        # Optimizer and its "⋯" dialog
        def switch_optimizer(data: dict) -> dict:
            new = data[fields[optimizer_key]]
            current = data[page.opt_current]
            if new == current:
                return {}
            current_values = {s.name: data[s_comp] for s, s_comp in
                              zip(optimizers.parameter_specs(), params)}
            memory, new_values = optimizers.switch(data[page.opt_memory], current,
                                                   current_values, new)
            out = {fields[f"optimizer.{name}"]: value for name, value in new_values.items()
                   if f"optimizer.{name}" in fields}
            out.update({page.opt_memory: memory, page.opt_current: new,
                        dialog_title: f"### {new} parameters",
                        opt_parts["summary"]: optimizers.summary(new, new_values),
                        opt_parts["hint"]: optimizers.HINTS.get(new, "")})
            return out

        switch_outputs = params + [page.opt_memory, page.opt_current, dialog_title,
                                   opt_parts["summary"], opt_parts["hint"]]
        fields[optimizer_key].input(
            partial(switch_optimizer, switch_outputs),
            inputs={fields[optimizer_key], page.opt_current, page.opt_memory, *params},
            outputs=switch_outputs,
            api_name="switch_optimizer", show_progress="hidden")

        opt_parts["more"].click(lambda: gr.update(visible=True), None, dialog,
                                api_name="open_optimizer_dialog", queue=False)
        close_btn.click(lambda: gr.update(visible=False), None, dialog,
                        api_name="close_optimizer_dialog", queue=False)

        def restore_defaults(optimizer: str, memory: dict) -> list:
            defaults = optimizers.default_parameters(optimizer)
            memory = {k: v for k, v in (memory or {}).items() if k != optimizer}
            return [defaults[s.name] for s in optimizers.parameter_specs()] + [memory]

        restore_btn.click(restore_defaults, [fields[optimizer_key], page.opt_memory],
                          params + [page.opt_memory], api_name="restore_optimizer_defaults")

        def resummarize(data: dict) -> str:
            optimizer = data[fields[optimizer_key]]
            return optimizers.summary(optimizer, {s.name: data[c] for s, c in
                                                  zip(optimizers.parameter_specs(), params)})

        gr.on([c.change for c in params], resummarize,
              inputs={fields[optimizer_key], *params}, outputs=opt_parts["summary"],
              api_name="optimizer_summary", show_progress="hidden", trigger_mode="always_last")

        # Filling the whole page from a config (presets, import)
        fill_outputs = (list(fields.values()) + [page.concepts, page.samples, page.opt_memory,
                        page.opt_current, dialog_title, opt_parts["summary"], opt_parts["hint"],
                        lr_parts["plot"], lr_parts["caption"], concepts_info, report])

        def fill(config: TrainConfig, memory: dict, message: str) -> dict:
            new_values = F.config_to_values(config)
            optimizer = new_values[optimizer_key]
            # The dialog shows the remembered edits of this optimizer over the file's values.
            remembered = (memory or {}).get(optimizer, {})
            for name, value in remembered.items():
                if f"optimizer.{name}" in new_values:
                    new_values[f"optimizer.{name}"] = value
            dump = config.model_dump(mode="json")
            frame, caption = lr_preview.curve_frame(config)
            out = {fields[k]: new_values[k] for k in fields}
            out.update({
                page.concepts: tables.concepts_frame(dump["concepts"]),
                page.samples: tables.samples_frame(dump["samples"]),
                page.opt_memory: memory or {}, page.opt_current: optimizer,
                dialog_title: f"### {optimizer} parameters",
                opt_parts["summary"]: optimizers.summary(optimizer, {
                    s.name: new_values[s.key] for s in optimizers.parameter_specs()}),
                opt_parts["hint"]: optimizers.HINTS.get(optimizer, ""),
                lr_parts["plot"]: frame, lr_parts["caption"]: caption,
                concepts_info: concepts_summary(config.concepts),
                report: message})
            return out

        def load_preset(data: dict) -> dict:
            choice = data[preset_dd]
            try:
                preset = presets.read_preset(choice)
                config, memory, messages = presets.merge_preset(preset, page.lists(data))
            except AtelierError as error:
                gr.Warning(str(error))
                return {report: f"⚠ {error}"}
            label = dict((v, l) for l, v in presets.choices()).get(choice, choice)
            text = f"Loaded preset **{label}**."
            if messages:
                text += "\n" + "\n".join(f"- {m}" for m in presets.summarize(messages))
            return fill(config, memory, text)

        load_btn.click(partial(load_preset, fill_outputs), inputs=page.config_inputs() | {preset_dd},
                       outputs=fill_outputs, api_name="load_preset")

        def import_file(data: dict) -> dict:
            upload = data[import_btn]
            if upload is None:
                return {}
            path = upload if isinstance(upload, str) else getattr(upload, "name", str(upload))
            try:
                raw = presets.read_json_file(path)
                config, memory, messages, kind = presets.import_config(raw, page.lists(data))
            except AtelierError as error:
                gr.Warning(str(error))
                return {report: f"⚠ Import failed: {error}"}
            text = f"Imported a {kind} config from **{html.escape(Path(path).name)}**."
            if messages:
                text += (f" {len(messages)} note(s):\n"
                         + "\n".join(f"- {m}" for m in presets.summarize(messages)))
                gr.Warning(f"Import: {len(messages)} key(s) ignored or reset; see the report "
                           "under the top bar.")
            return fill(config, memory, text)

        import_btn.upload(partial(import_file, fill_outputs), inputs=page.config_inputs() | {import_btn},
                          outputs=fill_outputs, api_name="import_config")

        def save_preset(data: dict) -> dict:
            try:
                config, memory = page.config(data)
                value, path = presets.save_user_preset(data[preset_name], config, memory)
            except AtelierError as error:
                gr.Warning(str(error))
                return {report: f"⚠ {error}"}
            return {preset_dd: gr.update(choices=presets.choices(), value=value),
                    report: f"Saved preset **{value.split(':', 1)[1]}** to `{path}`."}

        save_btn.click(partial(save_preset, [preset_dd, report]),
                       inputs=page.config_inputs() | {preset_name},
                       outputs=[preset_dd, report], api_name="save_preset")

        def export_config(data: dict) -> dict:
            try:
                config, memory = page.config(data)
                path = presets.write_export(config, memory)
            except AtelierError as error:
                gr.Warning(str(error))
                return {report: f"⚠ {error}", export_file: gr.update(visible=False)}
            return {export_file: gr.update(value=str(path), visible=True),
                    report: f"Exported the config. Run it headless with "
                            f"`python -m trainer train --config {path.name}`."}

        export_btn.click(partial(export_config, [export_file, report]), inputs=page.config_inputs(),
                         outputs=[export_file, report], api_name="export_config")

        # Start / Stop / Sample now / Save now
        def start(data: dict) -> str:
            try:
                config, _ = page.config(data)
                check_supported(config)
                check_paths(config)
                SESSION.start(config)
            except AtelierError as error:
                gr.Warning(str(error))
                return error_html(str(error))
            except Exception as error:  # a bug: the trace goes to the server log only
                log.exception("Start failed")
                gr.Warning(f"Could not start: {error}")
                return error_html(f"Could not start: {type(error).__name__}: {error}")
            return ok_html("Started.")

        start_btn.click(start, inputs=page.config_inputs(), outputs=notice,
                        api_name="start_from_page")

        def stop() -> str:
            if not SESSION.state().running:
                return ok_html("No training job is running.")
            SESSION.stop()
            return ok_html("Stopping after the current step; the model is saved then.")

        stop_btn.click(stop, None, notice, api_name="stop")

        def command(name: str, done: str):
            def run() -> str:
                try:
                    SESSION.request(name)
                except AtelierError as error:
                    gr.Warning(str(error))
                    return error_html(str(error))
                return ok_html(done)
            return run

        gr.on([sample_btn.click, sample_now_2.click],
              command("sample", "A sample will be drawn after the current step."),
              None, notice, api_name="sample_now")
        save_now_btn.click(command("save", "The model will be saved after the current step."),
                           None, notice, api_name="save_now")

        # Polling the server's job
        poll_outputs = [epoch_bar, step_bar, status, warnings_md, loss_plot, lr_live, gallery,
                        download, start_btn, stop_btn, sample_btn, save_now_btn, seen]

        def poll(last: footer.Snapshot | None) -> dict:
            state = SESSION.state()
            snap = footer.Snapshot.of(state)
            if last == snap:
                return {}
            first = last is None
            epoch_html, step_html = footer.bars(state)
            running = state.running
            out = {epoch_bar: epoch_html, step_bar: step_html,
                   status: footer.status_html(state),
                   warnings_md: footer.warnings_markdown(state), seen: snap}
            if first or last.status != snap.status:
                out.update({start_btn: gr.update(interactive=not running),
                            stop_btn: gr.update(interactive=state.status == "running"),
                            sample_btn: gr.update(interactive=running),
                            save_now_btn: gr.update(interactive=running)})
            if first or last.step != snap.step or last.status != snap.status:
                out.update({loss_plot: footer.loss_frame(state), lr_live: footer.lr_frame(state)})
            if first or last.samples != snap.samples:
                out[gallery] = footer.gallery_items(state)
            if first or last.output != snap.output or last.status != snap.status:
                out[download] = footer.download_files(state)
            return out

        timer.tick(partial(poll, poll_outputs), seen, poll_outputs, api_name="poll", show_progress="hidden",
                   concurrency_limit=None)
        demo.load(partial(poll, poll_outputs), seen, poll_outputs, api_name="attach", show_progress="hidden")
        demo.load(lambda: gr.update(choices=presets.choices()), None, preset_dd,
                  api_name="refresh_presets", show_progress="hidden")

        # For programs (gradio_client): JSON in, JSON out.
        gr.api(api_start, api_name="start")
        gr.api(api_state, api_name="state")
        gr.api(api_default_config, api_name="default_config")

    demo.page = page  # for tests: the key -> component map
    return demo


def concepts_summary(concepts) -> str:
    parts = []
    for i, concept in enumerate(concepts):
        count = tables.count_images(concept.path)
        name = Path(concept.path).name or concept.path
        if count is None:
            parts.append(f"⚠ concept {i + 1}: folder `{concept.path}` not found")
        else:
            state = "" if concept.enabled else " (disabled)"
            parts.append(f"`{name}`: {count} images{state}")
    return " · ".join(parts) if parts else "No concepts yet: add a folder of images."


# --- JSON endpoints (gradio_client) ---------------------------------------------------------------

def api_start(config_json: str) -> str:
    """Start training from a JSON config (partial: defaults fill the rest). Returns 'started'
    or the reason it did not start."""
    try:
        data = json.loads(config_json) if isinstance(config_json, str) else config_json
        if not isinstance(data, dict):
            raise ConfigError("The config must be a JSON object.")
        data = paths.localize_config({k: v for k, v in data.items()
                                      if k != presets.OPTIMIZER_DEFAULTS})
        config = config_from_dict(data, warn=lambda m: None)
        check_supported(config)
        check_paths(config)
        SESSION.start(config)
    except json.JSONDecodeError as error:
        return f"error: the config is not valid JSON: {error}"
    except AtelierError as error:
        return f"error: {error}"
    return "started"


def api_state() -> dict:
    """The training job's state: status, message, epoch/step of totals, loss, ETA, samples,
    warnings, output path, error."""
    state = SESSION.state().as_dict()
    # "file", not "path": gradio_client would take {"path": ...} dicts for files to download.
    state["samples"] = [{("file" if k == "path" else k): v for k, v in sample.items()}
                        for sample in state["samples"]]
    state["loss_history"] = state["loss_history"][-200:]
    state["lr_history"] = state["lr_history"][-200:]
    return json.loads(json.dumps(state, default=str))


def api_default_config() -> str:
    """The demo preset as a full JSON config (a starting point for `start`)."""
    config, memory = initial_config()
    return json.dumps(presets.export_dict(config, memory))
