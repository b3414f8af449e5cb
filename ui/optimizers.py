"""The optimizer "⋯" dialog's data: each optimizer's parameters (the engine's schemas in
trainer/optim/registry.py: name, type, default, range, tooltip), their values as the dialog
shows them, and the edits a user made per optimizer (`optimizer_defaults`, OneTrainer's key,
saved in presets and exports).

The dialog holds one box per parameter name of any optimizer; switching the optimizer shows
the boxes of its schema (with that schema's label, tooltip and default) and hides the rest.
Numbers are text boxes: a parameter may be empty (Prodigy's beta3 = sqrt(beta2)) or infinite
(Prodigy's growth rate), which a number box cannot show.
"""
from __future__ import annotations

import copy
import math
from typing import Any

from trainer.config import Optimizer
from trainer.optim.registry import ADAPTIVE, SCHEMAS, Param, optimizer_schema
from ui import fields
from ui.fields import display_number, parse_number

OPTIMIZER_KEY = "optimizer.optimizer"

HINTS = {
    "PRODIGY": "**Prodigy finds its own step size**: set every learning rate to **1**, use a "
               "CONSTANT or COSINE schedule and a small batch (~4). Samples change only after "
               "40–80 epochs.",
    "ADAFACTOR": "With **relative step** on, Adafactor sets its own learning rate: choose the "
                 "ADAFACTOR schedule then.",
}


def hint(optimizer: str) -> str:
    text = HINTS.get(optimizer, "")
    if not text and Optimizer(optimizer) in ADAPTIVE:
        text = "This optimizer finds its own step size: set the learning rates to 1."
    return text


def parameter_names() -> list[str]:
    """Every parameter name of any optimizer, in schema order (one dialog box each)."""
    names: list[str] = []
    for params in SCHEMAS.values():
        for param in params:
            if param.name not in names:
                names.append(param.name)
    return names


def schema(optimizer: str) -> list[Param]:
    return optimizer_schema(optimizer)


def param_kind(name: str) -> str:
    """'bool' when the name is a switch in every schema, else 'number' (a text box)."""
    kinds = {p.kind for params in SCHEMAS.values() for p in params if p.name == name}
    return "bool" if kinds == {"bool"} else "number"


def range_text(param: Param) -> str:
    return fields.range_text(param.minimum, param.maximum, exclusive_max=param.below_maximum)


def tooltip(param: Param) -> str:
    if param.kind == "bool":  # display(False) is "": a switch's default reads on / off
        default = "on" if param.default else "off"
    else:
        default = display(param.default) or "empty"
    text = f"{param.tooltip} Default {default}."
    if range_text(param):
        text += f" Range: {range_text(param)}."
    return text


def display(value: Any) -> Any:
    """A parameter value as its dialog box shows it (text for numbers, bool for switches)."""
    if isinstance(value, bool):
        return value
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return display_number(value)
    return value


def parse(param: Param | None, value: Any) -> Any:
    """A dialog box's value -> the config's (text -> number; empty -> None = the default)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        return parse_number(value, "int" if param is not None and param.kind == "int"
                            else "float")
    return value


def default_parameters(optimizer: str) -> dict[str, Any]:
    """`{name: default}` of the optimizer's schema."""
    return {p.name: p.default for p in schema(optimizer)}


def values_for(optimizer: str, remembered: dict[str, dict] | None,
               explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the dialog shows for `optimizer`: its defaults, under the remembered edits, under
    values set explicitly (a loaded config's `optimizer` section; None = not set)."""
    values = default_parameters(optimizer)
    for source in ((remembered or {}).get(optimizer, {}), explicit or {}):
        values.update({k: v for k, v in source.items() if k in values and v is not None})
    return values


def switch(remembered: dict[str, dict], current: str, current_values: dict[str, Any],
           new: str) -> tuple[dict[str, dict], dict[str, Any]]:
    """Leave `current` (remember its values), enter `new` (its remembered values, else its
    defaults). Returns (remembered, values for `new`)."""
    remembered = copy.deepcopy(remembered or {})
    if current:
        names = {p.name for p in schema(current)}
        remembered[current] = {k: v for k, v in current_values.items() if k in names}
    return remembered, values_for(new, remembered)


def section(optimizer: str, values: dict[str, Any]) -> dict[str, Any]:
    """The config's `optimizer` section: the chosen optimizer and its schema's values."""
    names = {p.name for p in schema(optimizer)}
    return {"optimizer": optimizer, **{k: v for k, v in values.items() if k in names}}


def summary(optimizer: str, values: dict[str, Any]) -> str:
    shown = []
    for param in schema(optimizer):
        value = values.get(param.name)
        text = ("on" if value else "off") if isinstance(value, bool) else (display(value) or
                                                                            "default")
        shown.append(f"{param.label.lower()} {text}")
    return f"**{optimizer}** — " + ", ".join(shown)
