"""Gradio components drawn from field specs: one per config key, labelled, with its tooltip
(`info=`) and range, under an element id derived from the key (tests and CSS use it)."""
from __future__ import annotations

import math
import re
from typing import Any

import gradio as gr
import gradio.component_meta as _component_meta
import pandas as pd

from ui import fields as F
from ui import optimizers, tables

FIELDS_PER_ROW = 3


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def field_elem_id(key: str) -> str:
    return "field-" + slug(key)


# Gradio writes a .pyi stub beside the source of every Component subclass it sees defined;
# a page has no use for one, so that step is skipped while ConfigNumber is defined.
_write_stub = _component_meta.create_or_modify_pyi
_component_meta.create_or_modify_pyi = lambda *args, **kwargs: None

# "Label (key)" of each config number, by element id. Kept here, not on the component: when an
# event updates a component (gr.update), Gradio rebuilds it for that browser session from its
# constructor arguments only, so an attribute set after construction would be lost there.
FIELD_NAMES: dict[str, str] = {}

try:
    class ConfigNumber(gr.Number):
        """gr.Number whose range error names the field (Gradio's own says only 'Value -1 is
        less than minimum value 0')."""

        is_template = True  # drawn by the frontend's Number
        # No __init__ of its own: Gradio reads the properties from the __init__ signature.

        def field_name(self) -> str:
            return FIELD_NAMES.get(self.elem_id or "", str(self.label or "This field"))

        def preprocess(self, payload: float | None) -> float | int | None:
            if payload is None:
                return None
            if self.minimum is not None and payload < self.minimum:
                raise gr.Error(f"{self.field_name()}: {payload:g} is below the minimum "
                               f"{self.minimum:g}.")
            if self.maximum is not None and payload > self.maximum:
                raise gr.Error(f"{self.field_name()}: {payload:g} is above the maximum "
                               f"{self.maximum:g}.")
            return self.round_to_precision(payload, self.precision)
finally:
    _component_meta.create_or_modify_pyi = _write_stub


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
        return 10 ** math.floor(math.log10(abs(default)))
    return 1


def page_value(spec: F.FieldSpec, value: Any) -> Any:
    """A config value as its component holds it (optional numbers are text: '' = not set)."""
    if spec.kind in ("int", "float") and spec.optional:
        return F.display_number(value)
    if spec.kind == "str" and value is None:
        return ""
    return value


def make_component(spec: F.FieldSpec, value: Any, visible: bool = True,
                   **layout: Any) -> gr.Component:
    common = dict(label=spec.label, info=tooltip(spec), elem_id=field_elem_id(spec.key),
                  interactive=True, visible=visible, min_width=200)
    common.update(layout)
    value = page_value(spec, value)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "enum":
        return gr.Dropdown(choices=spec.choice_pairs(), value=value, **common)
    if spec.kind in ("int", "float") and not spec.optional:
        number = ConfigNumber(value=value, minimum=spec.minimum, maximum=spec.maximum,
                              precision=0 if spec.kind == "int" else None, step=_step(spec),
                              **common)
        FIELD_NAMES[number.elem_id] = f"{spec.label} ({spec.key})"
        return number
    # Text, and numbers that may be empty (a number box cannot be empty).
    return gr.Textbox(value=value, max_lines=1, **common)


def draw_fields(keys: list[str], values: dict, choices: dict, into: dict) -> None:
    """Fields in rows of FIELDS_PER_ROW, each stored in `into` under its key."""
    for start in range(0, len(keys), FIELDS_PER_ROW):
        with gr.Row():
            for key in keys[start:start + FIELDS_PER_ROW]:
                spec = F.SPECS[key]
                into[key] = make_component(spec, values.get(key), F.applies(spec, choices))


def draw_table(spec: F.ListSpec, items: list, visible: bool) -> tuple[gr.Dataframe, gr.Button]:
    """A list of sub-models as an editable table, with an "Add" button and column help."""
    with gr.Group(visible=visible) as group:
        table = gr.Dataframe(
            value=tables.to_frame(spec.item, items), headers=tables.column_labels(spec.item),
            datatype=tables.datatypes(spec.item), interactive=True, label=spec.label,
            elem_id=f"table-{slug(spec.key)}", max_height=300, wrap=True,
            column_widths=tables.column_widths(spec.item, spec.required))
        with gr.Row():
            add = gr.Button("Add row", size="sm", elem_id=f"add-{slug(spec.key)}", scale=0,
                            min_width=110)
            gr.Markdown(spec.info, elem_classes=["table-info"])
        with gr.Accordion(f"{spec.label}: columns", open=False):
            gr.Markdown(tables.column_help(spec.item))
    table.group = group
    return table, add


def add_row(frame: Any, item_model) -> pd.DataFrame:
    """The table with one more row of the sub-model's defaults."""
    row = tables.to_frame(item_model, [item_model().model_dump(mode="json")])
    if frame is None or len(frame) == 0:
        return row
    row.columns = frame.columns
    return pd.concat([frame, row], ignore_index=True)


# --- The optimizer dialog's boxes -------------------------------------------------------------

def make_parameter_box(name: str, optimizer: str, value: Any) -> gr.Component:
    """One box of the "⋯" dialog, showing the current optimizer's version of the parameter."""
    params = {p.name: p for p in optimizers.schema(optimizer)}
    param = params.get(name)
    label = param.label if param else name
    info = optimizers.tooltip(param) if param else ""
    common = dict(label=label, info=info, elem_id=field_elem_id(f"optimizer.{name}"),
                  visible=param is not None, interactive=True, min_width=200)
    if optimizers.param_kind(name) == "bool":
        return gr.Checkbox(value=bool(value), **common)
    return gr.Textbox(value=optimizers.display(value), max_lines=1, **common)


def parameter_box_update(name: str, optimizer: str, value: Any) -> dict:
    params = {p.name: p for p in optimizers.schema(optimizer)}
    param = params.get(name)
    if param is None:
        return gr.update(visible=False)
    shown = value if optimizers.param_kind(name) == "bool" else optimizers.display(value)
    return gr.update(visible=True, label=param.label, info=optimizers.tooltip(param),
                     value=bool(shown) if optimizers.param_kind(name) == "bool" else shown)
