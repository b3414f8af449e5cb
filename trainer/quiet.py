"""Library messages a user can do nothing about, dropped at the logger that emits them.

A plain run should print only what is ours: progress, warnings about the user's data and
settings, and errors. Each filter below matches one exact message of one library logger, so
anything else those loggers say (and every message of ours) still gets through.
"""
from __future__ import annotations

import functools
import logging
import re

# (logger name, message pattern, why it is noise)
LIBRARY_NOISE = (
    # transformers' image processors want torchvision for their default backend; without it
    # they use the PIL one, which is what Atelier wants (it never preprocesses through them).
    ("transformers.utils.import_utils",
     re.compile(r"requires torchvision \(not installed\); falling back to")),
    # diffusers warns on every `.to(dtype)` of a model even when the list of modules it worries
    # about is empty, as it is for the VAE and UNet of SD 1.5 and SDXL.
    ("diffusers.models.modeling_utils",
     re.compile(r"There are modules in \w+ that should be kept in float32: \[\]\.")),
    # bitsandbytes looks for an optional 4-bit CPU kernel from the hub at import; Atelier never
    # trains in 4 bits, and the package it names (`kernels`) must not be installed here.
    ("bitsandbytes.backends.cpu.ops",
     re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community")),
)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: re.Pattern) -> None:
        super().__init__()
        self.pattern = pattern
        self.atelier_noise = pattern.pattern  # how a second install recognises it

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def silence_library_noise() -> None:
    """Install the filters (idempotent). Safe before the libraries are imported: their
    loggers are the standard ones of the same names, and a filter set now stays on them."""
    for name, pattern in LIBRARY_NOISE:
        logger = logging.getLogger(name)
        # by pattern text: this module may be imported afresh (a test clearing sys.modules)
        # while the loggers, and the filters on them, live for the whole process
        if not any(getattr(f, "atelier_noise", None) == pattern.pattern
                   for f in logger.filters):
            logger.addFilter(_DropMessage(pattern))


@functools.cache  # once per process: the switches are process-wide
def hide_weight_loading_bars() -> None:
    """transformers draws a 'Loading weights' bar for every text encoder it loads (a blink on
    local files). Its switch turns the hub's download bars off too, and those tell a user
    waiting for a first download how far it is: they are switched back on, unless they were
    off already (HF_HUB_DISABLE_PROGRESS_BARS, or the user's own call). Call where
    transformers is imported already (it is heavy)."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    hub_bars_were_on = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if hub_bars_were_on:
        enable_progress_bars()
