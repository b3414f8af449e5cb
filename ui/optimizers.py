"""The optimizer "⋯" dialog's data: each optimizer's parameters, their defaults, and the edits a
user made per optimizer (`optimizer_defaults`, OneTrainer's key, saved in presets and exports).

The parameters are the config's `optimizer.*` fields other than `optimizer.optimizer`; the
dialog shows the ones that apply to the chosen optimizer (a field's `applies_to` may name
`optimizer.optimizer` values). Defaults are the config field's default unless the engine's
optimizer registry gives a per-optimizer one; until it does, SPEC §2's documented defaults for
the fields that exist are used.
"""
from __future__ import annotations

import copy
from typing import Any

from ui.fields import SPECS, FieldSpec

OPTIMIZER_KEY = "optimizer.optimizer"

# SPEC §2 facts for the parameters the config has today (beta1, beta2, eps, weight_decay).
_SPEC_DEFAULTS: dict[str, dict[str, Any]] = {
    "ADAMW": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
    "ADAMW_8BIT": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01},
    "PRODIGY": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "ADAFACTOR": {"eps": 1e-30, "weight_decay": 0.0},
    "LION": {"beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0},
    "SGD": {"weight_decay": 0.0},
}

HINTS = {
    "PRODIGY": "Prodigy finds its own step size: set every learning rate to **1**, use a "
               "CONSTANT or COSINE schedule and a small batch (~4). Samples change only after "
               "40–80 epochs.",
    "ADAFACTOR": "With relative step on, Adafactor sets its own learning rate (scheduler "
                 "ADAFACTOR).",
}


def parameter_specs(optimizer: str | None = None) -> list[FieldSpec]:
    """The dialog's fields (all optimizers when `optimizer` is None)."""
    specs = [s for k, s in SPECS.items() if k.startswith("optimizer.") and k != OPTIMIZER_KEY]
    if optimizer is None:
        return specs
    return [s for s in specs if optimizer in s.applies_to.get(OPTIMIZER_KEY, [optimizer])]


def _engine_defaults(optimizer: str) -> dict[str, Any] | None:
    """Per-optimizer defaults from the engine's registry, when it has one."""
    try:
        from trainer.optim import registry  # type: ignore[attr-defined]
    except ImportError:
        return None
    getter = getattr(registry, "defaults", None)
    return dict(getter(optimizer)) if callable(getter) else None


def default_parameters(optimizer: str) -> dict[str, Any]:
    """`{name: default}` for the optimizer's parameters (names without the `optimizer.`)."""
    values = {spec.name: spec.default for spec in parameter_specs()}
    overrides = _engine_defaults(optimizer)
    if overrides is None:
        overrides = _SPEC_DEFAULTS.get(optimizer, {})
    values.update({k: v for k, v in overrides.items() if k in values})
    return values


def switch(remembered: dict[str, dict], current: str, current_values: dict[str, Any],
           new: str) -> tuple[dict[str, dict], dict[str, Any]]:
    """Leave `current` (remember its edited values), enter `new`: its remembered values if the
    user edited them before, else its defaults. Returns (remembered, values for `new`)."""
    remembered = copy.deepcopy(remembered or {})
    if current:
        remembered[current] = dict(current_values)
    values = default_parameters(new)
    values.update(remembered.get(new, {}))
    return remembered, values


def summary(optimizer: str, values: dict[str, Any]) -> str:
    shown = ", ".join(f"{SPECS['optimizer.' + k].label.lower()} {v:g}"
                      if isinstance(v, (int, float)) and not isinstance(v, bool)
                      else f"{k} {v}" for k, v in values.items()
                      if f"optimizer.{k}" in SPECS)
    return f"**{optimizer}** — {shown}" if shown else f"**{optimizer}**"
