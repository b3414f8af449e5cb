"""CUSTOM learning-rate schedules: a user-named scheduler class with key/value arguments.

Importing a named class runs that module's code, so it is allowed only where the server owner
allows custom code (the CLI, a local app); on a shared or public server it is refused.
"""
from __future__ import annotations

import ast
import importlib

import torch

from trainer.errors import ConfigError

KEY = "custom_learning_rate_scheduler"


def substitute(value: str, *, lr: float, epochs: int, steps_per_epoch: int,
               total_steps: int):
    """'%TOTAL_STEPS%' and friends replaced, then read as a Python literal when it is one
    (numbers, True/False, None, lists), else kept as text."""
    for name, number in (("%LR%", lr), ("%EPOCHS%", epochs),
                         ("%STEPS_PER_EPOCH%", steps_per_epoch), ("%TOTAL_STEPS%", total_steps)):
        value = value.replace(name, repr(number))
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def load_scheduler_class(name: str) -> type:
    module_name, _, class_name = name.strip().rpartition(".")
    if not module_name:
        raise ConfigError(f"{KEY}: give the class as module.Class (got '{name}')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"{KEY}: module '{module_name}' cannot be imported: {error}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"{KEY}: module '{module_name}' has no '{class_name}'")
    return cls


def build_custom_scheduler(config, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int,
                           total_steps: int, allow_custom_code: bool):
    if not allow_custom_code:
        raise ConfigError("learning_rate_scheduler CUSTOM runs code named in the config and is "
                          "disabled on this server (shared/public mode). Choose another "
                          "schedule, or run the app locally / use the CLI.")
    cls = load_scheduler_class(config.custom_learning_rate_scheduler)
    kwargs = {arg.key: substitute(arg.value, lr=config.learning_rate, epochs=config.epochs,
                                  steps_per_epoch=steps_per_epoch, total_steps=total_steps)
              for arg in config.scheduler_params if arg.key}
    try:
        return cls(optimizer, **kwargs)
    except Exception as error:  # the user's class and arguments: report, don't crash
        raise ConfigError(f"{KEY}: {config.custom_learning_rate_scheduler}"
                          f"({', '.join(kwargs)}) failed: {error}") from None
