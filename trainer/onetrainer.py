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
import typing

from pydantic import BaseModel

from trainer.config import OUTPUT_FORMATS, TrainConfig
from trainer.errors import ConfigError

# Output formats by OneTrainer's current names: Atelier writes each of them as itself for SD 1.5
# and SDXL (trainer/config.py OUTPUT_FORMATS). Its older name SAFETENSORS meant the kohya LoRA
# for a LoRA and the original single file for a fine-tune, and still names the embedding file
# (EMBEDDING's only format); Atelier's own presets and saved configs used it too.
LORA_FORMATS = tuple(OUTPUT_FORMATS["LORA"])
FULL_FORMATS = tuple(OUTPUT_FORMATS["FINE_TUNE"])
OLDER_FORMAT_NAMES = {"SAFETENSORS": {"LORA": "KOHYA_LORA", "FINE_TUNE": "ORIGINAL_SINGLE_FILE"}}
# OneTrainer's formats for other model families (Flux, SD3, ...), and CKPT (a pickled
# checkpoint it no longer writes either): nothing Atelier writes for SD 1.5 / SDXL.
UNWRITTEN_FORMATS = {"ORIGINAL_LORA": "OneTrainer writes it for other model families",
                     "ORIGINAL_TRANSFORMER": "OneTrainer writes it for other model families",
                     "COMFY_TRANSFORMER": "OneTrainer writes it for other model families",
                     "CKPT": "a pickled checkpoint, which OneTrainer no longer writes either"}
PARTS = ("unet", "text_encoder", "text_encoder_2")
LAYER_PRESETS = ("attn-only", "attn-mlp", "full", "custom")
# OneTrainer's presets as the layer_filter its page fills in for them (trainer/lora.py
# matches both the same way).
PRESET_FILTERS = {"attn-only": "attn", "attn-mlp": "attentions", "full": ""}


def translate(data: dict) -> tuple[dict, list[str]]:
    """(the config in Atelier's names, notes for the user). Idempotent on Atelier configs."""
    data = copy.deepcopy(data)
    notes: list[str] = []
    if isinstance(data.get("resolution"), int):  # the oldest configs wrote 512, not "512"
        data["resolution"] = str(data["resolution"])
    _unset_values(data, TrainConfig)
    _output_format(data)
    _layer_filter(data, notes)
    _weight_dtypes(data)
    _not_yet_trained(data)
    _main_embedding(data)
    _dora_axis(data, notes)
    _checkpointing(data)
    return data, notes


def _checkpointing(data: dict) -> None:
    """OneTrainer's `gradient_checkpointing` enum: ON/OFF are the bool; CPU_OFFLOADED is
    checkpointing with its layers streamed from the CPU, which `layer_offload_fraction` says
    here (as it does there: the fraction picks how much is streamed)."""
    if data.get("gradient_checkpointing") == "CPU_OFFLOADED":
        data["gradient_checkpointing"] = True


def _dora_axis(data: dict, notes: list[str]) -> None:
    """OneTrainer normalises DoRA per input channel unless `lora_decompose_output_axis`;
    Atelier's DoRA is peft's, always per output channel (trainer/lora.py). Said, not refused:
    both are DoRA, trained and loaded the same way, with a magnitude on another axis. Only
    for OneTrainer's configs (its `__version`, or its axis key): Atelier's own mean peft's."""
    from_onetrainer = "__version" in data or "lora_decompose_output_axis" in data
    if (from_onetrainer and data.get("lora_decompose") is True
            and not data.get("lora_decompose_output_axis")):
        notes.append("lora_decompose: Atelier's DoRA (peft's) learns a magnitude per output "
                     "channel; OneTrainer's default is per input channel "
                     "(lora_decompose_output_axis false).")


# OneTrainer keys that change what is trained, with the value that means what Atelier does.
# Any other value stops the import: dropping the key as "unknown" would train something else.
# (`peft_type` LORA/LOHA/LOKR, `lora_decompose` and the embedding keys are Atelier fields of
# the same names.)
SAME_AS_ATELIER: dict[str, tuple] = {}


def _main_embedding(data: dict) -> None:
    """OneTrainer trains its `embedding` (the main one) only with EMBEDDING, together with the
    additional ones (its all_embedding_configs()); Atelier lists every embedding in
    `additional_embeddings`, the main one first (the file at the output path). Outside
    EMBEDDING OneTrainer ignores `embedding`: it is left to be reported as unknown."""
    main = data.get("embedding")
    if data.get("training_method") != "EMBEDDING" or not isinstance(main, dict):
        return
    data.pop("embedding")
    others = data.get("additional_embeddings") or []
    data["additional_embeddings"] = [main, *others]


def _not_yet_trained(data: dict) -> None:
    for key, (same, reason) in SAME_AS_ATELIER.items():
        if key not in data:
            continue
        value = data.pop(key)
        if value != same and value is not None:
            raise ConfigError(f"{key}: {value!r} cannot be trained: {reason}; remove the key "
                              f"or set it to {same!r}.")


def _unset_values(data: dict, model: type[BaseModel]) -> None:
    """OneTrainer saves an unset value as null (`concepts` kept in their own file, a part's
    `stop_training_after`); where Atelier's field takes no null it is left out, so the default
    applies. A part with no stop count never stops."""
    for key, value in list(data.items()):
        field = model.model_fields.get(key)
        if field is None:
            continue
        if value is None and type(None) not in typing.get_args(field.annotation):
            del data[key]
            if key == "stop_training_after":
                data["stop_training_after_unit"] = "NEVER"
        elif isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(
                field.annotation, BaseModel):
            _unset_values(value, field.annotation)


def _output_format(data: dict) -> None:
    """The older name SAFETENSORS -> the method's current one; a format only other model
    families have is refused by name. Whether a format fits the training method is
    check_supported's question (trainer/config.py), asked where every config is run."""
    value = data.get("output_model_format")
    if not isinstance(value, str):
        return
    method = data.get("training_method", "LORA")
    if value in OLDER_FORMAT_NAMES and method in OLDER_FORMAT_NAMES[value]:
        data["output_model_format"] = OLDER_FORMAT_NAMES[value][method]
    elif value in UNWRITTEN_FORMATS:
        fitting = OUTPUT_FORMATS.get(method, [*LORA_FORMATS, *FULL_FORMATS])
        raise ConfigError(
            f"output_model_format: {value} is not a format Atelier writes for SD 1.5 or SDXL "
            f"({UNWRITTEN_FORMATS[value]}); for training_method {method} it writes "
            f"{', '.join(fitting)}.")


def _layer_filter(data: dict, notes: list[str]) -> None:
    """OneTrainer's layer filter, both generations: `layer_filter_preset` / `layer_filter` /
    `layer_filter_regex` (older: `lora_layer_preset` / `lora_layers` / `lora_layers_regex`).
    Training in OneTrainer reads the filter; its page fills the filter in from the preset, and
    a partial preset carries only the preset. So a named preset is used as such, unless the
    config also holds a different filter, which is then what OneTrainer trained with."""
    for old, new in (("lora_layers", "layer_filter"), ("lora_layers_regex", "layer_filter_regex")):
        if old in data:
            data.setdefault(new, data.pop(old))
    key = "layer_filter_preset" if "layer_filter_preset" in data else "lora_layer_preset"
    preset = data.pop("layer_filter_preset", None)
    if preset is not None:
        data.setdefault("lora_layer_preset", preset)
    preset = data.get("lora_layer_preset")
    if preset is None:
        return
    if preset not in LAYER_PRESETS:
        raise ConfigError(f"{key}: {preset!r} is not a layer preset; Atelier has "
                          f"{', '.join(LAYER_PRESETS)} (custom = the layer_filter).")
    custom = str(data.get("layer_filter") or "").strip()
    if preset != "custom" and custom and custom != PRESET_FILTERS[preset]:
        data["lora_layer_preset"] = "custom"
        notes.append(f"layer_filter_preset {preset} with layer_filter {custom!r}: OneTrainer "
                     "trains the filter, so the layers are custom with that filter.")


def _weight_dtypes(data: dict) -> None:
    """A `weight_dtype` per part (OneTrainer's current shape, and Atelier's). The older
    generation had one at the top (and before it `unet_weight_dtype`, ...): each part without
    its own takes it, as OneTrainer's config migration 9 does; NONE means the same."""
    top = data.pop("weight_dtype", None)
    for part in (*PARTS, "vae"):
        flat = data.pop(f"{part}_weight_dtype", None)
        section = data.get(part)
        if section is None and (flat or (top and part != "vae")):
            section = data[part] = {}
        if not isinstance(section, dict):
            continue
        if flat and section.get("weight_dtype") in (None, "NONE"):
            section["weight_dtype"] = flat
        if section.get("weight_dtype") in (None, "NONE"):
            section.pop("weight_dtype", None)
            if top and part != "vae":  # the VAE always had its own, float32 by default
                section["weight_dtype"] = top
    vae = data.get("vae")
    if isinstance(vae, dict):
        name = vae.pop("model_name", None)  # OneTrainer's current place for the VAE override
        if name and not data.get("vae_model_name"):
            data["vae_model_name"] = name
