"""The page: one Gradio Blocks, top to bottom as SPEC §1 lays it out.

Every config field is drawn from its metadata (ui/fields.py) into `Page.fields`, a dict
`config key -> component`; lists of sub-models are tables in `Page.tables`; the optimizer's
parameters are the "⋯" dialog's boxes in `Page.params`. Events take their inputs as a *set* of
components, so a handler receives `{component: value}` and reads each value by key through
these dicts; nothing depends on the order of components.

Training state lives on the server (ui/state.py SESSION, the job queue); a `gr.Timer` polls
it, so a reload or a second browser shows the running job. Start queues a job (ui/jobs_panel.py
lists them); the footer follows the visitor's running job.
"""
from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from trainer.advice import comfyui_loads_part
from trainer.config import (FROZEN_ENCODERS, ConceptConfig, TrainConfig, check_supported,
                            config_from_dict)
from trainer.errors import AtelierError, ConfigError
from trainer.jobs.queue import SPACE_BACKUP_MINUTES, on_space
from trainer.session import JobState
from ui import (api, auto_captions, auto_masks, compare_panel, dataset, datasets_panel, footer,
                jobs_panel, lr_preview, optimizers, presets, publish_panel, sample_grid_panel,
                tables, timestep_preview, tools_panel, try_panel)
from ui import state as state_module
from ui import fields as F
from ui import memory_panel
from ui.components import (add_row, draw_fields, draw_table, field_elem_id, make_component,
                           make_parameter_box, page_value, parameter_box_update, slug)
from ui.state import OPTIONS, SESSION, check_paths, start_training, viewer
from ui.state import access as access_of

log = logging.getLogger(__name__)

TOP_BAR_KEYS = ("model_type", "training_method")
OPTIMIZER_KEY = optimizers.OPTIMIZER_KEY
DIALOG_KEYS = {key for key in F.SPECS if key.startswith("optimizer.") and key != OPTIMIZER_KEY}
LR_KEYS = ("learning_rate", "learning_rate_scheduler", "learning_rate_warmup_steps",
           "learning_rate_min_factor", "learning_rate_cycles", "custom_learning_rate_scheduler",
           "epochs", "batch_size", "gradient_accumulation_steps",
           # which parameter groups there are, and their own rates (a curve each)
           "model_type", "training_method", "text_encoder.train", "text_encoder.learning_rate",
           "text_encoder_2.train", "text_encoder_2.learning_rate", "unet.train",
           "unet.learning_rate", "embedding_learning_rate")
# The timestep-distribution preview sits in the section of the fields it shows (the
# distribution, its weight/bias/window, the shift), as the LR curve does in its own.
TIMESTEP_SECTION = "Noise and loss"
OPEN_SECTIONS = {"Optimizer", "Learning-rate scheduler", "Main settings"}
POLL_SECONDS = 1.0
# gradio's own cache (uploads, and the copies of files the page shows): every hour, what is
# older than six hours goes (a page open that long refreshes its images on the next change
# or reload). An upload the dataset import took or refused is deleted at once.
DELETE_CACHE = (3600, 6 * 3600)

__all__ = ["build_page", "CSS", "field_elem_id", "slug"]

CSS = """
.gradio-container { padding-bottom: 190px !important; }
#atelier-title h1 { margin: 0; font-size: 1.6em; }
#atelier-title p { margin: 2px 0 0; opacity: .75; }
#topbar { align-items: flex-end; }
#topbar button { white-space: nowrap; }
#footer { position: fixed; left: 0; right: 0; bottom: 0; z-index: 60; margin: 0 !important;
  padding: 8px 16px 10px; gap: 6px; background: var(--background-fill-primary);
  border-top: 1px solid var(--border-color-primary); box-shadow: 0 -4px 16px rgba(0,0,0,.08); }
#footer .footer-buttons button { min-width: 90px; }
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
.atelier-running .atelier-badge, .atelier-stopping .atelier-badge { background: #dbeafe;
  color: #1e40af; }
.atelier-finished .atelier-badge { background: #dcfce7; color: #166534; }
.atelier-stopped .atelier-badge { background: #fef3c7; color: #92400e; }
.atelier-failed .atelier-badge { background: #fee2e2; color: #991b1b; }
.atelier-failed .atelier-message { color: #b91c1c; font-weight: 600; }
.atelier-facts { display: flex; flex-wrap: wrap; gap: 4px 18px; margin-top: 4px;
  font-variant-numeric: tabular-nums; }
#notice .atelier-error { color: #b91c1c; font-weight: 600; white-space: pre-wrap; }
#notice .atelier-ok { color: #166534; }
.atelier-dialog { position: fixed !important; top: 6vh; left: 50%; transform: translateX(-50%);
  width: min(720px, 94vw) !important; max-height: 78vh; overflow: auto; z-index: 100;
  background: var(--background-fill-primary); border: 1px solid var(--border-color-primary);
  border-radius: 10px; box-shadow: 0 12px 48px rgba(0,0,0,.35); padding: 16px !important; }
#optimizer-more { max-width: 56px; min-width: 56px; font-size: 20px; }
.table-info { opacity: .75; font-size: 13px; }
/* Column titles and cells break between words, never inside one: a narrow table scrolls. */
[id^=table-] th, [id^=table-] th *, [id^=table-] td, [id^=table-] td * {
  word-break: normal !important; overflow-wrap: normal !important; hyphens: none !important; }
[id^=table-] th { font-size: 13px; }
"""
CSS += dataset.CSS  # the dataset browser and mask painter
CSS += jobs_panel.CSS

HEADER = ("<div id='atelier-title'><h1>Atelier</h1><p>Train LoRAs and fine-tunes of SD 1.5, "
          "SDXL, Flux.1, Chroma and SD 3.5 in the browser. Press <b>Start</b> to train the "
          "built-in demo, or load a preset.</p></div>")


def complete(updates: dict, outputs: list) -> dict:
    """A handler's partial `{component: value}` with every other output left as it is."""
    return {component: updates.get(component, gr.skip()) for component in outputs}


def partial(fn, outputs: list, with_request: bool = False):
    """Wrap a handler returning a partial dict so that Gradio gets every output; with
    `with_request`, the handler also gets the gradio request (who asks)."""
    if with_request:
        def run(data, request: gr.Request):
            return complete(fn(data, request) or {}, outputs)
    else:
        def run(data):
            return complete(fn(data) or {}, outputs)
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def error_html(message: str) -> str:
    return f"<div class='atelier-error'>{html.escape(message)}</div>"


def ok_html(message: str) -> str:
    return f"<div class='atelier-ok'>{html.escape(message)}</div>"


def concepts_summary(concepts, access=None) -> str:
    """One line: each concept's image count. Only folders `access` may read are counted (None:
    the visitor of a server without a login); another's shows the refusal, not a count."""
    parts = []
    for i, concept in enumerate(concepts):
        try:
            count = lr_preview.concept_images(concept, i, access)
        except AtelierError as error:
            parts.append(f"⚠ {error}")
            continue
        name = Path(concept.path).name or concept.path
        if count is None:
            parts.append(f"⚠ concept {i + 1}: folder `{concept.path}` not found")
        else:
            disabled = "" if concept.enabled else " (disabled)"
            parts.append(f"`{name}`: {count} images{disabled}")
    return " · ".join(parts) if parts else "No concepts yet: add a folder of images."


# --- The page's components, by key ----------------------------------------------------------

@dataclass
class Page:
    fields: dict[str, gr.Component] = field(default_factory=dict)   # config key -> component
    params: dict[str, gr.Component] = field(default_factory=dict)   # optimizer param -> box
    tables: dict[str, gr.Dataframe] = field(default_factory=dict)   # list key -> table
    sections: dict[str, gr.Accordion] = field(default_factory=dict)
    opt_memory: gr.State | None = None    # optimizer_defaults {OPTIMIZER: {param: value}}
    opt_current: gr.State | None = None   # the optimizer whose values the dialog shows

    def inputs(self) -> set:
        return (set(self.fields.values()) | set(self.params.values())
                | set(self.tables.values()) | {self.opt_memory, self.opt_current})

    def values(self, data: dict) -> dict[str, Any]:
        return {key: data[component] for key, component in self.fields.items()}

    def lists(self, data: dict) -> dict[str, list]:
        return {key: tables.from_frame(F.LISTS[key].item, data[table], F.LISTS[key].required)
                for key, table in self.tables.items()}

    def optimizer_values(self, data: dict, optimizer: str) -> dict[str, Any]:
        schema = {p.name: p for p in optimizers.schema(optimizer)}
        return {name: optimizers.parse(schema[name], data[box])
                for name, box in self.params.items() if name in schema}

    def config(self, data: dict) -> tuple[TrainConfig, dict[str, dict]]:
        """The page's config (ConfigError names the bad key) and its optimizer_defaults."""
        values = self.values(data)
        raw = F.values_to_dict(values)
        raw.update(self.lists(data))
        optimizer = values[OPTIMIZER_KEY]
        chosen = self.optimizer_values(data, optimizer)
        raw["optimizer"] = optimizers.section(optimizer, chosen)
        memory = dict(data[self.opt_memory] or {})
        memory[optimizer] = chosen
        raw[presets.OPTIMIZER_DEFAULTS] = presets.json_safe(memory)
        return config_from_dict(raw, warn=lambda message: None), memory


def initial_config() -> tuple[TrainConfig, dict]:
    try:
        config, memory, _ = presets.merge_preset(presets.read_preset(presets.DEFAULT_PRESET), None)
    except AtelierError as error:  # no demo preset: the defaults
        log.warning("Demo preset not loaded: %s", error)
        config, memory = TrainConfig(), {}
    default = TrainConfig()
    if on_space() and (config.backup_after, config.backup_after_unit) == (
            default.backup_after, default.backup_after_unit):
        # A Space restarts often: a restarted job continues from a backup minutes old.
        config = config.model_copy(update={"backup_after": SPACE_BACKUP_MINUTES})
    return config, memory


def shown_optimizer_values(config: TrainConfig, memory: dict) -> dict[str, Any]:
    optimizer = config.optimizer.optimizer.value
    explicit = config.optimizer.model_dump(exclude={"optimizer"})
    return optimizers.values_for(optimizer, memory, explicit)


# The settings that decide whether ComfyUI loads the LoRA file whole (trainer/advice.py).
FORMAT_NOTE_KEYS = ("model_type", "training_method", "output_model_format", "peft_type",
                    "lora_decompose", "text_encoder.train", "text_encoder_2.train",
                    "text_encoder_3.train")


def format_note_markdown(config: TrainConfig) -> str:
    message = comfyui_loads_part(config)
    return f"⚠️ {html.escape(message)}" if message else ""


# --- Build ----------------------------------------------------------------------------------

def build_page() -> gr.Blocks:
    config, memory = initial_config()
    values = F.config_to_values(config)
    dump = config.model_dump(mode="json")
    choices = {key: values[key] for key in F.controlling_keys()}
    page = Page()
    fields = page.fields
    current_optimizer = values[OPTIMIZER_KEY]
    shown_params = shown_optimizer_values(config, memory)
    allow_custom = SESSION.allow_custom_code

    with gr.Blocks(title="Atelier — Stable Diffusion LoRA trainer",
                   delete_cache=DELETE_CACHE) as demo:
        page.opt_memory = gr.State(memory)
        page.opt_current = gr.State(current_optimizer)
        seen = gr.State(None)

        gr.HTML(HEADER)

        # 1. Top bar
        with gr.Row(elem_id="topbar", equal_height=False):
            # a shared server's page holds the built-in presets; a visitor's own come with
            # their page load
            preset_dd = gr.Dropdown(choices=presets.builtin_choices() if OPTIONS.shared
                                    else presets.choices(), value=presets.DEFAULT_PRESET,
                                    label="Preset", elem_id="preset", scale=3, min_width=220)
            load_btn = gr.Button("Load", elem_id="preset-load", scale=0, min_width=64)
            preset_name = gr.Textbox(label="Preset name", placeholder="my preset",
                                     elem_id="preset-name", scale=2, min_width=120, max_lines=1)
            save_btn = gr.Button("Save as…", elem_id="preset-save", scale=0, min_width=84)
            export_btn = gr.Button("Export config", elem_id="export", scale=0, min_width=112)
            # several files: a OneTrainer Save config with the concepts file it names
            import_btn = gr.UploadButton("Import", file_types=[".json", ".txt"],
                                         file_count="multiple",
                                         elem_id="import", scale=0, min_width=72)
            for key in TOP_BAR_KEYS:
                fields[key] = make_component(F.SPECS[key], values[key], scale=2,
                                             min_width=150)
        report = gr.Markdown(elem_id="topbar-report")
        export_file = gr.File(label="Exported config (for python -m trainer train --config)",
                              visible=False, elem_id="export-file", interactive=False)

        def draw_lists(section: str) -> None:
            for spec in F.LISTS.values():
                if spec.section == section:
                    table, add = draw_table(spec, dump[spec.key], F.applies(spec, choices))
                    page.tables[spec.key] = table
                    add.click(lambda frame, model=spec.item: add_row(frame, model), table,
                              table, api_name=f"add_{spec.key}_row")

        # Tabs in the order a user works; the top bar, the progress plots and the footer
        # (Start/Stop, bars, status) stay outside them, seen from every tab. Every tab's
        # content is drawn at load (render_children): the page's scripts find it hidden.
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Data", id="data", elem_id="tab-data",
                        render_children=True):
                # 3. Data
                with gr.Accordion("Data", open=True, elem_id="section-data"):
                    draw_lists("Data")
                    concepts_info = gr.Markdown(concepts_summary(config.concepts),
                                                elem_id="concepts-info")
                    draw_fields(F.keys_in_section("Data"), values, choices, fields)
                    datasets_on_load = datasets_panel.build_panel(page.tables["concepts"])
                # The images of those concepts: captions, painted and generated masks (SPEC §4).
                dataset_section = dataset.build_section(page.tables["concepts"], config.concepts,
                                                        panels=[auto_masks.build_panel,
                                                                auto_captions.build_panel])

            with gr.Tab("Training", id="training", elem_id="tab-training",
                        render_children=True):
                # 2. Model
                with gr.Accordion("Model", open=True, elem_id="section-model"):
                    keys = [k for k in F.keys_in_section(F.MODEL_SECTION) if k not in TOP_BAR_KEYS]
                    draw_fields(keys, values, choices, fields)
                    # The GPU memory the settings need, redrawn when a field it reads changes.
                    memory_md = gr.Markdown(memory_panel.estimate_markdown(config),
                                            elem_id="memory-estimate")
                    # What ComfyUI would drop of the chosen LoRA format (measured with its
                    # own loader: docs/comfyui_results.md); empty when it loads it whole.
                    format_note = gr.Markdown(format_note_markdown(config),
                                              elem_id="format-note")

                # 4. Training: one accordion per section, in SPEC order
                gr.Markdown("## Training", elem_id="training-heading")
                opt_parts: dict[str, Any] = {}
                lr_parts: dict[str, Any] = {}
                timestep_parts: dict[str, Any] = {}
                for section in F.sections():
                    keys = [k for k in F.keys_in_section(section) if k not in DIALOG_KEYS]
                    with gr.Accordion(F.section_label(section, values["model_type"]),
                                      open=section in OPEN_SECTIONS,
                                      elem_id="section-" + slug(section),
                                      visible=F.section_applies(section, choices)) as accordion:
                        page.sections[section] = accordion
                        if section == "Optimizer":
                            with gr.Row(equal_height=True):
                                fields[OPTIMIZER_KEY] = make_component(F.SPECS[OPTIMIZER_KEY],
                                                                       current_optimizer)
                                opt_parts["more"] = gr.Button("⋯", elem_id="optimizer-more",
                                                              scale=0,
                                                              min_width=56)
                            opt_parts["summary"] = gr.Markdown(
                                optimizers.summary(current_optimizer, shown_params),
                                elem_id="optimizer-summary")
                            opt_parts["hint"] = gr.Markdown(optimizers.hint(current_optimizer),
                                                            elem_id="optimizer-hint")
                            keys.remove(OPTIMIZER_KEY)
                        draw_fields(keys, values, choices, fields)
                        draw_lists(section)
                        if section == "Learning-rate scheduler":
                            frame, caption = lr_preview.curve_frame(config, allow_custom)
                            lr_parts["plot"] = gr.LinePlot(frame, x="step", y="learning rate",
                                                           color="group",  # one per parameter group
                                                           title="Learning rate over the run",
                                                           height=220, elem_id="lr-curve",
                                                           x_title="optimizer step",
                                                           y_title="learning rate")
                            lr_parts["caption"] = gr.Markdown(caption, elem_id="lr-curve-caption")
                        if section == TIMESTEP_SECTION:  # drawn as the LR curve, beside its fields
                            frame, caption = timestep_preview.histogram_frame(config)
                            timestep_parts["plot"] = gr.LinePlot(
                                frame, x=timestep_preview.X, y=timestep_preview.Y,
                                title="Timesteps the run draws", height=220,
                                elem_id="timestep-curve",
                                x_title=timestep_preview.axis_title(config.model_type),
                                y_title=timestep_preview.Y,
                                x_lim=[0, timestep_preview.NUM_TRAIN_TIMESTEPS])
                            timestep_parts["caption"] = gr.Markdown(
                                caption, elem_id="timestep-curve-caption")

                # 6. Backup and save
                if F.keys_in_section(F.BACKUP_SECTION):
                    with gr.Accordion(F.BACKUP_SECTION, open=False,
                                      elem_id="section-" + slug(F.BACKUP_SECTION)):
                        draw_fields(F.keys_in_section(F.BACKUP_SECTION), values, choices, fields)

            with gr.Tab("Samples", id="samples", elem_id="tab-samples",
                        render_children=True):
                # 5. Sampling
                with gr.Accordion("Sampling", open=True, elem_id="section-sampling"):
                    draw_lists("Sampling")
                    draw_fields(F.keys_in_section("Sampling"), values, choices, fields)
                    sample_now_2 = gr.Button("Sample now", size="sm", elem_id="sample-now-2",
                                             min_width=120)
                    gallery = gr.Gallery(label="Samples (newest first)", elem_id="gallery",
                                         columns=8,
                                         fit_columns=False, height=220, object_fit="contain",
                                         interactive=False)

                # Every sample of the run: a row per prompt, a column per sampling point.
                grid = sample_grid_panel.build_panel()
                # Try a trained LoRA beside its base model.
                try_on_load = try_panel.build_panel(fields["base_model_name"], fields["model_type"])
            with gr.Tab("Jobs", id="jobs", elem_id="tab-jobs",
                        render_children=True):
                jobs = jobs_panel.build_panel()
                compare = compare_panel.build_panel()  # their curves, settings and grids
                publish_on_load = publish_panel.build_panel()
            with gr.Tab("Tools", id="tools", elem_id="tab-tools",
                        render_children=True):
                tools_panel.build_panel()  # LoRA tools: inspect, resize, merge into a model

        # The optimizer "⋯" dialog: a column shown over the page.
        with gr.Column(visible=False, elem_id="optimizer-dialog",
                       elem_classes=["atelier-dialog"]) as dialog:
            dialog_title = gr.Markdown(f"### {current_optimizer} parameters",
                                       elem_id="optimizer-dialog-title")
            names = optimizers.parameter_names()
            for start in range(0, len(names), 3):
                with gr.Row():
                    for name in names[start:start + 3]:
                        page.params[name] = make_parameter_box(name, current_optimizer,
                                                               shown_params.get(name))
            with gr.Row():
                restore_btn = gr.Button("Restore defaults", elem_id="optimizer-restore")
                close_btn = gr.Button("Close", variant="primary", elem_id="optimizer-close")

        # Progress: plots, warnings, download (the fixed footer bar is below)
        # On a shared server the first paint shows no one's job (the page's config is the
        # same for every visitor): the first poll shows the visitor's own.
        state = JobState() if OPTIONS.login or OPTIONS.shared else SESSION.state()
        with gr.Accordion("Progress", open=True, elem_id="section-progress"):
            with gr.Row():
                loss_plot = gr.LinePlot(footer.loss_frame(state), x="step", y="loss",
                                        color="series", title="Loss", height=220,
                                        color_map={"loss": "#94a3b8", "smoothed": "#4f46e5",
                                                   "validation": "#dc2626"},
                                        elem_id="loss-plot")
                lr_live = gr.LinePlot(footer.lr_frame(state), x="step", y="learning rate",
                                      title="Learning rate", height=220, elem_id="lr-plot")
            warnings_md = gr.Markdown(elem_id="job-warnings")
            download = gr.File(label="Trained model (download)", file_count="multiple",
                               interactive=False, elem_id="download",
                               visible=bool(footer.download_files(state)))

        # 7. Footer, always visible
        with gr.Column(elem_id="footer"):
            with gr.Row(equal_height=True):
                with gr.Row(elem_classes=["footer-buttons"], scale=3):
                    start_btn = gr.Button("Start", variant="primary", elem_id="start")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop",
                                         interactive=False)
                    sample_btn = gr.Button("Sample now", elem_id="sample-now",
                                           interactive=False)
                    backup_now_btn = gr.Button("Backup now", elem_id="backup-now",
                                               interactive=False)
                    save_now_btn = gr.Button("Save now", elem_id="save-now", interactive=False)
                epoch_html, step_html = footer.bars(state)
                epoch_bar = gr.HTML(epoch_html, elem_id="epoch-bar-box", scale=2)
                step_bar = gr.HTML(step_html, elem_id="step-bar-box", scale=2)
            with gr.Row():
                status = gr.HTML(footer.status_html(state), elem_id="status-box", scale=3)
                notice = gr.HTML("", elem_id="notice", scale=2)
            if OPTIONS.shared:
                gr.Markdown(footer.limits_line(state_module.LIMITS,
                                               state_module.IMPORT_LIMITS),
                            elem_id="server-limits")

        timer = gr.Timer(POLL_SECONDS)

        # --- events -----------------------------------------------------------------------
        params = list(page.params.values())
        controls = {key: fields[key] for key in F.controlling_keys()}
        conditional_fields = [fields[k] for k, s in F.SPECS.items()
                              if s.applies_to and k in fields]
        conditional_tables = [page.tables[k] for k, s in F.LISTS.items() if s.applies_to]
        visibility_outputs = (list(page.sections.values()) + conditional_fields
                              + [t.group for t in conditional_tables])

        def visibility(data: dict) -> list:
            chosen = {key: data[component] for key, component in controls.items()}
            updates = [gr.update(visible=F.section_applies(section, chosen),
                                 label=F.section_label(section, chosen.get("model_type")))
                       for section in page.sections]
            updates += [gr.update(visible=F.applies(k, chosen)) for k, s in F.SPECS.items()
                        if s.applies_to and k in fields]
            updates += [gr.update(visible=F.applies(k, chosen)) for k, s in F.LISTS.items()
                        if s.applies_to]
            return updates

        gr.on([c.change for c in controls.values()], visibility, inputs=set(controls.values()),
              outputs=visibility_outputs, api_name="apply_visibility", show_progress="hidden",
              queue=False)

        # A choice that stops fitting (a LoRA output format after switching to Fine-tune)
        # becomes the new setting's default; the config model says what fits (choices_for).
        restricted = {key: fields[key] for key, spec in F.SPECS.items()
                      if spec.choices_for and key in fields}

        def fit_choices(data: dict) -> dict:
            chosen = {key: data[component] for key, component in controls.items()}
            out = {}
            for key, component in restricted.items():
                fitting = F.fitting_choice(F.SPECS[key], data[component], chosen)
                out[component] = gr.update(value=fitting) if fitting != data[component] \
                    else gr.update()
            return out

        gr.on([c.change for c in controls.values()], fit_choices,
              inputs={*controls.values(), *restricted.values()},
              outputs=list(restricted.values()), api_name="fit_choices",
              show_progress="hidden", queue=False)

        # A T5 is never trained (the config refuses it): choosing a family whose encoder is a
        # T5 (Chroma's text_encoder, Flux's 2nd, SD 3's 3rd) switches that encoder's Train
        # off, instead of keeping the last family's switch for a CLIP in the same place.
        train_switches = {part: fields[f"{part}.train"] for part in F.ENCODER_PARTS
                          if f"{part}.train" in fields}

        def t5_off(model_type) -> dict:
            """The encoders Atelier keeps frozen (T5, Z-Image's Qwen3) switched off."""
            kinds = F.encoder_kinds(model_type)
            return {switch: gr.update(value=False) if kinds.get(part) in FROZEN_ENCODERS
                    else gr.update() for part, switch in train_switches.items()}

        fields["model_type"].change(t5_off, fields["model_type"], list(train_switches.values()),
                                    api_name="t5_off", show_progress="hidden", queue=False)

        # The LR curve of the current settings
        lr_fields = {k: fields[k] for k in LR_KEYS if k in fields}
        lr_tables = {k: page.tables[k] for k in ("concepts", "scheduler_params",
                                                 "additional_embeddings") if k in page.tables}

        def redraw_lr(data: dict, request: gr.Request) -> tuple:
            try:
                raw = F.values_to_dict({k: data[c] for k, c in lr_fields.items()})
                for key, table in lr_tables.items():
                    spec = F.LISTS[key]
                    raw[key] = tables.from_frame(spec.item, data[table], spec.required)
                return lr_preview.curve_frame(config_from_dict(raw, warn=lambda m: None),
                                              SESSION.allow_custom_code,
                                              access_of(request))
            except ConfigError as error:
                return lr_preview.empty_frame(), f"No preview: {error}"
            except Exception as error:  # a custom scheduler class that fails when stepped
                return lr_preview.empty_frame(), f"No preview: {type(error).__name__}: {error}"

        gr.on([c.change for c in [*lr_fields.values(), *lr_tables.values()]], redraw_lr,
              inputs={*lr_fields.values(), *lr_tables.values()},
              outputs=[lr_parts["plot"], lr_parts["caption"]], api_name="lr_curve",
              trigger_mode="always_last", show_progress="hidden")

        # The timestep distribution of the current settings (the engine's numbers)
        timestep_fields = {k: fields[k] for k in timestep_preview.KEYS if k in fields}

        def redraw_timesteps(data: dict, request: gr.Request) -> tuple:
            try:
                raw = F.values_to_dict({k: data[c] for k, c in timestep_fields.items()})
                config = config_from_dict(raw, warn=lambda m: None)
            except ConfigError as error:  # a shift <= 0, an unparsable resolution, ...
                return timestep_preview.empty_frame(), f"No preview: {error}"
            return timestep_preview.histogram_frame(config, access_of(request))

        # The axis names σ for the flow-matching families. A separate update after the data's:
        # gradio 6.31 drops the new data of a plot update that also changes x_title.
        gr.on([c.change for c in timestep_fields.values()], redraw_timesteps,
              inputs=set(timestep_fields.values()),
              outputs=[timestep_parts["plot"], timestep_parts["caption"]],
              api_name="timestep_preview", trigger_mode="always_last", show_progress="hidden"
              ).then(lambda model_type: gr.update(x_title=timestep_preview.axis_title(model_type)),
                     fields["model_type"], timestep_parts["plot"], api_name="timestep_axis",
                     show_progress="hidden")

        # The memory estimate of the current settings (the engine's; ui/memory_panel.py)
        def redraw_memory(data: dict, request: gr.Request) -> str:
            try:
                estimated, _ = page.config(data)
            except AtelierError as error:  # a bad value anywhere: its own sentence
                return memory_panel.no_estimate(memory_panel.first_line(error))
            except Exception:  # noqa: BLE001 - a cell the table cannot read: Start names it
                log.exception("Memory estimate: the page's settings could not be read")
                return memory_panel.no_estimate("a setting cannot be read yet; Start names it.")
            return memory_panel.estimate_markdown(estimated, access_of(request))

        gr.on([c.change for k, c in fields.items() if memory_panel.reads(k)], redraw_memory,
              inputs=page.inputs(), outputs=memory_md, api_name="memory_estimate",
              trigger_mode="always_last", show_progress="hidden")

        def redraw_format_note(data: dict) -> str:
            try:
                return format_note_markdown(page.config(data)[0])
            except Exception:  # noqa: BLE001 - a value that cannot be read: Start names it
                return ""

        gr.on([fields[k].change for k in FORMAT_NOTE_KEYS if k in fields], redraw_format_note,
              inputs=page.inputs(), outputs=format_note, api_name=False,
              trigger_mode="always_last", show_progress="hidden")

        def summarize_concepts(frame, request: gr.Request) -> str:
            items = tables.concepts_from_frame(frame)
            try:
                concepts = [ConceptConfig.model_validate(item) for item in items]
            except Exception as error:  # a bad cell: Start names it
                return f"Check the table: {error}".splitlines()[0]
            return concepts_summary(concepts, access_of(request))

        page.tables["concepts"].change(summarize_concepts, page.tables["concepts"],
                                       concepts_info, api_name="concepts_summary",
                                       show_progress="hidden")

        # The optimizer and its "⋯" dialog
        dialog_outputs = params + [page.opt_memory, page.opt_current, dialog_title,
                                   opt_parts["summary"], opt_parts["hint"]]

        def dialog_updates(optimizer: str, shown: dict, memory: dict) -> dict:
            out = {box: parameter_box_update(name, optimizer, shown.get(name))
                   for name, box in page.params.items()}
            out.update({page.opt_memory: memory, page.opt_current: optimizer,
                        dialog_title: f"### {optimizer} parameters",
                        opt_parts["summary"]: optimizers.summary(optimizer, shown),
                        opt_parts["hint"]: optimizers.hint(optimizer)})
            return out

        def switch_optimizer(data: dict) -> dict:
            new = data[fields[OPTIMIZER_KEY]]
            current = data[page.opt_current]
            if new == current:
                return {}
            current_values = page.optimizer_values(data, current)
            memory, shown = optimizers.switch(data[page.opt_memory], current, current_values,
                                              new)
            return dialog_updates(new, shown, memory)

        fields[OPTIMIZER_KEY].input(
            partial(switch_optimizer, dialog_outputs),
            inputs={fields[OPTIMIZER_KEY], page.opt_current, page.opt_memory, *params},
            outputs=dialog_outputs, api_name="switch_optimizer", show_progress="hidden")

        opt_parts["more"].click(lambda: gr.update(visible=True), None, dialog,
                                api_name="open_optimizer_dialog", queue=False)
        close_btn.click(lambda: gr.update(visible=False), None, dialog,
                        api_name="close_optimizer_dialog", queue=False)

        def restore_defaults(data: dict) -> dict:
            optimizer = data[page.opt_current]
            memory = {k: v for k, v in (data[page.opt_memory] or {}).items() if k != optimizer}
            return dialog_updates(optimizer, optimizers.default_parameters(optimizer), memory)

        restore_btn.click(partial(restore_defaults, dialog_outputs),
                          inputs={page.opt_current, page.opt_memory}, outputs=dialog_outputs,
                          api_name="restore_optimizer_defaults")

        def resummarize(data: dict) -> str:
            optimizer = data[page.opt_current]
            return optimizers.summary(optimizer, page.optimizer_values(data, optimizer))

        gr.on([box.change for box in params], resummarize,
              inputs={page.opt_current, *params}, outputs=opt_parts["summary"],
              api_name="optimizer_summary", show_progress="hidden", trigger_mode="always_last")

        # Filling the whole page from a config (presets, import)
        fill_outputs = (list(fields.values()) + list(page.tables.values())
                        + dialog_outputs + [lr_parts["plot"], lr_parts["caption"],
                                            timestep_parts["plot"], timestep_parts["caption"],
                                            concepts_info, report])

        def fill(config: TrainConfig, memory: dict, message: str, access=None) -> dict:
            """The page's values for `config`; `access` (the visitor's) decides which concept
            folders the summary and the LR preview may count."""
            new_values = F.config_to_values(config)
            data = config.model_dump(mode="json")
            memory = memory or dict(config.optimizer_defaults or {})
            optimizer = config.optimizer.optimizer.value
            out = {fields[k]: page_value(F.SPECS[k], new_values[k]) for k in fields}
            out.update({table: tables.to_frame(F.LISTS[k].item, data[k])
                        for k, table in page.tables.items()})
            out.update(dialog_updates(optimizer, shown_optimizer_values(config, memory),
                                      memory))
            frame, caption = lr_preview.curve_frame(config, SESSION.allow_custom_code, access)
            out.update({lr_parts["plot"]: frame, lr_parts["caption"]: caption,
                        concepts_info: concepts_summary(config.concepts, access),
                        report: message})
            frame, caption = timestep_preview.histogram_frame(config, access)
            # (its axis title follows the model type's change event)
            out.update({timestep_parts["plot"]: frame, timestep_parts["caption"]: caption})
            return out

        def load_preset(data: dict, request: gr.Request) -> dict:
            choice = data[preset_dd]
            access = access_of(request)
            try:
                preset = presets.read_preset(choice, access)
                config, memory, messages = presets.merge_preset(preset, page.lists(data))
            except AtelierError as error:
                gr.Warning(str(error))
                return {report: f"⚠ {error}"}
            label = dict((v, l) for l, v in presets.choices(access)).get(choice, choice)
            text = f"Loaded preset **{label}**."
            if messages:
                text += "\n" + "\n".join(f"- {m}" for m in presets.summarize(messages))
            return fill(config, memory, text, access)

        load_btn.click(partial(load_preset, fill_outputs, with_request=True),
                       inputs=page.inputs() | {preset_dd},
                       outputs=fill_outputs, api_name="load_preset")

        def import_file(data: dict, request: gr.Request) -> dict:
            uploads = data[import_btn]
            if not uploads:
                return {}
            uploads = uploads if isinstance(uploads, list) else [uploads]
            files = [u if isinstance(u, str) else getattr(u, "name", str(u)) for u in uploads]
            try:
                config, memory, messages, kind, path = presets.import_files(
                    files, page.lists(data))
            except AtelierError as error:
                gr.Warning(str(error))
                return {report: f"⚠ Import failed: {error}"}
            text = f"Imported a {kind} config from **{html.escape(Path(path).name)}**."
            if messages:
                text += (f" {len(messages)} note(s):\n"
                         + "\n".join(f"- {m}" for m in presets.summarize(messages)))
                gr.Warning(f"Import: {len(messages)} key(s) ignored or reset; see the report "
                           "under the top bar.")
            return fill(config, memory, text, access_of(request))

        import_btn.upload(partial(import_file, fill_outputs, with_request=True),
                          inputs=page.inputs() | {import_btn},
                          outputs=fill_outputs, api_name="import_config")

        def save_preset(data: dict, request: gr.Request) -> dict:
            access = access_of(request)
            try:
                config, memory = page.config(data)
                value, path = presets.save_user_preset(data[preset_name], config, memory,
                                                       access)
            except AtelierError as error:
                gr.Warning(str(error))
                return {report: f"⚠ {error}"}
            shown = path.name if OPTIONS.shared else str(path)  # no server paths for visitors
            return {preset_dd: gr.update(choices=presets.choices(access), value=value),
                    report: f"Saved preset **{value.split(':', 1)[1]}** to `{shown}`."}

        save_btn.click(partial(save_preset, [preset_dd, report], with_request=True),
                       inputs=page.inputs() | {preset_name}, outputs=[preset_dd, report],
                       api_name="save_preset")

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

        export_btn.click(partial(export_config, [export_file, report]), inputs=page.inputs(),
                         outputs=[export_file, report], api_name="export_config")

        # Start / Stop / Sample now / Save now
        def start(data: dict, request: gr.Request) -> str:
            try:
                config, _ = page.config(data)
                check_supported(config)
                check_paths(config)
                job, position = start_training(config, viewer(request))
            except AtelierError as error:
                gr.Warning(str(error))
                return error_html(str(error))
            except Exception as error:  # a bug: the trace goes to the server log only
                log.exception("Start failed")
                # a local page is its owner's, who may read the raw error; a visitor of a
                # shared server reads one sentence
                text = ("Could not start: an unexpected error on the server (its log says "
                        "why)." if OPTIONS.shared
                        else f"Could not start: {type(error).__name__}: {error}")
                gr.Warning(text)
                return error_html(text)
            if position == 0:
                return ok_html(f"Started job {job.id}.")
            return ok_html(f"Queued as job {job.id}, position {position} in the queue; it "
                           "starts when the jobs before it end (see Jobs).")

        start_btn.click(start, inputs=page.inputs(), outputs=notice, api_name="start_from_page")

        def stop(request: gr.Request) -> str:
            if not SESSION.stop(viewer(request)):
                return ok_html("No training job of yours is running.")
            return ok_html("Stopping after the current step; the model is saved then.")

        stop_btn.click(stop, None, notice, api_name="stop")

        def command(name: str, done: str):
            def run(request: gr.Request) -> str:
                try:
                    SESSION.request(name, viewer(request))
                except AtelierError as error:
                    gr.Warning(str(error))
                    return error_html(str(error))
                return ok_html(done)
            run.__name__ = f"{name}_now"
            return run

        gr.on([sample_btn.click, sample_now_2.click],
              command("sample", "A sample will be drawn after the current step."),
              None, notice, api_name="sample_now")
        save_now_btn.click(command("save", "The model will be saved after the current step."),
                           None, notice, api_name="save_now")
        backup_now_btn.click(command("backup", "A backup will be written after the current "
                                               "step."), None, notice, api_name="backup_now")

        # Polling the server's job
        poll_outputs = [epoch_bar, step_bar, status, warnings_md, loss_plot, lr_live, gallery,
                        download, start_btn, stop_btn, sample_btn, backup_now_btn, save_now_btn,
                        seen, *grid.outputs]

        def poll(last: footer.Snapshot | None, request: gr.Request) -> list:
            out = follow(last, access_of(request))
            return [out.get(component, gr.skip()) for component in poll_outputs]

        def follow(last: footer.Snapshot | None, access) -> dict:
            """The footer of the visitor's followed job (its newest running one); its files
            those the visitor may read."""
            state = SESSION.state(access.viewer)
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
                # Start stays usable while a job runs: it queues the next one.
                out.update({start_btn: gr.update(interactive=True),
                            stop_btn: gr.update(interactive=state.status == "running"),
                            sample_btn: gr.update(interactive=running),
                            backup_now_btn: gr.update(interactive=running),
                            save_now_btn: gr.update(interactive=running)})
            if snap.plots_due(last):
                out.update({loss_plot: footer.loss_frame(state), lr_live: footer.lr_frame(state)})
            if first or last.samples != snap.samples:
                out[gallery] = footer.gallery_items(state, access)
                out.update(grid.poll(state, access))
            if first or last.output != snap.output or last.status != snap.status:
                files = footer.download_files(state, access)
                out[download] = gr.update(value=files, visible=bool(files))
            return out

        timer.tick(poll, seen, poll_outputs, api_name="poll",
                   show_progress="hidden", concurrency_limit=None)
        demo.load(poll, seen, poll_outputs, api_name="attach", show_progress="hidden")

        def show_running_job(request: gr.Request) -> dict:
            """A page opened (or reloaded) while a job runs shows that job's settings."""
            who = viewer(request)
            config = SESSION.job_config(who)
            if config is None or not SESSION.state(who).running:
                return complete({}, fill_outputs)
            return complete(fill(config, None, "Showing the settings of the running job."),
                            fill_outputs)

        demo.load(show_running_job, None, fill_outputs, api_name="attach_settings",
                  show_progress="hidden")
        def refresh_presets(request: gr.Request):
            return gr.update(choices=presets.choices(access_of(request)))

        demo.load(refresh_presets, None, preset_dd, api_name="refresh_presets",
                  show_progress="hidden")
        # Try it's and Publish's lists on a shared server: the visitor's own files, once
        # the page knows who it is (never in the page's config, which every visitor
        # fetches). A local page keeps the lists it was built with, as before.
        if OPTIONS.shared:
            for (fn, outputs), name in ((try_on_load, "try_attach"),
                                        (publish_on_load, "publish_attach")):
                demo.load(fn, None, outputs, api_name=name, show_progress="hidden")

        # The visitor's own datasets, once the page knows who it is (and, without a login,
        # those made since the server started: the page's first list is drawn at start).
        demo.load(*datasets_on_load, api_name="datasets_attach", show_progress="hidden")

        # The Jobs panel: its list when the page opens, and "Load these settings".
        demo.load(jobs.refresh, jobs.refresh_inputs, jobs.refresh_outputs,
                  api_name="jobs_attach", show_progress="hidden")
        demo.load(*compare.on_load, api_name="compare_attach", show_progress="hidden")

        def load_job_settings(selected, request: gr.Request) -> dict:
            try:
                job = SESSION.get(jobs_panel.job_number(selected), viewer(request))
                config = config_from_dict(job.config, warn=lambda message: None)
            except (AtelierError, TypeError, ValueError) as error:
                text = str(error) if isinstance(error, AtelierError) else "Choose a job first."
                return complete({jobs.message: error_html(text)}, fill_outputs + [jobs.message])
            out = fill(config, None, f"Loaded the settings of job {job.id}.")
            out[jobs.message] = ok_html(f"Loaded the settings of job {job.id} into the page.")
            return complete(out, fill_outputs + [jobs.message])

        jobs.load.click(load_job_settings, jobs.choice, fill_outputs + [jobs.message],
                        api_name="jobs_load_settings")

        # For programs (gradio_client): JSON in, JSON out.
        api.register()

    demo.page = page  # for tests: the key -> component maps
    demo.dataset = dataset_section  # for tests: the dataset browser's components
    return demo
