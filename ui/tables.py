"""Concepts and sample prompts as editable tables: rows <-> lists of config dicts.

The columns are the sub-models' fields (ConceptConfig, SampleConfig), read from the config model
like every other field, so a field added there becomes a column here.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any

import pandas as pd
from pydantic import BaseModel

from trainer.config import ConceptConfig, SampleConfig
from ui.fields import _kind, _unwrap_optional


def columns(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def column_labels(model: type[BaseModel]) -> list[str]:
    return [info.title or name for name, info in model.model_fields.items()]


def datatypes(model: type[BaseModel]) -> list[str]:
    out = []
    for info in model.model_fields.values():
        kind = _kind(_unwrap_optional(info.annotation)[0])
        out.append({"bool": "bool", "int": "number", "float": "number"}.get(kind, "str"))
    return out


def column_widths(model: type[BaseModel], wide: str) -> list[str]:
    """The `wide` column (a folder, a prompt) gets a share that leaves the others room for
    their longest word at 1440 px (a third with few columns, less with many); the rest
    share what is left."""
    names = columns(model)
    share = 34 if len(names) <= 8 else 14
    # each column by its title's longest word (titles break between words only); a check-box
    # column's title shares its cell with a select-all box
    weights = [max(6, *(len(word) for word in label.split()), _default_width(info))
               + (3 if kind == "bool" else 0)
               for label, kind, info in zip(column_labels(model), datatypes(model),
                                            model.model_fields.values())]
    total = sum(w for name, w in zip(names, weights) if name != wide) or 1.0
    return [f"{share}%" if name == wide else f"{(100 - share) * w / total:.1f}%"
            for name, w in zip(names, weights)]


def _default_width(info) -> int:
    """The length of a choice column's default value (STANDARD), 0 for other columns."""
    return len(info.default.value) if isinstance(info.default, Enum) else 0


def column_help(model: type[BaseModel]) -> str:
    """A line per column: its label and tooltip (Dataframe headers have no tooltips)."""
    lines = []
    for name, info in model.model_fields.items():
        choices = ""
        annotation = _unwrap_optional(info.annotation)[0]
        if isinstance(annotation, type) and issubclass(annotation, Enum):
            choices = " (" + " / ".join(m.value for m in annotation) + ")"
        lines.append(f"- **{info.title or name}**{choices}: {info.description or ''}")
    return "\n".join(lines)


def _cell(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    return "" if value is None else value


def to_frame(model: type[BaseModel], items: list[dict] | None) -> pd.DataFrame:
    """Config list -> table (missing keys take the sub-model's defaults)."""
    names = columns(model)
    rows = []
    for item in items or []:
        full = model.model_validate(item).model_dump(mode="json") if isinstance(item, dict) \
            else item.model_dump(mode="json")
        rows.append([_cell(full[n]) for n in names])
    frame = pd.DataFrame(rows, columns=column_labels(model))
    return frame


def _blank(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _as_number(value: Any, kind: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            return text  # left for the config model to refuse, with the key named
    if kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    return value


def _as_bool(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "1", "on", "x", "✓"):
            return True
        if text in ("false", "no", "0", "off", ""):
            return False
    if hasattr(value, "item"):
        value = value.item()
    return value


def from_frame(model: type[BaseModel], frame: Any, required: str) -> list[dict]:
    """Table -> config list. Rows whose `required` column is empty are dropped (the blank row
    a table editor keeps at the end); cells left empty take the sub-model's default."""
    if frame is None:
        return []
    if isinstance(frame, dict):  # the API's {"headers", "data"} form
        frame = pd.DataFrame(frame.get("data") or [], columns=frame.get("headers"))
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    names = columns(model)
    labels = column_labels(model)
    by_label = dict(zip(labels, names))
    kinds = {n: _kind(_unwrap_optional(model.model_fields[n].annotation)[0]) for n in names}
    items = []
    for _, row in frame.iterrows():
        item: dict[str, Any] = {}
        for column, value in row.items():
            name = by_label.get(column, column if column in names else None)
            if name is None or _blank(value):
                continue
            kind = kinds[name]
            if kind in ("int", "float"):
                value = _as_number(value, kind)
            elif kind == "bool":
                value = _as_bool(value)
            elif isinstance(value, str):
                value = value.strip()
            item[name] = value
        if item.get(required):
            items.append(item)
    return items


def concepts_frame(concepts: list[dict] | None) -> pd.DataFrame:
    return to_frame(ConceptConfig, concepts)


def concepts_from_frame(frame: Any) -> list[dict]:
    return from_frame(ConceptConfig, frame, required="path")


def samples_frame(samples: list[dict] | None) -> pd.DataFrame:
    return to_frame(SampleConfig, samples)


def samples_from_frame(frame: Any) -> list[dict]:
    return from_frame(SampleConfig, frame, required="prompt")


def count_images(folder: str, subfolders: bool = False) -> int | None:
    """Image files in `folder` (and its subfolders, not hidden ones, when asked; None when it
    is not a folder). Not decoded: this is for estimates (the LR preview, the concept
    summary); training checks every file. The engine's count (trainer/limits.py)."""
    from pathlib import Path

    from trainer.limits import count_images as engine_count
    return engine_count(folder, subfolders) if Path(folder).expanduser().is_dir() else None
