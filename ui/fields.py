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
from trainer.models import registry

# The documented order of the sections (SPEC §1). A section the config gains later and that is
# not named here is drawn after these, so new fields are never lost from the page.
MODEL_SECTION = "Model"
TRAINING_SECTIONS = [
    "Optimizer",
    "Learning-rate scheduler",
    "Main settings",
    "Text encoder",
    "Text encoder 2",
    "Text encoder 3",
    "UNet",
    "Transformer",
    "Masked training",
    "Train data type",
    "Epochs / batch size",
    "EMA",
    "Noise and loss",
    "LoRA",
    "Embeddings",
]
# Sections the page draws itself, outside the Training accordions (SPEC §1: Model, Data,
# then Training, then Sampling, then Backup and save).
BACKUP_SECTION = "Backup and save"
OWN_PLACE_SECTIONS = {MODEL_SECTION, "Data", "Sampling", BACKUP_SECTION}



def _part_sections() -> dict[str, str]:
    """{section: model part} of each part's own section ("Text encoder 2": text_encoder_2)."""
    found = {}
    for part in registry.ALL_PARTS:
        section_model = TrainConfig.model_fields[part].annotation
        extra = section_model.model_fields["train"].json_schema_extra
        found[extra["section"]] = part
    return found


# Each model part's section, shown for the families that have the part (the registry's
# parts): UNet for SD 1.5 / SDXL, Transformer for Flux.1, Chroma, SD 3; each text encoder
# where the family has it.
PART_SECTIONS = _part_sections()
SECTION_APPLIES_TO: dict[str, dict[str, list[str]]] = {
    section: {"model_type": registry.types_with_part(part)}
    for section, part in PART_SECTIONS.items()}


# Friendlier names for a few enum values in dropdowns (the value stays the config's); a model
# type not named here shows its family's label.
CHOICE_LABELS = {
    **{model_type: facts.label for model_type, facts in registry.FAMILIES.items()},
    "STABLE_DIFFUSION_15": "SD 1.5",
    "STABLE_DIFFUSION_XL_10_BASE": "SDXL 1.0",
    "STABLE_DIFFUSION_15_INPAINTING": "SD 1.5 inpainting",
    "STABLE_DIFFUSION_XL_10_BASE_INPAINTING": "SDXL 1.0 inpainting",
    "LORA": "LoRA",
    "FINE_TUNE": "Fine-tune",
    "EMBEDDING": "Textual inversion",
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
    # An enum's values by another field's value ({"training_method": {"LORA": [...]}}).
    choices_for: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The last part of the key ("beta1" for "optimizer.beta1")."""
        return self.key.rsplit(".", 1)[-1]

    def choice_pairs(self) -> list[tuple[str, str]]:
        """Dropdown choices as (label, value)."""
        return [(CHOICE_LABELS.get(c, c), c) for c in self.choices]

    def range_text(self) -> str:
        return range_text(self.minimum, self.maximum, exclusive_min=self.exclusive_min,
                          exclusive_max=self.exclusive_max)


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


@dataclass
class ListSpec:
    """A list of sub-models (concepts, sample prompts, custom scheduler arguments): a table."""
    key: str
    label: str
    info: str
    section: str
    item: type[BaseModel]
    applies_to: dict[str, list[str]] = field(default_factory=dict)

    @property
    def required(self) -> str:
        """The column that makes a row count (a row with it empty is the editor's blank row):
        the item's first text field."""
        for name, info in self.item.model_fields.items():
            if info.annotation is str:
                return name
        return next(iter(self.item.model_fields))


def _list_item(annotation: Any) -> type[BaseModel] | None:
    if typing.get_origin(annotation) is list:
        args = typing.get_args(annotation)
        if args and _is_model(args[0]):
            return args[0]
    return None


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
            spec.choices_for = dict(extra.get("choices_for") or {})
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


def list_specs() -> list[ListSpec]:
    """The config's lists of sub-models, drawn as tables in their sections."""
    specs = []
    for name, info in TrainConfig.model_fields.items():
        item = _list_item(info.annotation)
        if item is None:
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        specs.append(ListSpec(key=name, label=info.title or name, info=info.description or "",
                              section=extra.get("section", "Other"), item=item,
                              applies_to=dict(extra.get("applies_to") or {})))
    return specs


SPECS: dict[str, FieldSpec] = {spec.key: spec for spec in field_specs()}
LISTS: dict[str, ListSpec] = {spec.key: spec for spec in list_specs()}


def controlling_keys() -> list[str]:
    """Fields whose value decides where other fields apply (model type, method, scheduler...)."""
    keys: list[str] = []
    rules = [s.applies_to for s in SPECS.values()] + [s.applies_to for s in LISTS.values()]
    rules += [s.choices_for for s in SPECS.values()]
    rules += list(SECTION_APPLIES_TO.values())
    for rule in rules:
        for key in rule:
            if key not in keys and key in SPECS:
                keys.append(key)
    return keys


def sections() -> list[str]:
    """Training sections in the documented order, then any section the config gained since."""
    present = []
    for spec in [*SPECS.values(), *LISTS.values()]:
        if spec.section not in present:
            present.append(spec.section)
    known = [s for s in TRAINING_SECTIONS if s in present]
    extra = [s for s in present if s not in TRAINING_SECTIONS and s not in OWN_PLACE_SECTIONS]
    return known + extra


def keys_in_section(section: str) -> list[str]:
    return [key for key, spec in SPECS.items() if spec.section == section]


def applies(spec: FieldSpec | ListSpec | str, choices: dict[str, Any]) -> bool:
    """Whether a field applies to the chosen model type / training method (etc.)."""
    if isinstance(spec, str):
        spec = SPECS[spec] if spec in SPECS else LISTS[spec]
    for key, allowed in spec.applies_to.items():
        value = choices.get(key)
        value = value.value if isinstance(value, Enum) else value
        if value is not None and value not in allowed:
            return False
    return True


def fitting_choices(spec: FieldSpec, choices: dict[str, Any]) -> list[str] | None:
    """The values of `spec` that fit the chosen settings: those that every controlling
    setting's value allows, in the order of the first (whose first is the default). A
    controlling setting that does not apply itself (peft_type under Fine-tune) limits nothing.
    None: nothing limits it."""
    allowed: list[str] | None = None
    for key, by_value in spec.choices_for.items():
        if key in SPECS and not applies(key, choices):
            continue
        chosen = choices.get(key)
        listed = by_value.get(chosen.value if isinstance(chosen, Enum) else chosen)
        if listed is not None:
            allowed = list(listed) if allowed is None else [v for v in allowed if v in listed]
    return allowed


def fitting_choice(spec: FieldSpec, value: Any, choices: dict[str, Any]) -> Any:
    """`value` if it fits the chosen model type / training method / adapter type (etc.),
    else the first value that does: switching to Fine-tune turns a LoRA output format into
    the fine-tune's default, and choosing LoHa turns DIFFUSERS_LORA (no LoHa layout) into
    KOHYA_LORA, instead of leaving a combination that Start would refuse."""
    allowed = fitting_choices(spec, choices)
    if allowed and value not in allowed:
        return allowed[0]
    return value


def section_applies(section: str, choices: dict[str, Any]) -> bool:
    """A section is shown when at least one of its fields applies."""
    rule = SECTION_APPLIES_TO.get(section)
    if rule and not applies(FieldSpec("", "", "", section, "str", None, applies_to=rule),
                            choices):
        return False
    specs = [SPECS[key] for key in keys_in_section(section)]
    specs += [spec for spec in LISTS.values() if spec.section == section]
    return any(applies(spec, choices) for spec in specs)


# The text-encoder parts any family has (the registry's part names), in the page's order.
ENCODER_PARTS = tuple(p for p in registry.ALL_PARTS if p.startswith("text_encoder"))


def encoder_kinds(model_type: Any) -> dict[str, str]:
    """{text encoder part: "CLIP-L", "T5", ...} of a model type; {} for an unknown one."""
    model_type = model_type.value if isinstance(model_type, Enum) else model_type
    if model_type not in registry.FAMILIES:
        return {}
    return registry.text_encoder_kinds(model_type)


def section_label(section: str, model_type: Any) -> str:
    """A text encoder's section says which encoder it is for the family: "Text encoder
    (CLIP)" in SD 1.5, "Text encoder 1 (CLIP-L)" and "Text encoder 2 (T5)" in Flux.1."""
    model_type = model_type.value if isinstance(model_type, Enum) else model_type
    part = PART_SECTIONS.get(section, "")
    if model_type not in registry.FAMILIES or not part.startswith("text_encoder"):
        return section
    kinds = registry.text_encoder_kinds(model_type)
    if part not in kinds:
        return section
    name = "Text encoder 1" if section == "Text encoder" and len(kinds) > 1 else section
    return f"{name} ({kinds[part]})"


# --- Values <-> config ------------------------------------------------------------------------

def parse_number(text: str, kind: str) -> Any:
    """'1e-4' -> 0.0001, '8' -> 8 (int fields), 'inf' -> inf; text that is no number is
    returned as it is, for the config model to refuse with the key named."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if kind == "int" and number.is_integer():
        return int(number)
    return number


def _number_out(spec: FieldSpec, value: Any) -> Any:
    """A page value -> what the config model expects (empty optional -> None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None if spec.optional else value
    if isinstance(value, str):
        return parse_number(value, spec.kind)
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
    # A part the family lacks is stored switched off (the config reads it so); its hidden
    # switch keeps the part's own default, so that choosing a family that has it starts there.
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type in registry.FAMILIES:
        for part in registry.ALL_PARTS:
            key = f"{part}.train"
            if part not in registry.facts(model_type).parts and key in SPECS:
                values[key] = SPECS[key].default
    return values


def display_number(value: Any) -> str:
    """An optional number as the text its box shows ('' when not set)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value)) if abs(value) >= 1 else repr(value)
    return repr(value) if isinstance(value, float) else str(value)


def defaults() -> dict[str, Any]:
    return config_to_values(TrainConfig())


def round_trip(values: dict[str, Any]) -> TrainConfig:
    """Page values -> a validated config (raises ConfigError naming the key)."""
    return config_from_dict(values_to_dict(values), warn=lambda message: None)


def range_text(minimum: float | None, maximum: float | None, *, exclusive_min: bool = False,
               exclusive_max: bool = False) -> str:
    """'≥ 0, < 1' for a field's or an optimizer parameter's range (shown in its tooltip)."""
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if exclusive_min else '≥'} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if exclusive_max else '≤'} {maximum:g}")
    return ", ".join(parts)
