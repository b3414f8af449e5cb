"""The memory estimate beside the model settings: "needs about X GB of GPU memory; this GPU
has Y GB", and when it will not fit, which settings would make it fit.

The numbers are the engine's (trainer/memory_estimate.py); this module decides what may be
read and says the result in words. The model files are read only where the visitor may read
them (the ownership rule the LR and timestep previews follow): a local base model, VAE or
transformer file the visitor may not read gives "No estimate: <why>", never a look at the
file. A hub id is never downloaded: the local cache, or the family's standard sizes.
"""
from __future__ import annotations

import html
import logging

from trainer import memory_estimate
from trainer.config import TrainConfig
from trainer.errors import AtelierError
from trainer.ownership import Access
from trainer.security import names_local_path
from ui.files import readable

log = logging.getLogger(__name__)

# The config keys the estimate reads (a dotted key names a part's setting; a section name
# covers all its keys): a change in any of them redraws it.
KEYS = ("model_type", "training_method", "base_model_name", "vae_model_name", "resolution",
        "batch_size", "gradient_checkpointing", "layer_offload_fraction", "train_dtype",
        "fused_backward_pass", "latent_caching", "ema", "optimizer.optimizer",
        "peft_type", "lora_rank", "lora_decompose", "lora_layer_preset", "layer_filter",
        "layer_filter_regex", "lokr_decompose_factor", "text_encoder_sequence_length",
        "text_encoder_2_sequence_length", "text_encoder", "text_encoder_2", "text_encoder_3",
        "unet", "transformer", "vae", "quantization")

# The model sources a config names, by key (what the estimate reads files of).
SOURCES = ("base_model_name", "vae_model_name", "transformer.model_name")


def reads(key: str) -> bool:
    """Whether a change of config key `key` changes the estimate."""
    return key in KEYS or key.split(".", 1)[0] in KEYS


def _value(config: TrainConfig, key: str) -> str:
    node = config
    for name in key.split("."):
        node = getattr(node, name, "")
    return str(node or "").strip()


def check_sources(config: TrainConfig, access: Access | None) -> None:
    """ConfigError naming the key when a local model source is not the visitor's to read."""
    for key in SOURCES:
        value = _value(config, key)
        if value and names_local_path(value):
            readable(value, key, access)


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def estimate_markdown(config: TrainConfig, access: Access | None = None,
                      device_gb: float | None | str = "auto") -> str:
    """The panel's text for `config`: the fit sentence, the breakdown, the warning with its
    levers when it will not fit; "No estimate: <the config's sentence>" when it cannot be
    told."""
    try:
        check_sources(config, access)
        result = memory_estimate.estimate(config, device_gb=device_gb)
        warning = memory_estimate.warning_sentence(config, result)
    except (AtelierError, ValueError) as error:
        return no_estimate(first_line(error))
    except Exception as error:  # noqa: BLE001 - a library failure: said, logged, not shown raw
        log.exception("Memory estimate failed")
        return no_estimate(f"the estimate failed ({type(error).__name__}); Start will say more.")
    return render(result, warning)


def no_estimate(sentence: str) -> str:
    return f"<p id='memory-estimate-none'>No estimate: {html.escape(sentence)}</p>"


def render(result: memory_estimate.MemoryEstimate, warning: str | None) -> str:
    """The estimate as the page shows it (HTML inside a Markdown component)."""
    sentence = memory_estimate.fit_sentence(result)
    icon = "✅" if result.fits else ("⚠️" if result.fits is False else "ℹ️")
    lines = [f"<p id='memory-estimate-line'>{icon} <b>{html.escape(sentence)}</b></p>",
             f"<p class='memory-estimate-detail'>{html.escape(memory_estimate.breakdown(result))}"
             "</p>"]
    if warning:
        lines.append(f"<p id='memory-estimate-warning'>⚠️ {html.escape(warning)}</p>")
    for note in result.notes:
        lines.append(f"<p class='memory-estimate-note'><small>{html.escape(note)}</small></p>")
    return "\n".join(lines)
