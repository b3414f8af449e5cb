"""The timestep-distribution preview: the histogram of the timesteps the current settings draw,
at the run's first target size, drawn beside the settings before training starts.

The numbers are the engine's (trainer/flow_matching.py `timestep_histogram`, the same draw the
training step makes, from a fixed seed so the picture holds still while fields change); this
module only decides what to ask it and says the result in words.

What it asks, as the engine's objectives do:
- SD 1.5 / SDXL draw discrete timesteps with the distribution and `timestep_shift`; dynamic
  shifting does not apply to them.
- The flow-matching families (registry facts: `flow_matching`) shift by the image's token count
  when `dynamic_timestep_shifting` is on and the family reads that switch (the registry's
  facts; OneTrainer: Flux.1 only), otherwise by `timestep_shift`. The scheduler
  values come from the base model's own `scheduler/scheduler_config.json` when the base model
  is a local folder the visitor may read (the ownership rule, as the LR preview counts only
  readable folders), else Flux.1-dev's (the engine's defaults). A hub id is never looked up:
  the preview downloads nothing.
- The x axis is the timestep t; for the flow families σ = (t + 1)/N is named on it too.
"""
from __future__ import annotations

import json
import math
from numbers import Real
from typing import Any

import pandas as pd

from trainer.config import TrainConfig, parse_resolution
from trainer.errors import AtelierError, ConfigError
from trainer.flow_matching import effective_shift, image_seq_len, timestep_histogram
from trainer.models import registry
from trainer.ownership import Access
from trainer.security import names_local_path
from ui.files import readable

# The config keys the preview reads: a change in any of them redraws it.
KEYS = ("model_type", "base_model_name", "resolution", "timestep_distribution",
        "noising_weight", "noising_bias", "min_noising_strength", "max_noising_strength",
        "timestep_shift", "dynamic_timestep_shifting")

SAMPLES = 20000   # draws per preview: ~400 per bin of 50 (±5% noise), a few ms
# Every family here has 1000 (its scheduler's num_train_timesteps); the axis is drawn for it.
NUM_TRAIN_TIMESTEPS = 1000
BINS = 50
X, Y, COUNT = "timestep", "share of steps (%)", "steps"
DDPM_AXIS = "timestep"
DEFAULT_SCHEDULER = "Flux.1-dev's scheduler values"
OWN_SCHEDULER = "the base model's scheduler config"
MAX_SCHEDULER_BYTES = 64 * 1024   # a scheduler config is a few hundred bytes
# The scheduler keys the dynamic shift reads (numbers; the rest of the file is ignored).
NUMERIC_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")


def flow_axis() -> str:
    return f"timestep t (σ = (t+1)/{NUM_TRAIN_TIMESTEPS})"


def axis_title(model_type: Any) -> str:
    """The x axis' title for a model type: flow families name σ as well."""
    try:
        flow = registry.facts(model_type).flow_matching
    except ValueError:
        flow = False
    return flow_axis() if flow else DDPM_AXIS


def dynamic_applies(model_type: Any) -> bool:
    """Whether `dynamic_timestep_shifting` changes this family's draw, as its objective reads
    it (the registry's facts; OneTrainer: Flux.1 only)."""
    return registry.reads_switch(model_type, registry.DYNAMIC)


def read_scheduler_config(base_model_name: str,
                          access: Access | None = None) -> tuple[dict | None, str]:
    """(the scheduler values the dynamic shift reads, where they come from). A local diffusers
    folder the visitor may read gives its scheduler/scheduler_config.json; anything else (a
    hub id, a single file, a folder of someone else's, a missing or odd file) None: the
    engine's defaults, Flux.1-dev's."""
    value = (base_model_name or "").strip()
    try:
        if not value or not names_local_path(value):
            return None, DEFAULT_SCHEDULER
        folder = readable(value, "base_model_name", access)
        path = folder / "scheduler" / "scheduler_config.json"
        if not path.is_file() or path.stat().st_size > MAX_SCHEDULER_BYTES:
            return None, DEFAULT_SCHEDULER
        data = json.loads(path.read_text(encoding="utf-8"))
    except (AtelierError, OSError, ValueError):  # not ours to read, or not a JSON file
        return None, DEFAULT_SCHEDULER
    if not isinstance(data, dict):
        return None, DEFAULT_SCHEDULER
    values = {}
    for key in NUMERIC_KEYS:
        if key in data:
            number = data[key]
            if isinstance(number, bool) or not isinstance(number, Real) \
                    or not math.isfinite(number):
                return None, DEFAULT_SCHEDULER
            values[key] = number
    if isinstance(data.get("time_shift_type"), str):
        values["time_shift_type"] = data["time_shift_type"]
    return values, OWN_SCHEDULER


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({X: pd.Series([], dtype="float64"), Y: pd.Series([], dtype="float64"),
                         COUNT: pd.Series([], dtype="int64")})


def histogram_frame(config: TrainConfig, access: Access | None = None) -> tuple[pd.DataFrame, str]:
    """(a DataFrame of bin centre / share of steps in % / step count, a one-line caption).
    Settings the engine refuses give an empty frame and "No preview: <its sentence>".
    `access`: whose folders may be read for the scheduler config (None: the visitor of a
    server without a login)."""
    try:
        return _histogram_frame(config, access)
    except (AtelierError, ValueError, ArithmeticError) as error:
        return empty_frame(), f"No preview: {first_line(error)}"


def _histogram_frame(config: TrainConfig, access: Access | None) -> tuple[pd.DataFrame, str]:
    facts = registry.facts(config.model_type)
    try:
        size = parse_resolution(config.resolution)[0]
    except ValueError as error:
        raise ConfigError(f"{error}.") from None
    wanted = bool(config.dynamic_timestep_shifting) and facts.flow_matching
    dynamic = wanted and dynamic_applies(config.model_type)
    scheduler, source = None, ""
    if dynamic:
        scheduler, source = read_scheduler_config(config.base_model_name, access)
        if scheduler is None and facts.scheduler:  # the family's own standard values
            scheduler, source = dict(facts.scheduler), f"{facts.label}'s scheduler values"
    # What the engine's objective draws: the switch is read only where it applies.
    settings = config if dynamic == bool(config.dynamic_timestep_shifting) else \
        config.model_copy(update={"dynamic_timestep_shifting": dynamic})
    tokens = image_seq_len(size.height, size.width)
    shift = effective_shift(config.timestep_shift, dynamic, tokens, scheduler)
    edges, counts = timestep_histogram(settings, (size.height, size.width),
                                       scheduler_config=scheduler,
                                       num_train_timesteps=NUM_TRAIN_TIMESTEPS, bins=BINS,
                                       samples=SAMPLES)
    total = sum(counts)
    frame = pd.DataFrame({X: [(a + b) / 2 for a, b in zip(edges, edges[1:])],
                          Y: [100.0 * c / total for c in counts],
                          COUNT: counts})
    return frame, caption(config, facts, shift, dynamic, wanted, size, source, counts)


def caption(config: TrainConfig, facts, shift: float, dynamic: bool, wanted: bool, size,
            source: str, counts: list[int]) -> str:
    """"LOGIT_NORMAL, shift 3.16 (dynamic at 1024×1024, …): most steps at high noise"."""
    text = f"{config.timestep_distribution.value}, "
    text += "no shift" if shift == 1.0 and not dynamic else f"shift {shift:.3g}"
    if dynamic:
        text += f" (dynamic at {size.width}×{size.height}, {source})"
    elif wanted:
        text += f" ({facts.label} ignores dynamic timestep shifting)"
    return f"{text}: {describe(counts)}."


# Thirds of the timestep range, in words: a high timestep is a noisy image.
LEVELS = ("low", "mid", "high")


def describe(counts: list[int]) -> str:
    """Where the draws fall, in plain words, by thirds of the timestep range."""
    total = sum(counts) or 1
    n = len(counts)
    thirds = [sum(counts[i] for i in range(n) if part * n <= 3 * i < (part + 1) * n) / total
              for part in range(3)]
    ranked = sorted(range(3), key=lambda part: thirds[part], reverse=True)
    top, second, last = ranked
    if thirds[top] - thirds[last] < 0.08:
        return "steps spread evenly over every noise level"
    if thirds[top] >= 0.5:
        return f"most steps at {LEVELS[top]} noise"
    if thirds[top] - thirds[second] < 0.05:
        pair = sorted((top, second))
        return f"most steps at {LEVELS[pair[0]]} and {LEVELS[pair[1]]} noise"
    return f"steps lean toward {LEVELS[top]} noise"


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
