"""Optimizers and their parameter schemas.

Each optimizer declares its parameters once here (name, type, default, range, tooltip). The
page's "⋯" dialog draws them from `optimizer_schema`, the engine validates the user's values
against them and builds the torch optimizer from the field's own libraries (torch,
bitsandbytes, prodigyopt, transformers).

In the config, `optimizer` holds the chosen optimizer and its edited values (a value left
empty = the schema default); `optimizer_defaults` remembers edits per optimizer so switching
away and back restores them (OneTrainer's layout).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from trainer.config import Optimizer
from trainer.errors import ConfigError


@dataclass(frozen=True)
class Param:
    name: str
    kind: str                   # "float" | "int" | "bool" | "optional_float"
    default: Any
    label: str
    tooltip: str
    minimum: float | None = None
    maximum: float | None = None
    below_maximum: bool = False  # the range is [minimum, maximum)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _betas(beta2: float = 0.999) -> list[Param]:
    return [Param("beta1", "float", 0.9, "Beta 1", "Decay of the running mean of gradients "
                  "(momentum).", 0, 1, True),
            Param("beta2", "float", beta2, "Beta 2", "Decay of the running mean of squared "
                  "gradients.", 0, 1, True)]


EPS = Param("eps", "float", 1e-8, "Epsilon", "Added to the denominator for numerical "
            "stability.", 0)


# OneTrainer's key; its default there is off for AdamW, on for Adafactor (and its own newer
# optimizers). Here it is off for all: the float32 master weights are the precise choice, and
# an imported OneTrainer config carries its value explicitly.
STOCHASTIC_ROUNDING = Param(
    "stochastic_rounding", "bool", False, "Stochastic rounding",
    "Fine-tune only, for parts whose weight data type is BFLOAT_16: train those bfloat16 "
    "weights in place, each update rounded up or down at random so that small updates still "
    "add up (OneTrainer's behaviour). Saves the float32 master copy: weights and gradients "
    "take 2 bytes each instead of 4, the optimizer's state stays float32 (bytes a weight: "
    "AdamW 12 instead of 16; Lion, SGD with momentum 8 instead of 12; Adafactor about 4 "
    "instead of 8). The cost: each update is exact only on average, which adds a little "
    "noise. Off: those parts train float32 master weights.")


def _weight_decay(default: float) -> Param:
    return Param("weight_decay", "float", default, "Weight decay", "Decoupled weight decay: "
                 "pulls weights towards zero each step.", 0)


SCHEMAS: dict[Optimizer, list[Param]] = {
    Optimizer.ADAMW: [*_betas(), EPS, _weight_decay(0.01), STOCHASTIC_ROUNDING],
    # bitsandbytes >= 0.45 always quantizes block-wise and dropped percentile clipping, so
    # those two OneTrainer knobs have nothing to set here.
    Optimizer.ADAMW_8BIT: [
        *_betas(), EPS, _weight_decay(0.01),
        Param("min_8bit_size", "int", 4096, "Min 8-bit size", "Tensors with fewer elements "
              "keep 32-bit optimizer state.", 1),
        STOCHASTIC_ROUNDING,
    ],
    Optimizer.PRODIGY: [
        *_betas(),
        Param("beta3", "optional_float", None, "Beta 3", "Decay of the step-size estimate; "
              "empty = sqrt(beta2).", 0, 1),
        EPS, _weight_decay(0.0),
        Param("decouple", "bool", True, "Decouple", "AdamW-style decoupled weight decay."),
        Param("use_bias_correction", "bool", False, "Bias correction", "Adam's bias "
              "correction of the moments."),
        Param("safeguard_warmup", "bool", False, "Safeguard warmup", "Keep the step-size "
              "estimate from growing during LR warmup."),
        Param("d0", "float", 1e-6, "d0", "Initial step-size estimate.", 0),
        Param("d_coef", "float", 1.0, "d coefficient", "Multiplies the estimated step size: "
              "below 1 = smaller steps.", 0),
        Param("growth_rate", "float", math.inf, "Growth rate", "Largest factor the step-size "
              "estimate may grow by per step (inf = unlimited).", 0),
    ],
    Optimizer.ADAFACTOR: [
        Param("eps", "float", 1e-30, "Epsilon 1", "Regularizes the squared-gradient "
              "statistics.", 0),
        Param("eps2", "float", 1e-3, "Epsilon 2", "Regularizes the parameter scale (used "
              "with relative step / scale parameter).", 0),
        Param("clip_threshold", "float", 1.0, "Clip threshold", "Threshold of the root-mean-"
              "square of the final update.", 0),
        Param("decay_rate", "float", -0.8, "Decay rate", "Exponent of the running average of "
              "squared gradients.", -1, 0),
        Param("beta1", "optional_float", None, "Beta 1", "Momentum; empty = none (saves "
              "memory).", 0, 1),
        _weight_decay(0.0),
        Param("scale_parameter", "bool", False, "Scale parameter", "Scale the LR by the root-"
              "mean-square of each parameter."),
        Param("relative_step", "bool", False, "Relative step", "Adafactor sets its own LR: "
              "then the scheduler must be ADAFACTOR."),
        Param("warmup_init", "bool", False, "Warmup init", "Time-dependent LR warmup (needs "
              "relative step)."),
        STOCHASTIC_ROUNDING,
    ],
    Optimizer.LION: [*_betas(beta2=0.99), _weight_decay(0.0), STOCHASTIC_ROUNDING],
    Optimizer.SGD: [
        Param("momentum", "float", 0.0, "Momentum", "Momentum factor (0 = plain SGD).", 0, 1),
        Param("nesterov", "bool", False, "Nesterov", "Nesterov momentum (needs momentum > 0)."),
        _weight_decay(0.0),
        STOCHASTIC_ROUNDING,
    ],
}

# Optimizers that find their own step size: every learning rate should be 1.
ADAPTIVE = {Optimizer.PRODIGY}


def optimizer_schema(optimizer: Optimizer | str) -> list[Param]:
    return SCHEMAS[Optimizer(optimizer)]


def all_parameter_names() -> set[str]:
    return {p.name for params in SCHEMAS.values() for p in params}


def _check(param: Param, value: Any) -> Any:
    key = f"optimizer.{param.name}"
    if value is None:
        if param.kind == "optional_float":
            return None
        raise ConfigError(f"{key}: a value is required")
    if param.kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false (got {value!r})")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: must be a number (got {value!r})")
    if param.kind == "int":
        if value != int(value):
            raise ConfigError(f"{key}: must be a whole number (got {value!r})")
        value = int(value)
    if math.isnan(value):
        raise ConfigError(f"{key}: must be a number (got NaN)")
    if param.minimum is not None and value < param.minimum:
        raise ConfigError(f"{key}: must be at least {param.minimum} (got {value})")
    if param.maximum is not None:
        if value > param.maximum or (param.below_maximum and value == param.maximum):
            bound = "below" if param.below_maximum else "at most"
            raise ConfigError(f"{key}: must be {bound} {param.maximum} (got {value})")
    return value


def resolve_parameters(optimizer: Optimizer, values: dict[str, Any]) -> dict[str, Any]:
    """The schema's defaults with the user's values over them, each checked, naming the
    parameter on error. Keys that belong to other optimizers are ignored (OneTrainer configs
    carry every optimizer's keys)."""
    resolved = {}
    for param in SCHEMAS[optimizer]:
        value = values.get(param.name)
        resolved[param.name] = _check(param, param.default if value is None else value)
    return resolved


def _adamw(groups, p):
    return torch.optim.AdamW(groups, betas=(p["beta1"], p["beta2"]), eps=p["eps"],
                             weight_decay=p["weight_decay"])


def _adamw_8bit(groups, p):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(groups, betas=(p["beta1"], p["beta2"]), eps=p["eps"],
                               weight_decay=p["weight_decay"], min_8bit_size=p["min_8bit_size"])


def _prodigy(groups, p):
    from prodigyopt import Prodigy
    return Prodigy(groups, betas=(p["beta1"], p["beta2"]), beta3=p["beta3"], eps=p["eps"],
                   weight_decay=p["weight_decay"], decouple=p["decouple"],
                   use_bias_correction=p["use_bias_correction"],
                   safeguard_warmup=p["safeguard_warmup"], d0=p["d0"], d_coef=p["d_coef"],
                   growth_rate=p["growth_rate"])


def _adafactor(groups, p):
    from transformers.optimization import Adafactor
    if p["relative_step"]:  # Adafactor computes the LR itself; it refuses one given to it
        groups = [{**g, "lr": None} for g in groups]
    return Adafactor(groups, eps=(p["eps"], p["eps2"]), clip_threshold=p["clip_threshold"],
                     decay_rate=p["decay_rate"], beta1=p["beta1"],
                     weight_decay=p["weight_decay"], scale_parameter=p["scale_parameter"],
                     relative_step=p["relative_step"], warmup_init=p["warmup_init"])


def _lion(groups, p):
    import bitsandbytes as bnb
    return bnb.optim.Lion(groups, betas=(p["beta1"], p["beta2"]),
                          weight_decay=p["weight_decay"], optim_bits=32)


def _sgd(groups, p):
    if p["nesterov"] and p["momentum"] <= 0:
        raise ConfigError("optimizer.nesterov: Nesterov momentum needs optimizer.momentum > 0")
    return torch.optim.SGD(groups, momentum=p["momentum"], nesterov=p["nesterov"],
                           weight_decay=p["weight_decay"])


BUILDERS: dict[Optimizer, Callable] = {
    Optimizer.ADAMW: _adamw, Optimizer.ADAMW_8BIT: _adamw_8bit, Optimizer.PRODIGY: _prodigy,
    Optimizer.ADAFACTOR: _adafactor, Optimizer.LION: _lion, Optimizer.SGD: _sgd,
}


def build_optimizer(optimizer: Optimizer, values: dict[str, Any],
                    param_groups: list[dict]) -> torch.optim.Optimizer:
    """`param_groups`: [{'params', 'lr', 'name'}, ...] - one per model part. With
    `stochastic_rounding` on, its bfloat16 parameters (a fine-tune's BFLOAT_16 parts:
    trainer/finetune.py) are updated with stochastic rounding."""
    resolved = resolve_parameters(optimizer, values)
    built = BUILDERS[optimizer](param_groups, resolved)
    bfloat16 = any(p.dtype == torch.bfloat16 for g in param_groups for p in g["params"])
    if bfloat16 and values.get("stochastic_rounding"):
        from trainer.optim import stochastic_rounding
        if optimizer not in stochastic_rounding.SUPPORTED:  # check_supported refused it first
            raise ConfigError(f"{stochastic_rounding.KEY} is not implemented for "
                              f"{optimizer.value}.")
        stochastic_rounding.install(built)
    return built


def effective_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The step size each group really takes: lr·d for Prodigy, Adafactor's own LR with
    relative_step, else the group's lr."""
    rates = {}
    for group in optimizer.param_groups:
        name = group.get("name", str(len(rates)))
        if "d" in group:  # Prodigy's estimated distance to the solution
            rates[name] = group["lr"] * group["d"]
        elif group.get("relative_step"):
            from transformers.optimization import Adafactor
            states = [optimizer.state[p] for p in group["params"] if optimizer.state.get(p)]
            rates[name] = Adafactor._get_lr(group, states[0]) if states else 0.0
        else:
            rates[name] = group["lr"]
    return rates


def switch_optimizer(section: dict[str, Any], remembered: dict[str, dict], new: str
                     ) -> tuple[dict[str, Any], dict[str, dict]]:
    """Switch the config's `optimizer` section to `new`, remembering the current optimizer's
    edits in `optimizer_defaults` and restoring `new`'s (OneTrainer's behaviour).

    Returns (new section, new optimizer_defaults); inputs are not modified."""
    current = section.get("optimizer", Optimizer.ADAMW.value)
    current = current.value if isinstance(current, Optimizer) else str(current)
    remembered = {**remembered, current: {k: v for k, v in section.items()
                                          if k != "optimizer" and v is not None}}
    new = Optimizer(new).value
    return {"optimizer": new, **remembered.get(new, {})}, remembered


def restore_defaults(section: dict[str, Any]) -> dict[str, Any]:
    """The section with every parameter back at the schema default (the dialog's button)."""
    name = Optimizer(section.get("optimizer", Optimizer.ADAMW.value))
    return {"optimizer": name.value, **{p.name: p.default for p in SCHEMAS[name]}}
