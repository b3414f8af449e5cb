"""Page fields generated from the config model's metadata, keyed by config key.

Every scalar field of `TrainConfig` (nested sections included, as dotted keys such as
`optimizer.beta1` or `text_encoder.learning_rate`) becomes one `FieldSpec`: label, tooltip,
section, choices, range, whether it may be empty, and where it applies. The page draws a Gradio
component per spec and keeps them in a dict `key -> component`; values travel as dicts
`key -> value`. No field is listed by hand here, and nothing is wired by position: a field added
to the config model shows up in its section on the next start (kohya_ss lost settings for years
because a new field shifted every later positional input).

Lists of sub-models (`concepts`, `samples`) are not scalar fields: the page edits them as tables
(see ui/tables.py).
"""
from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterable

import annotated_types
from pydantic import BaseModel

from trainer.config import TrainConfig, config_from_dict
from trainer.errors import ConfigError

# The documented order of the sections (SPEC §1). A section the config gains later and that is
# not named here is drawn after these, so new fields are never lost from the page.
MODEL_SECTION = "Model"
TRAINING_SECTIONS = [
    "Optimizer",
    "Learning-rate scheduler",
    "Main settings",
    "Text encoder",
    "Text encoder 2",
    "UNet",
    "Masked training",
    "Train data type",
    "Epochs / batch size",
    "EMA",
    "Noise and loss",
    "LoRA",
]
# Sections the page draws itself, outside the Training accordions.
OWN_PLACE_SECTIONS = {MODEL_SECTION, "Data", "Sampling"}

SDXL = "STABLE_DIFFUSION_XL_10_BASE"
# Where a whole nested section applies, when its config field does not say it itself.
# SD 1.5 has one text encoder; the second exists only in SDXL.
SECTION_APPLIES_TO: dict[str, dict[str, list[str]]] = {
    "Text encoder 2": {"model_type": [SDXL]},
}


# Friendlier names for a few enum values in dropdowns (the value stays the config's).
CHOICE_LABELS = {
    "STABLE_DIFFUSION_15": "SD 1.5",
    "STABLE_DIFFUSION_XL_10_BASE": "SDXL 1.0",
    "LORA": "LoRA",
    "FINE_TUNE": "Fine-tune",
}


@dataclass
class FieldSpec:
    key: str                      # dotted config key: "learning_rate", "optimizer.beta1"
    label: str
    info: str
    section: str
    kind: str                     # "bool" | "enum" | "int" | "float" | "str"
    default: Any
    choices: list[str] = field(default_factory=list)
    minimum: float | None = None  # inclusive bound drawn on the component
    maximum: float | None = None
    exclusive_min: bool = False   # gt / lt: the bound itself is refused by the config model
    exclusive_max: bool = False
    optional: bool = False        # Optional[...]: empty means "not set"
    applies_to: dict[str, list[str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The last part of the key ("beta1" for "optimizer.beta1")."""
        return self.key.rsplit(".", 1)[-1]

    def choice_pairs(self) -> list[tuple[str, str]]:
        """Dropdown choices as (label, value)."""
        return [(CHOICE_LABELS.get(c, c), c) for c in self.choices]

    def range_text(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        low = "" if self.minimum is None else f"{'>' if self.exclusive_min else '≥'} {self.minimum:g}"
        high = "" if self.maximum is None else f"{'<' if self.exclusive_max else '≤'} {self.maximum:g}"
        return ", ".join(p for p in (low, high) if p)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0], True
    return annotation, False


def _kind(annotation: Any) -> str | None:
    if isinstance(annotation, type):
        if issubclass(annotation, Enum):
            return "enum"
        if annotation is bool:
            return "bool"
        if annotation is int:
            return "int"
        if annotation is float:
            return "float"
        if annotation is str:
            return "str"
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _merge_applies(outer: dict, inner: dict) -> dict:
    merged = {k: list(v) for k, v in outer.items()}
    for key, values in inner.items():
        merged[key] = [v for v in merged[key] if v in values] if key in merged else list(values)
    return merged


def _specs_of(model: type[BaseModel], prefix: str, applies: dict) -> Iterable[FieldSpec]:
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        annotation, optional = _unwrap_optional(info.annotation)
        field_applies = _merge_applies(applies, extra.get("applies_to") or {})
        if _is_model(annotation):
            yield from _specs_of(annotation, f"{prefix}{name}.", field_applies)
            continue
        kind = _kind(annotation)
        if kind is None:  # lists of sub-models: edited as tables
            continue
        section = extra.get("section", "Other")
        spec = FieldSpec(
            key=f"{prefix}{name}", label=info.title or name.replace("_", " ").capitalize(),
            info=info.description or "", section=section, kind=kind,
            default=info.get_default(call_default_factory=True), optional=optional,
            applies_to=_merge_applies(SECTION_APPLIES_TO.get(section, {}), field_applies))
        if kind == "enum":
            spec.choices = [member.value for member in annotation]
            if isinstance(spec.default, Enum):
                spec.default = spec.default.value
        for constraint in info.metadata:
            if isinstance(constraint, annotated_types.Ge):
                spec.minimum = constraint.ge
            elif isinstance(constraint, annotated_types.Gt):
                spec.minimum, spec.exclusive_min = constraint.gt, True
            elif isinstance(constraint, annotated_types.Le):
                spec.maximum = constraint.le
            elif isinstance(constraint, annotated_types.Lt):
                spec.maximum, spec.exclusive_max = constraint.lt, True
        yield spec


def field_specs() -> list[FieldSpec]:
    """Every scalar config field, in the model's declaration order."""
    return list(_specs_of(TrainConfig, "", {}))


SPECS: dict[str, FieldSpec] = {spec.key: spec for spec in field_specs()}


def sections() -> list[str]:
    """Training sections in the documented order, then any section the config gained since."""
    present = []
    for spec in SPECS.values():
        if spec.section not in present:
            present.append(spec.section)
    known = [s for s in TRAINING_SECTIONS if s in present]
    extra = [s for s in present if s not in TRAINING_SECTIONS and s not in OWN_PLACE_SECTIONS]
    return known + extra


def keys_in_section(section: str) -> list[str]:
    return [key for key, spec in SPECS.items() if spec.section == section]


def applies(spec: FieldSpec | str, choices: dict[str, Any]) -> bool:
    """Whether a field applies to the chosen model type / training method (etc.)."""
    spec = SPECS[spec] if isinstance(spec, str) else spec
    for key, allowed in spec.applies_to.items():
        value = choices.get(key)
        value = value.value if isinstance(value, Enum) else value
        if value is not None and value not in allowed:
            return False
    return True


def section_applies(section: str, choices: dict[str, Any]) -> bool:
    """A section is shown when at least one of its fields applies."""
    return any(applies(SPECS[key], choices) for key in keys_in_section(section))


def section_label(section: str, model_type: Any) -> str:
    """SD 1.5 has "Text encoder"; SDXL has "Text encoder 1" and "Text encoder 2"."""
    model_type = model_type.value if isinstance(model_type, Enum) else model_type
    if section == "Text encoder" and model_type == SDXL:
        return "Text encoder 1"
    return section


# --- Values <-> config ------------------------------------------------------------------------

def _number_out(spec: FieldSpec, value: Any) -> Any:
    """A page value -> what the config model expects (empty optional -> None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None if spec.optional else value
    if isinstance(value, float) and math.isnan(value):
        return None if spec.optional else value
    if spec.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def values_to_dict(values: dict[str, Any]) -> dict:
    """Flat `key -> page value` into the nested dict the config model reads."""
    data: dict = {}
    for key, value in values.items():
        spec = SPECS.get(key)
        if spec is None:
            continue
        if spec.kind in ("int", "float"):
            value = _number_out(spec, value)
            if (value is None or value == "") and not spec.optional:
                raise ConfigError(f"{spec.label} ({key}) is empty; it needs a number.")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def config_to_values(config: TrainConfig | dict) -> dict[str, Any]:
    """A config (model or dict of a full dump) -> flat `key -> page value` for every spec."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    values = {}
    for key, spec in SPECS.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return values


def defaults() -> dict[str, Any]:
    return config_to_values(TrainConfig())


def round_trip(values: dict[str, Any]) -> TrainConfig:
    """Page values -> a validated config (raises ConfigError naming the key)."""
    return config_from_dict(values_to_dict(values), warn=lambda message: None)
