"""OneTrainer's config names, both generations, turned into Atelier's before validation.

OneTrainer renamed keys and values over time (its config `__version` 10 is the newest; see
docs/notes/onetrainer-configs.md). A config may come from either generation, from the CLI's
`--config`/`--preset`, the page's Import or the HTTP API: all of them pass through
`translate` (via `config_from_dict`). What names the same thing Atelier does is renamed; what
Atelier cannot honour is refused here with the key, the value and what Atelier supports, never
replaced by a default (a job-defining setting) or dropped without a word (a tuning one).
"""
from __future__ import annotations

import copy
from typing import Any

from trainer.errors import ConfigError

# Output formats by OneTrainer's current names -> what Atelier writes for them. Atelier's LoRA
# file is the kohya layout (OneTrainer's KOHYA_LORA; LEGACY_LORA is the same bytes for SD 1.5
# and SDXL), its fine-tune file the original single-file checkpoint (ORIGINAL_SINGLE_FILE).
LORA_FORMATS = {"KOHYA_LORA": "SAFETENSORS", "LEGACY_LORA": "SAFETENSORS"}
FULL_FORMATS = {"ORIGINAL_SINGLE_FILE": "SAFETENSORS"}
ATELIER_FORMATS = ("SAFETENSORS", "DIFFUSERS")
PARTS = ("unet", "text_encoder", "text_encoder_2")
LAYER_PRESETS = ("attn-only", "attn-mlp", "full")
# OneTrainer filters UNet layers by name ('attentions' / 'attn' anywhere in it) and never
# filters its text-encoder LoRA; Atelier's presets name the layers of both.
LAYER_DIFFERENCES = {
    "attn-mlp": "OneTrainer's also adapts the transformer blocks' proj_in and proj_out",
    "attn-only": "OneTrainer's text-encoder LoRA also adapts the MLP layers (fc1, fc2)",
}


def translate(data: dict) -> tuple[dict, list[str]]:
    """(the config in Atelier's names, notes for the user). Idempotent on Atelier configs."""
    data = copy.deepcopy(data)
    notes: list[str] = []
    if isinstance(data.get("resolution"), int):  # the oldest configs wrote 512, not "512"
        data["resolution"] = str(data["resolution"])
    _output_format(data)
    _layer_filter(data, notes)
    _weight_dtypes(data, notes)
    return data, notes


def _output_format(data: dict) -> None:
    value = data.get("output_model_format")
    if not isinstance(value, str) or value in ATELIER_FORMATS:
        return
    method = data.get("training_method", "LORA")
    known = LORA_FORMATS if method == "LORA" else FULL_FORMATS
    if value in known:
        data["output_model_format"] = known[value]
        return
    supported = ", ".join([*known, *(["DIFFUSERS"] if method != "LORA" else [])])
    raise ConfigError(
        f"output_model_format: {value} is not a format Atelier writes for training_method "
        f"{method}; it writes {supported} (SAFETENSORS, its older name, too).")


def _layer_filter(data: dict, notes: list[str]) -> None:
    """OneTrainer's current `layer_filter_preset` (older: `lora_layer_preset`, kept by
    Atelier) and the custom `layer_filter` string."""
    preset = data.pop("layer_filter_preset", None)
    custom = data.pop("layer_filter", None)
    regex = data.pop("layer_filter_regex", None)
    if preset is not None:
        if preset not in LAYER_PRESETS:
            raise ConfigError(
                f"layer_filter_preset: {preset!r} is not supported; Atelier trains the "
                f"presets {', '.join(LAYER_PRESETS)} (a custom layer_filter is not supported "
                "yet).")
        data.setdefault("lora_layer_preset", preset)
        if preset in LAYER_DIFFERENCES:
            notes.append(f"layer_filter_preset {preset}: read as Atelier's lora_layer_preset "
                         f"{preset}, whose layers differ a little from OneTrainer's: "
                         f"{LAYER_DIFFERENCES[preset]}.")
    if custom and str(custom).strip() and preset in (None, "custom"):
        raise ConfigError(
            f"layer_filter: a custom filter ({custom!r}{', regex' if regex else ''}) is not "
            f"supported yet; use layer_filter_preset {', '.join(LAYER_PRESETS)}.")


def _weight_dtypes(data: dict, notes: list[str]) -> None:
    """OneTrainer keeps a `weight_dtype` per part (older configs had one at the top, as
    Atelier does). Atelier stores every frozen part in one type and the VAE in float32."""
    found: dict[str, Any] = {}
    for part in (*PARTS, "vae"):
        section = data.get(part)
        if isinstance(section, dict) and "weight_dtype" in section:
            found[part] = section.pop("weight_dtype")
            if part == "vae" and not section:
                data.pop("vae")
    if not found:
        return
    parts = {k: v for k, v in found.items() if k != "vae"}
    if "weight_dtype" not in data and parts:
        # the UNet's: most of the weights, and what decides the memory
        data["weight_dtype"] = parts.get("unet", next(iter(parts.values())))
    chosen = data.get("weight_dtype", "FLOAT_32")
    differing = {k: v for k, v in parts.items() if v != chosen}
    if differing:
        listed = ", ".join(f"{k}.weight_dtype {v}" for k, v in differing.items())
        notes.append(f"{listed}: Atelier stores every frozen part as weight_dtype {chosen} "
                     "(one type for all parts).")
    if found.get("vae", "FLOAT_32") != "FLOAT_32":
        notes.append(f"vae.weight_dtype {found['vae']}: the VAE stays FLOAT_32 in Atelier "
                     "(it only encodes the images, once when latents are cached).")
