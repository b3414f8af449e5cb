"""OneTrainer's config files, every generation, turned into Atelier's config before validation.

A config may come from OneTrainer's Save config (every key, `__version` 11 since 2026-07-03,
10 before, 6 in 2025 ...; concepts and samples in their own files), its Export (the same with
them packed in), one of its built-in presets (a partial config) or an older preset. It enters
through `translate` wherever it comes in: the CLI's `--config` / `--preset`, the page's Import,
the HTTP API (all via `config_from_dict`). The rules, in short:

- what Atelier has under another name is renamed (the README's OneTrainer section lists them);
- what OneTrainer counts differently is converted, with a note: its STEP units are batches,
  Atelier's optimizer updates; an older file's layer preset is what OneTrainer meant then;
- what Atelier cannot honour is refused with the key and its value, never replaced by a
  default or dropped as an unknown key (the quantized weight types Atelier does not build:
  W8A8, and GGUF with 8-bit activations; plain GGUF, a transformer read from its .gguf file,
  is Atelier's too);
- what has no effect on the run (parts and keys the model's family does not have, cloud,
  OneTrainer's app and logging, optimizers not chosen, ...) is set aside and counted by kind
  in one note (trainer/onetrainer_keys.py lists them). Which family has which parts and
  switches is trainer/models/registry.py's.

Atelier's own configs pass through unchanged apart from the few older names they once shared
with OneTrainer (`translate` is idempotent on them), and the quantized weight types Atelier does
not build are refused in them too.
"""
from __future__ import annotations

import copy
import json
import math
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from trainer import onetrainer_keys as keys
from trainer.config import (OUTPUT_FORMATS_ANY, T5_AS, LoraLayerPreset, Optimizer,
                            TrainConfig, output_formats)
from trainer.errors import ConfigError
from trainer.flow_matching import FLOW_LOSS_WEIGHTS
from trainer.models import registry

# Finds a file a OneTrainer config names (its concepts, samples, a concept's prompt file) among
# the files that came with it; None when it is not there.
Beside = Callable[[str], "Path | None"]

NEWEST_VERSION = 11
# Keys only OneTrainer writes: a saved config has all of them, an older partial preset its
# top-level weight_dtype, a current LoRA preset its layer_filter_preset.
MARKERS = ("__version", "concept_file_name", "sample_definition_file_name", "train_device",
           "cache_dir", "debug_mode", "layer_filter_preset", "weight_dtype", "lora_layers")
# An exported Atelier config says so; its presets have a name.
ATELIER_MARKS = ("__atelier", "__name")

# Output formats by OneTrainer's current names: Atelier writes each of them as itself where the
# family has it (trainer/config.py output_formats). The older name SAFETENSORS still names the
# embedding file (EMBEDDING's only format).
LORA_FORMATS = tuple(OUTPUT_FORMATS_ANY["LORA"])
FULL_FORMATS = tuple(OUTPUT_FORMATS_ANY["FINE_TUNE"])
# SAFETENSORS for a LoRA or a fine-tune: in a OneTrainer file, its migration 10 reads it as the
# LEGACY formats (the layout it wrote then); Atelier's own older configs meant the current name.
ONETRAINER_SAFETENSORS = {"LORA": "LEGACY_LORA", "FINE_TUNE": "LEGACY_SAFETENSORS"}
ATELIER_SAFETENSORS = {"LORA": "KOHYA_LORA", "FINE_TUNE": "ORIGINAL_SINGLE_FILE"}
# OneTrainer's formats that Atelier writes for no family, and CKPT (a pickled checkpoint it no
# longer writes either).
UNWRITTEN_FORMATS = {"ORIGINAL_LORA": "OneTrainer's original-namespace LoRA with fused qkv",
                     "ORIGINAL_TRANSFORMER": "OneTrainer's transformer-only single file",
                     "COMFY_TRANSFORMER": "OneTrainer's transformer-only single file for ComfyUI",
                     "CKPT": "a pickled checkpoint, which OneTrainer no longer writes either"}
# The model parts of every family (trainer/models/registry.py), and the three whose flat keys
# OneTrainer's migration 1 moved (2024-03: before the transformer families).
PARTS = registry.ALL_PARTS
FLAT_PARTS = ("unet", "text_encoder", "text_encoder_2")
LAYER_PRESETS = tuple(preset.value for preset in LoraLayerPreset)
# OneTrainer's loss weights that each objective takes here (MIN_SNR_GAMMA is min_snr_gamma).
FLOW_WEIGHTS = tuple(weight.value for weight in FLOW_LOSS_WEIGHTS)
DDPM_WEIGHTS = ("CONSTANT", "MIN_SNR_GAMMA")
# OneTrainer's quantized weight types that Atelier does not build (it builds FLOAT_8, INT_8 and
# NFLOAT_4: trainer/quantization.py, and reads GGUF transformer files), with what they are.
# Refused by key and value, never replaced.
UNBUILT_DTYPES = {
    "FLOAT_W8A8": "float8 weights with float8 activations, OneTrainer's own matmuls",
    "INT_W8A8": "int8 weights with int8 activations, OneTrainer's own matmuls",
    "FLOAT_W8A8_COMPRESSED": "float8 weights and activations, compressed with nvCOMP",
    "INT_W8A8_COMPRESSED": "int8 weights and activations, compressed with nvCOMP",
    "GGUF_A8_FLOAT": "weights from a GGUF file with float8 activations",
    "GGUF_A8_INT": "weights from a GGUF file with int8 activations",
}
# OneTrainer's QuantizationConfig defaults: its layer filter picks which of the denoiser's
# layers are quantized (text encoders and the VAE: all), and does nothing where it is not.
QUANTIZATION_DEFAULTS = {"layer_filter": "", "layer_filter_preset": "full",
                         "layer_filter_regex": False, "svd_dtype": "NONE", "svd_rank": 16,
                         "cache_dir": None}
# The types OneTrainer quantizes a denoiser to, applying its layer filter and SVDQuant (a GGUF
# transformer is packed as its file says: neither applies).
STORED_QUANTIZED = ("FLOAT_8", "INT_8", "NFLOAT_4")
# Of the T5 sequence lengths, OneTrainer reads only text_encoder_2's (Flux.1) for the families
# Atelier trains; Chroma's T5 takes its tokenizer's maximum whatever text_encoder_sequence_length
# says.
READ_SEQUENCE_LENGTHS = ("text_encoder_2_sequence_length",)
SEQUENCE_LENGTH_PART = {"text_encoder_sequence_length": "text_encoder",
                        "text_encoder_2_sequence_length": "text_encoder_2"}
LAYER_KEYS = ("layer_filter", "layer_filter_preset", "layer_filter_regex", "lora_layers",
              "lora_layer_preset", "lora_layers_regex")
PEFT_TYPES = ("LORA", "LOHA", "LOKR")
# Atelier's optimizers that OneTrainer runs with its fused back pass (Optimizer.
# supports_fused_back_pass), and those it rounds stochastically (create_optimizer patches only
# them); for the others it ignores the switch, which its files carry on for every optimizer.
FUSED_BACK_PASS = ("ADAMW", "ADAFACTOR")
STOCHASTIC_ROUNDING = ("ADAMW", "ADAFACTOR")


def is_onetrainer(data: Any) -> bool:
    """A file OneTrainer wrote (or one of its presets, older ones included)."""
    if not isinstance(data, dict) or any(key in data for key in ATELIER_MARKS):
        return False
    return any(key in data for key in MARKERS)


def files_beside(config_file: str | Path) -> Beside:
    """The files beside a config file on this machine: a name OneTrainer wrote relative to its
    own folder (training_concepts/concepts.json) is looked up under the config's folder, and
    by its file name in that folder; nothing outside that folder is read."""
    folder = Path(config_file).expanduser().resolve().parent

    def find(name: str) -> Path | None:
        for candidate in (folder / name, folder / Path(name).name):
            resolved = candidate.resolve()
            if folder in resolved.parents and resolved.is_file():
                return resolved
        return None
    return find


def translate(data: dict, beside: Beside | None = None, *,
              onetrainer: bool | None = None) -> tuple[dict, list[str]]:
    """(the config in Atelier's names, notes for the user). `beside` finds the files a Save
    config keeps apart (its concepts); `onetrainer` says whether the data is a OneTrainer
    file (None: `is_onetrainer`). Idempotent on Atelier configs."""
    data = copy.deepcopy(data)
    notes: list[str] = []
    if isinstance(data.get("resolution"), int):  # the oldest configs wrote 512, not "512"
        data["resolution"] = str(data["resolution"])
    _refuse_quantized_weights(data)
    if onetrainer if onetrainer is not None else is_onetrainer(data):
        _from_onetrainer(data, beside, notes)
    _unset_values(data, TrainConfig)
    _output_format(data)
    _layer_filter(data, notes)
    _weight_dtypes(data)
    _main_embedding(data)
    _checkpointing(data)
    return data, notes


def _from_onetrainer(data: dict, beside: Beside | None, notes: list[str]) -> None:
    """What only a OneTrainer file needs, in order: its older shapes first, then the refusals
    (before anything is renamed or set aside), the renames, the counts, and last what is set
    aside."""
    version = data.pop("__version", None)
    if isinstance(version, int) and version > NEWEST_VERSION:
        notes.append(f"__version {version}: newer than the newest OneTrainer config Atelier "
                     f"knows ({NEWEST_VERSION}); its new keys are reported as unknown.")
    _drop_versions(data)
    _older_shapes(data, version)
    _onetrainer_defaults(data)
    _older_layer_preset(data, notes)
    _refuse_what_is_not_honoured(data)
    aside: dict[str, list[str]] = {kind: [] for kind in keys.KINDS}
    _renamed(data, aside)
    _parts(data, aside)
    _compile_with_offloading(data, notes)
    _family_settings(data, aside, notes)
    _concepts(data, beside, aside, notes)
    _samples(data, beside, aside, notes)
    _optimizer(data, aside, notes)
    _adapter(data, notes)
    _steps_in_batches(data, notes)
    _time_units(data, notes)
    _older_format_names(data, version)
    _transformer_files(data, notes)
    _bundle_in_diffusers_file(data, notes)
    _dora_axis(data, notes)
    _masked_prior_preservation(data, notes)
    _not_done(data, notes)
    _set_aside(data, aside)
    summary = summarize_set_aside(aside)
    if summary:
        notes.append(summary)


# --- Older generations --------------------------------------------------------------------

def _drop_versions(node: Any) -> None:
    """Every nested config of a OneTrainer file carries its own `__version`."""
    if isinstance(node, dict):
        node.pop("__version", None)
        for value in node.values():
            _drop_versions(value)
    elif isinstance(node, list):
        for value in node:
            _drop_versions(value)


def _family(data: dict) -> registry.FamilyFacts | None:
    """The facts of the file's model type (OneTrainer's default SD 1.5 when it names none);
    None for one Atelier does not train (refused by name in `_refuse_what_is_not_honoured`)."""
    try:
        return registry.facts(data.get("model_type") or "STABLE_DIFFUSION_15")
    except ValueError:
        return None


def _onetrainer_defaults(data: dict) -> None:
    """OneTrainer's defaults where they differ from Atelier's, for the keys a partial file (a
    preset) leaves out: a fine-tune, samples every 10 minutes, no compiling, and every text
    encoder of the family trained (Atelier's second and third are off by default)."""
    data.setdefault("training_method", "FINE_TUNE")
    data.setdefault("sample_after_unit", "MINUTE")
    data.setdefault("compile", False)
    family = _family(data)
    for part in family.text_encoders[1:] if family else ():
        section = data.setdefault(part, {})
        if isinstance(section, dict):
            section.setdefault("train", True)


# OneTrainer's config migration 1 (2024-03): flat part keys -> the part's section.
FLAT_PART_KEYS = {f"{prefix}{part}{suffix}": (part, key)
                  for part in FLAT_PARTS
                  for prefix, suffix, key in (("train_", "", "train"),
                                              ("", "_learning_rate", "learning_rate"))}


def _older_shapes(data: dict, version: Any) -> None:
    """OneTrainer's own migrations 0-5, 8 and 10 where they move a key Atelier reads (the
    weight types' migration 9 is `_weight_dtypes`, for every config)."""
    if isinstance(data.get("optimizer"), str):  # migration 0: flat optimizer_* keys
        section = {"optimizer": data.pop("optimizer")}
        for key in [k for k in data if k.startswith("optimizer_") and k != "optimizer_defaults"]:
            section[key.removeprefix("optimizer_")] = data.pop(key)
        data["optimizer"] = section
    for flat, (part, key) in FLAT_PART_KEYS.items():  # migration 1
        if flat in data:
            data.setdefault(part, {}).setdefault(key, data.pop(flat))
    for part in FLAT_PARTS:
        epochs = data.pop(f"train_{part}_epochs", None)
        if epochs is not None:
            data.setdefault(part, {}).update(stop_training_after=epochs,
                                             stop_training_after_unit="EPOCH")
    _noising_before_distributions(data, version)
    for old, new in (("save_after", "save_every"), ("save_after_unit", "save_every_unit")):
        if old in data:  # migration 5
            data.setdefault(new, data.pop(old))
    # migration 10: __version 10's offloading lived at the top and applied only with
    # gradient_checkpointing CPU_OFFLOADED; each part's fraction is now its own
    if "enable_activation_offloading" in data or "enable_async_offloading" in data:
        if data.get("gradient_checkpointing") != "CPU_OFFLOADED":
            data["layer_offload_fraction"] = 0.0
        elif data.get("enable_activation_offloading", True):
            for part in ("unet", "transformer", "prior"):  # the denoiser's (prior: before 9)
                if isinstance(data.get(part), dict):
                    data[part].setdefault("activation_offloading", True)
    # migration 8 (__version 8 -> 9): the transformer families' denoiser was `prior`
    older = version is None or (isinstance(version, int) and version <= 8)
    if older and isinstance(data.get("prior"), dict) and "transformer" not in data:
        if _family(data) is not None and _family(data).denoiser == "transformer":
            data["transformer"] = data.pop("prior")
    if "embeddings" in data:  # __version 1-3's list, which OneTrainer ignores since 4
        data.setdefault("__set_aside", []).append(("embeddings", "method"))
        data.pop("embeddings")


def _noising_before_distributions(data: dict, version: Any) -> None:
    """OneTrainer's migration 3 (__version 3 -> 4): before timestep distributions, a noising
    weight other than 0 drew timesteps from a sigmoid, whose bias (default 0.5) was the
    centre; now SIGMOID with the bias counted from 0.5. A weight of 0 was uniform. A file
    without __version is taken as that old when it has no distribution and a weight (a
    current preset always names its distribution)."""
    if isinstance(version, int):
        if version >= 4:
            return
    elif "timestep_distribution" in data or not data.get("noising_weight"):
        return
    weight = data.pop("noising_weight", 0.0) or 0.0
    bias = data.pop("noising_bias", 0.5)
    if weight != 0:
        data.update(timestep_distribution="SIGMOID", noising_weight=weight,
                    noising_bias=(0.5 if bias is None else bias) - 0.5)
    else:
        data.update(timestep_distribution="UNIFORM", noising_weight=0.0, noising_bias=0.0)


def _older_layer_preset(data: dict, notes: list[str]) -> None:
    """A LoRA file with no layer key at all. For SD 1.5 / SDXL (whose current presets name
    their layers) that is OneTrainer's presets before 2025-12 and configs before 2024-08, which
    meant its hard-coded set then: `attentions` (its setup before the presets existed, its LoRA
    tab's first preset after). The transformer families' current presets (#flux LoRA, #sd 3
    LoRA) name none: OneTrainer's LoRA tab keeps its default, full, and so does Atelier.
    `lora_layer_preset: null` is OneTrainer's migration 6: full."""
    if data.get("training_method", "FINE_TUNE") != "LORA":
        return
    family = _family(data)
    if not any(key in data for key in LAYER_KEYS) and family and family.denoiser != "unet":
        data["lora_layer_preset"] = "full"
    elif not any(key in data for key in LAYER_KEYS):
        data["lora_layer_preset"] = "attn-mlp"
        notes.append("No layer preset in this OneTrainer file: it trained OneTrainer's "
                     "hard-coded layers of its time, 'attentions' (attn-mlp: every layer of "
                     "the UNet's transformer blocks), and so does Atelier.")
    elif "lora_layer_preset" in data and data["lora_layer_preset"] is None:
        data["lora_layer_preset"] = "full"


# --- Refusals -------------------------------------------------------------------------------

def refuse(key: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {value!r} cannot be trained here: {why}.")


def _refuse_what_is_not_honoured(data: dict) -> None:
    from trainer.config import ModelType, TrainingMethod
    for key, kind in (("model_type", ModelType), ("training_method", TrainingMethod)):
        value = data.get(key)
        if isinstance(value, str) and value not in kind.__members__:
            refuse(key, value, f"Atelier trains {', '.join(kind.__members__)}")
    for key, (neutral, why) in keys.NEUTRAL.items():
        if key in data and data[key] is not None and data[key] != neutral:
            refuse(key, data[key], f"{why}; remove the key or set it to {neutral!r}")
    peft = data.get("peft_type")
    if data.get("training_method") == "LORA" and peft is not None and peft not in PEFT_TYPES:
        refuse("peft_type", peft, f"Atelier's adapter types are {', '.join(PEFT_TYPES)}")
    family = _family(data)
    weight = data.get("loss_weight_fn")
    if family is not None and family.flow_matching and weight not in (None, *FLOW_WEIGHTS):
        refuse("loss_weight_fn", weight, f"{family.label} is a flow-matching model, which "
                                         "OneTrainer too weights by CONSTANT or SIGMA only")
    if family is not None and not family.flow_matching and weight not in (None, *DDPM_WEIGHTS):
        refuse("loss_weight_fn", weight, f"Atelier weights {family.label}'s loss by min-SNR "
                                         "gamma (MIN_SNR_GAMMA) or not at all (CONSTANT)")
    if family is not None:
        _refuse_for_family(data, family)
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("optimizer") is not None:
        name = optimizer["optimizer"]
        if name not in Optimizer.__members__:
            refuse("optimizer.optimizer", name,
                   f"Atelier's optimizers are {', '.join(Optimizer.__members__)}")


def _refuse_quantized_weights(data: dict) -> None:
    """A part whose frozen weights OneTrainer would store in a quantized type Atelier does not
    build (W8A8, GGUF_A8_*: `UNBUILT_DTYPES`); FLOAT_8, INT_8, NFLOAT_4 and GGUF are Atelier's
    too (GGUF for the transformer only: `config.check_gguf`, when the run starts). Every
    config, OneTrainer's or not; the parts the family has (and the VAE), the older files' one
    type for all parts among them."""
    family = _family(data)
    if family is None:
        return
    parts = (family.denoiser, *family.text_encoders, "vae")
    found = [(key, data.get(key)) for key in ("weight_dtype", *(
        f"{part}_weight_dtype" for part in parts))]
    found += [(f"{part}.weight_dtype", data[part].get("weight_dtype"))
              for part in parts if isinstance(data.get(part), dict)]
    unbuilt = [(key, value) for key, value in found if value in UNBUILT_DTYPES]
    if unbuilt:
        (key, value), others = unbuilt[0], unbuilt[1:]
        also = "".join(f"; so does {k}: {v}" for k, v in others)
        # the GGUF file is read as it is (GGUF); the others' weights quantized here instead
        instead = ("GGUF (the file's weights, activations in the train data type)"
                   if value.startswith("GGUF") else
                   "FLOAT_8 (8-bit weights) or NFLOAT_4 (4-bit)")
        raise ConfigError(f"{key}: {value} ({UNBUILT_DTYPES[value]}) is not built in Atelier; "
                          f"set {key} to {instead}{also}.")


def _stored_as(data: dict, part: str) -> Any:
    """The weight type OneTrainer stores `part` in: its section's, else its older flat key's,
    else the older top-level one's (not the VAE's), as `_weight_dtypes` resolves them."""
    section = data.get(part)
    own = section.get("weight_dtype") if isinstance(section, dict) else None
    for value in (own, data.get(f"{part}_weight_dtype"),
                  None if part == "vae" else data.get("weight_dtype")):
        if value not in (None, "NONE"):
            return value
    return None


def _refuse_for_family(data: dict, family: registry.FamilyFacts) -> None:
    """What a family's parts would do in OneTrainer that Atelier does not (yet): skip layers of
    a T5; in a flow-matching family, leave out a text encoder (`include`)."""
    kinds = registry.text_encoder_kinds(family.model_type)
    for part, kind in kinds.items():
        skip = data.get(f"{part}_layer_skip")
        if kind == "T5" and skip:
            refuse(f"{part}_layer_skip", skip, f"{family.label}'s {part} is T5; Atelier skips "
                                               "layers of CLIP encoders only")
    if not family.flow_matching:
        return
    for part in family.parts:
        section = data.get(part)
        if not isinstance(section, dict):
            continue
        if part in kinds and len(kinds) > 1 and section.get("include") is False:
            refuse(f"{part}.include", False, f"Atelier encodes every caption with each of "
                                             f"{family.label}'s text encoders")


# --- Renamed keys ---------------------------------------------------------------------------

def _renamed(data: dict, aside: dict[str, list[str]]) -> None:
    """OneTrainer's names for settings Atelier has under its own."""
    if "dropout_probability" in data:  # OneTrainer's LoRA dropout
        data["lora_dropout"] = data.pop("dropout_probability")
    family = _family(data)
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"):
        skip = f"{part}_layer_skip"
        if skip not in data:
            continue
        value = data.pop(skip)
        if family is None or part not in family.text_encoders:
            aside["parts"].append(skip)
        elif value and isinstance(data.get(part, {}), dict):
            data.setdefault(part, {})["clip_skip"] = value
    weight, strength = data.pop("loss_weight_fn", None), data.pop("loss_weight_strength", None)
    if weight == "MIN_SNR_GAMMA":
        data["min_snr_gamma"] = strength if strength is not None else 5.0
    elif weight is not None:
        data["loss_weight_fn"] = weight  # CONSTANT or SIGMA, Atelier's values too
    lora_model = data.get("lora_model_name")
    if lora_model and data.get("training_method") != "LORA":
        data.pop("lora_model_name")  # OneTrainer loads it only for a LoRA


def _parts(data: dict, aside: dict[str, list[str]]) -> None:
    """Each model part's section: caption dropout under Atelier's name, the
    keys a part never reads set aside, and the parts the family lacks dropped (OneTrainer
    writes every part for every model type and ignores the others)."""
    family = _family(data)
    parts = family.parts if family else PARTS
    for part in PARTS:
        if part not in parts and isinstance(data.get(part), dict):
            data.pop(part)
            aside["parts"].append(part)
    for part in (*sorted(parts, key=lambda p: p.startswith("text_encoder")), "vae"):
        section = data.get(part)
        if not isinstance(section, dict):
            continue
        for key in list(section):
            path = f"{part}.{key}"
            if part == "vae" and key not in keys.VAE_KEPT:
                aside["parts"].append(path)
                section.pop(key)
            elif key == "activation_offloading" and part in ("unet", "transformer"):
                continue  # Atelier's key too
            elif part == "transformer" and family and (key == "model_name" or (
                    key in keys.TRANSFORMER_SWITCHES
                    and registry.reads_switch(family.model_type, path))):
                continue  # its own file; Flux.1's guidance input, its and SD 3's T5 mask
            elif key in keys.PART_SET_ASIDE:
                aside[keys.PART_SET_ASIDE[key]].append(path)
                section.pop(key)
            elif key == "dropout_probability":
                value = section.pop(key)
                if part == (family.denoiser if family else "unet"):
                    aside["parts"].append(path)
                else:
                    section["caption_dropout_probability"] = value
            elif key == "train_embedding" and not part.startswith("text_encoder"):
                aside["parts"].append(path)
                section.pop(key)


def _compile_with_offloading(data: dict, notes: list[str]) -> None:
    """OneTrainer compiles blocks whose weights it streams from the CPU; Atelier's compiled
    blocks cannot follow weights that move at every call. Compiling changes the speed only,
    never the weights, so a file that asks for both streams and does not compile."""
    streamed = [f"{part}.offload_fraction" for part in PARTS if isinstance(data.get(part), dict)
                and (data[part].get("offload_fraction") or 0) > 0]
    if data.get("layer_offload_fraction"):
        streamed.append("layer_offload_fraction")
    if data.get("compile") is True and streamed:
        data["compile"] = False
        notes.append(f"compile: true with {', '.join(streamed)}: Atelier does not compile "
                     "blocks whose weights stream from the CPU; compile is off (speed only, "
                     "the same weights).")


def _family_settings(data: dict, aside: dict[str, list[str]], notes: list[str]) -> None:
    """The top-level keys only some families read: T5's sequence lengths, dynamic timestep
    shifting (a flow-matching scheduler's), the quantization layer filter."""
    family = _family(data)
    model_type = family.model_type if family else None
    for key, part in SEQUENCE_LENGTH_PART.items():
        if model_type not in T5_AS[part]:
            if key in data:
                aside["family"].append(key)
                data.pop(key)
        elif key not in READ_SEQUENCE_LENGTHS:
            value = data.pop(key, None)
            data[key] = None  # the tokenizer's maximum, as OneTrainer takes it
            if value not in (None, 512):
                notes.append(f"{key} {value}: OneTrainer reads no sequence length for "
                             f"{family.label}'s T5 (it takes the tokenizer's maximum), and "
                             "neither does this import.")
    if "dynamic_timestep_shifting" in data and not (
            family and registry.reads_switch(family.model_type, "dynamic_timestep_shifting")):
        aside["family"].append("dynamic_timestep_shifting")
        data.pop("dynamic_timestep_shifting")
    _quantization(data, aside, notes)


def _quantization(data: dict, aside: dict[str, list[str]], notes: list[str]) -> None:
    """OneTrainer's `quantization` section: its layer filter becomes Atelier's (the same rule as
    the LoRA's: a preset is used as such unless the file also holds a different filter, which
    is then what OneTrainer quantized with); SVDQuant (`svd_dtype`) is refused where it would
    apply, a quantized denoiser; `cache_dir` is OneTrainer's folder (Atelier's cache is the
    workspace's). With the denoiser not quantized, the filter changes nothing, and the import
    says so."""
    section = data.pop("quantization", None)
    if not isinstance(section, dict):
        return
    section = dict(section)
    family = _family(data)
    denoiser = family.denoiser if family else "unet"
    quantized = _stored_as(data, denoiser) in STORED_QUANTIZED
    svd = section.pop("svd_dtype", "NONE")
    if svd not in (None, "NONE"):
        if quantized:
            refuse("quantization.svd_dtype", svd,
                   "SVDQuant (a low-rank part kept beside the quantized weights) is not built in "
                   "Atelier; set it to NONE")
        aside["neutral"].append("quantization.svd_dtype")
    for key in ("svd_rank", "cache_dir"):  # svd_rank: only with SVDQuant
        if key in section:
            value = section.pop(key)
            aside["app" if key == "cache_dir" and value is not None else "neutral"].append(
                f"quantization.{key}")
    changed = {k: v for k, v in section.items()
               if k in QUANTIZATION_DEFAULTS and v != QUANTIZATION_DEFAULTS[k]}
    preset = section.pop("layer_filter_preset", None)
    custom = ",".join(p.strip() for p in str(section.get("layer_filter") or "").split(","))
    if preset is not None and preset not in LAYER_PRESETS:
        refuse("quantization.layer_filter_preset", preset,
               f"Atelier's layer presets are {', '.join(LAYER_PRESETS)} (custom = the "
               "layer_filter)")
    if custom and preset != "custom" and custom != _preset_filters(data).get(preset):
        same = [name for name, patterns in _preset_filters(data).items()
                if patterns == custom and not section.get("layer_filter_regex")]
        chosen = same[0] if same else "custom"
        if quantized:
            notes.append(f"quantization layer preset {preset} with layer_filter {custom!r}: "
                         f"OneTrainer quantizes the filter, so the layers are {chosen}"
                         + ("" if same else " with that filter") + ".")
        preset = chosen
    if preset is not None:
        section["layer_filter_preset"] = preset
    if changed and not quantized:
        listed = ", ".join(f"quantization.{k} {v!r}" for k, v in changed.items())
        how = ("read packed as its GGUF file stores them"
               if _stored_as(data, denoiser) == "GGUF" else "not quantized in this file")
        notes.append(f"{listed}: these pick which of the {denoiser}'s linear layers are "
                     f"quantized; the {denoiser}'s weights are {how}, so they change nothing, "
                     "in OneTrainer as here.")
    if changed or set(section) - set(QUANTIZATION_DEFAULTS):  # unknown keys get reported
        data["quantization"] = section
    else:
        aside["neutral"].append("quantization")


# --- Concepts and samples -------------------------------------------------------------------

def _read_list(beside: Beside | None, key: str, name: str, what: str) -> list | None:
    found = beside(name) if beside is not None and name else None
    if found is None:
        return None
    try:
        value = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(f"{key}: '{name}' ({what}) is not a readable JSON file: "
                          f"{error}.") from None
    if not isinstance(value, list):
        raise ConfigError(f"{key}: '{name}' does not hold a list of {what}.")
    return value


def _concepts(data: dict, beside: Beside | None, aside: dict[str, list[str]],
              notes: list[str]) -> None:
    """A Save config keeps its concepts in `concept_file_name`: read it when it is beside the
    config, else stop (a run without them, or with the page's, is not what the file means)."""
    name = data.pop("concept_file_name", None)
    if data.get("concepts") is None:
        data.pop("concepts", None)
        if name is not None:
            concepts = _read_list(beside, "concept_file_name", name, "concepts")
            if concepts is None:
                raise ConfigError(
                    f"concept_file_name: this OneTrainer config keeps its concepts in "
                    f"'{name}', which is missing here. Put that file beside the config (on "
                    "the page: select both files in Import), or use OneTrainer's Export, "
                    "which packs the concepts into the config.")
            data["concepts"] = concepts
            notes.append(f"concepts: {len(concepts)} read from '{name}' (concept_file_name).")
    elif name is not None:
        aside["app"].append("concept_file_name")  # the concepts are packed in (Export)
    if not isinstance(data.get("concepts"), list):
        return
    inpainting = str(data.get("model_type", "")).endswith("_INPAINTING")
    data["concepts"] = [_concept(c, i, beside, inpainting, aside, notes) if isinstance(c, dict)
                        else c for i, c in enumerate(data["concepts"])]


def _concept(concept: dict, index: int, beside: Beside | None, inpainting: bool,
             aside: dict[str, list[str]], notes: list[str]) -> dict:
    where = f"concepts[{index}]"
    concept = dict(concept)
    kind = concept.pop("type", None) or "STANDARD"
    if kind not in ("STANDARD", "VALIDATION", "PRIOR_PREDICTION"):
        refuse(f"{where}.type", kind, "OneTrainer's concept types are STANDARD, VALIDATION and "
                                      "PRIOR_PREDICTION")
    concept["type"] = kind
    image = concept.pop("image", None) or {}
    text = concept.pop("text", None) or {}
    for path, neutral in keys.CONCEPT_NEUTRAL.items():
        section, key = path.split(".")
        value = (image if section == "image" else text).get(key, neutral)
        if value != neutral:
            refuse(f"{where}.{path}", value, keys.CONCEPT_NEUTRAL_REASON)
    shrink = image.get("enable_random_circular_mask_shrink", False)
    if shrink and not inpainting:
        refuse(f"{where}.image.enable_random_circular_mask_shrink", shrink,
               "Atelier uses each mask file as it is")
    if inpainting:
        notes.append(f"{where}: an image without a mask file is shown a random circle to "
                     "inpaint (Atelier's rule for inpainting models); OneTrainer shows the "
                     "whole image unless the concept's enable_random_circular_mask_shrink is "
                     "on, and with it also shrinks mask files.")
    if "enable_random_flip" in image:
        concept["random_flip"] = image["enable_random_flip"]
    if "enable_crop_jitter" in image:
        concept["crop_jitter"] = image["enable_crop_jitter"]
    if image.get("enable_resolution_override"):
        concept["resolution"] = str(image.get("resolution_override", ""))
    if text:
        source = text.get("prompt_source", "sample")
        concept["prompt_source"] = source
        if source == "concept":
            concept["prompt"] = _concept_prompt(text.get("prompt_path", ""), where, beside)
    balancing = concept.pop("balancing", None)
    strategy = concept.pop("balancing_strategy", "REPEATS")
    if balancing is not None:
        concept["repeats"] = _repeats(balancing, strategy, concept, where, notes)
    for key in keys.CONCEPT_SET_ASIDE:
        if key in concept:
            aside["concepts"].append(f"{where}.{key}")
            concept.pop(key)
    return concept


def _concept_prompt(name: str, where: str, beside: Beside | None) -> str:
    """A concept whose caption source is 'concept' reads its prompt from a text file (its
    first non-empty line, as OneTrainer reads one line of it)."""
    found = beside(name) if beside is not None and name else None
    if found is None:
        raise ConfigError(f"{where}.text.prompt_path: the concept's prompt file '{name}' is "
                          "missing here; put it beside the config, or set the prompt in the "
                          "concepts table after importing.")
    lines = found.read_text(encoding="utf-8", errors="replace").splitlines()
    return next((line.strip() for line in lines if line.strip()), "")


def _repeats(balancing: Any, strategy: str, concept: dict, where: str,
             notes: list[str]) -> float:
    """OneTrainer's balancing: REPEATS is Atelier's repeats; SAMPLES is that many images per
    epoch whatever the folder holds, which is repeats = samples / images in the folder."""
    if strategy == "REPEATS":
        return balancing
    if strategy != "SAMPLES":
        refuse(f"{where}.balancing_strategy", strategy, "OneTrainer's strategies are "
                                                         "REPEATS and SAMPLES")
    from trainer.data.images import is_image_file
    folder = Path(str(concept.get("path", ""))).expanduser()
    recursive = bool(concept.get("include_subdirectories", False))
    count = 0
    if folder.is_dir():
        found = folder.rglob("*") if recursive else folder.iterdir()
        count = sum(1 for p in found if p.is_file() and is_image_file(p))
    if not count:
        raise ConfigError(f"{where}.balancing_strategy: SAMPLES takes {balancing} images of "
                          f"the concept per epoch, which needs its folder's images counted, and "
                          f"'{folder}' holds none here; set its path, or repeats.")
    repeats = float(balancing) / count
    notes.append(f"{where}: balancing {balancing} SAMPLES = {balancing} of its {count} images "
                 f"per epoch, repeats {repeats:g}.")
    return repeats


def _samples(data: dict, beside: Beside | None, aside: dict[str, list[str]],
             notes: list[str]) -> None:
    """Samples are packed in (Export) or kept in `sample_definition_file_name` (Save config):
    read beside the config when there; without them the run draws none (samples never change
    the trained weights). Disabled ones are left out."""
    name = data.pop("sample_definition_file_name", None)
    if data.get("samples") is None:
        data.pop("samples", None)
        if name is None:
            return
        samples = _read_list(beside, "sample_definition_file_name", name, "samples")
        if samples is None:
            notes.append(f"samples: kept in '{name}' (sample_definition_file_name), which is "
                         "missing here; no samples are imported.")
            return
        data["samples"] = samples
    elif name is not None:
        aside["app"].append("sample_definition_file_name")
    kept = []
    for index, sample in enumerate(data.get("samples") or []):
        if not isinstance(sample, dict) or sample.get("enabled", True) is False:
            continue
        for key in [k for k in sample if k not in keys.SAMPLE_KEYS]:
            if key != "enabled":
                aside["sampling"].append(f"samples[{index}].{key}")
            sample = {k: v for k, v in sample.items() if k != key}
        kept.append(sample)
    if "samples" in data:
        data["samples"] = kept


# --- Optimizer, adapter ---------------------------------------------------------------------

def _optimizer(data: dict, aside: dict[str, list[str]], notes: list[str]) -> None:
    """The chosen optimizer's parameters Atelier has pass (null = its default); its others must
    hold OneTrainer's neutral value for it; every other optimizer's parameters (OneTrainer
    writes them all, mostly null) are set aside."""
    from trainer.optim.registry import optimizer_schema
    section = data.get("optimizer")
    remembered = data.get("optimizer_defaults")
    if isinstance(section, dict) and section.get("optimizer") in Optimizer.__members__:
        chosen = section["optimizer"]
        if set(section) == {"optimizer"} and isinstance(remembered, dict) and isinstance(
                remembered.get(chosen), dict):
            # a preset naming only its optimizer: OneTrainer's UI fills it in from the
            # values the preset remembers for it (optimizer_util.change_optimizer)
            section.update({k: v for k, v in remembered[chosen].items() if k != "optimizer"})
        own = {param.name for param in optimizer_schema(chosen)}
        extra = keys.OPTIMIZER_EXTRA.get(chosen, {})
        if chosen not in STOCHASTIC_ROUNDING and "stochastic_rounding" in section:
            section.pop("stochastic_rounding")
            aside["optimizers"].append("optimizer.stochastic_rounding")
        for key in [k for k in section if k != "optimizer" and k not in own]:
            value = section.pop(key)
            if key == "fused_back_pass":
                if value and chosen in FUSED_BACK_PASS:
                    data["fused_backward_pass"] = True
                elif value:
                    notes.append(f"optimizer.fused_back_pass: OneTrainer has no fused back "
                                 f"pass for {chosen} and trains it without one, as Atelier.")
            elif key in extra:
                neutral = extra[key]
                if neutral is not None and value is not None and value != neutral:
                    refuse(f"optimizer.{key}", value, f"Atelier's {chosen} has no {key}; "
                                                      f"OneTrainer's default is {neutral!r}")
                _optimizer_detail(chosen, key, value, notes)
                aside["speed" if neutral is None else "optimizers"].append(f"optimizer.{key}")
            else:
                aside["optimizers"].append(f"optimizer.{key}")
    if isinstance(remembered, dict):
        kept = {}
        for name, params in remembered.items():
            if name in Optimizer.__members__ and isinstance(params, dict):
                own = {param.name for param in optimizer_schema(name)}
                values = {k: v for k, v in params.items() if k in own and v is not None}
                if values:
                    kept[name] = values
            if name not in kept:
                aside["optimizers"].append(f"optimizer_defaults.{name}")
        data["optimizer_defaults"] = kept


def _optimizer_detail(chosen: str, key: str, value: Any, notes: list[str]) -> None:
    """Parameters that do not stop the import but differ in effect, said once."""
    if chosen == "PRODIGY" and key == "slice_p" and value not in (None, 1):
        notes.append(f"optimizer.slice_p {value}: OneTrainer's Prodigy estimates its step size "
                     f"from every {value}th weight (a memory saving); Atelier's from every "
                     "weight, so the estimate differs slightly.")


def _adapter(data: dict, notes: list[str]) -> None:
    """LoKr's rank is `lokr_dim` in OneTrainer (its LoKr tab never shows lora_rank), with
    `lokr_decompose_factor` (Atelier's field of the same name). Its other LoKr switches must
    hold their defaults."""
    dim = data.pop("lokr_dim", None)
    if data.get("training_method") != "LORA" or data.get("peft_type") != "LOKR":
        return
    for key, neutral in (("lokr_decompose_both", False), ("lokr_use_tucker", False),
                         ("lokr_weight_decompose", False), ("lokr_full_matrix", False)):
        if data.get(key, neutral) != neutral:
            refuse(key, data[key], "Atelier's LoKr (peft's) splits only the second factor, "
                                   "without Tucker factors or DoRA")
    if dim is not None:
        data["lora_rank"] = dim


def _bundle_in_diffusers_file(data: dict, notes: list[str]) -> None:
    """OneTrainer bundles additional embeddings into a DIFFUSERS_LORA file too, which diffusers'
    load_lora_weights then refuses; Atelier writes them beside it instead."""
    if (data.get("training_method") == "LORA"
            and data.get("output_model_format") == "DIFFUSERS_LORA"
            and data.get("additional_embeddings")
            and data.get("bundle_additional_embeddings", True)):
        data["bundle_additional_embeddings"] = False
        notes.append("bundle_additional_embeddings: OneTrainer bundles the embeddings into its "
                     "DIFFUSERS_LORA file (bundle_emb keys, which diffusers' load_lora_weights "
                     "refuses); Atelier writes each one beside the LoRA as its own file "
                     "(load_textual_inversion reads it).")


def _dora_axis(data: dict, notes: list[str]) -> None:
    """OneTrainer normalises DoRA per input channel unless `lora_decompose_output_axis`;
    Atelier's DoRA is peft's, always per output channel (trainer/lora.py). Said, not refused:
    both are DoRA, trained and loaded the same way, with a magnitude on another axis."""
    if data.get("lora_decompose") is True and data.get("training_method") == "LORA":
        if not data.get("lora_decompose_output_axis"):
            notes.append("lora_decompose: Atelier's DoRA (peft's) learns a magnitude per "
                         "output channel; OneTrainer's default is per input channel "
                         "(lora_decompose_output_axis false).")
        if data.get("lora_decompose_norm_epsilon", True):
            notes.append("lora_decompose_norm_epsilon: peft divides by the weight's norm "
                         "without OneTrainer's small epsilon (a difference in the 6th digit).")


# --- Counting -------------------------------------------------------------------------------

def _steps_in_batches(data: dict, notes: list[str]) -> None:
    """OneTrainer counts STEP units (warm-up, sampling, backups, saves, stop-training counts)
    in batches; Atelier in optimizer updates. With accumulation N, N batches are one update:
    each count is converted on import, as OneTrainer itself divides the warm-up
    (create_lr_scheduler: int(warm-up / accumulation))."""
    steps = data.get("gradient_accumulation_steps", 1)
    if not isinstance(steps, int) or steps <= 1:
        return
    converted = []
    warmup = data.get("learning_rate_warmup_steps")
    if isinstance(warmup, (int, float)) and warmup > 1:
        updates = int(warmup / steps)
        if updates == 1:  # Atelier reads 1 as "the whole run" (a fraction)
            updates = 0
            converted.append(f"learning_rate_warmup_steps {warmup:g} batches = 1 update, whose "
                             "learning rate OneTrainer ramps from 0: no warm-up here")
        else:
            converted.append(f"learning_rate_warmup_steps {warmup:g} -> {updates}")
        data["learning_rate_warmup_steps"] = updates
    for key in ("sample_after", "backup_after", "save_every"):
        every = data.get(key)
        if data.get(f"{key}_unit") == "STEP" and isinstance(every, (int, float)) and every > 0:
            updates = max(1, round(every / steps))
            data[key] = updates
            converted.append(f"{key} {every:g} -> {updates}")
    sections = [(part, data.get(part)) for part in PARTS]
    sections += [(f"additional_embeddings[{i}]", e)
                 for i, e in enumerate(data.get("additional_embeddings") or [])]
    for where, section in sections:
        if not isinstance(section, dict) or section.get("stop_training_after_unit") != "STEP":
            continue
        stop = section.get("stop_training_after")
        if isinstance(stop, (int, float)) and stop > 0:
            section["stop_training_after"] = math.ceil(stop / steps)
            converted.append(f"{where}.stop_training_after {stop:g} -> "
                             f"{section['stop_training_after']}")
    if converted:
        notes.append(f"STEP counts: OneTrainer counts batches, Atelier optimizer updates "
                     f"(gradient_accumulation_steps {steps}: {steps} batches per update); "
                     + "; ".join(converted) + ".")


def _time_units(data: dict, notes: list[str]) -> None:
    """OneTrainer's ALWAYS (every batch) is every update here."""
    for key in ("sample_after", "backup_after", "save_every"):
        if data.get(f"{key}_unit") == "ALWAYS":
            data[f"{key}_unit"], data[key] = "STEP", 1
            notes.append(f"{key}_unit ALWAYS: every optimizer update here (STEP 1).")


def _older_format_names(data: dict, version: Any) -> None:
    """SAFETENSORS, OneTrainer's name before __version 11 for a LoRA or a whole model: its
    migration 10 reads it as LEGACY_LORA / LEGACY_SAFETENSORS, the layout it wrote then."""
    method = data.get("training_method", "FINE_TUNE")
    if data.get("output_model_format") == "SAFETENSORS" and method in ONETRAINER_SAFETENSORS:
        if version is None or version <= 10:
            data["output_model_format"] = ONETRAINER_SAFETENSORS[method]


def _transformer_files(data: dict, notes: list[str]) -> None:
    """A flow-matching family's single file: OneTrainer's ORIGINAL_TRANSFORMER (the transformer
    alone in its original layout) is what Atelier's ORIGINAL_SINGLE_FILE writes for these
    families; OneTrainer's ORIGINAL_SINGLE_FILE of SD 3 also packs the text encoders and VAE,
    which Atelier leaves in the base model."""
    family = _family(data)
    if family is None or not family.flow_matching or data.get("training_method") != "FINE_TUNE":
        return
    value = data.get("output_model_format")
    if value == "ORIGINAL_TRANSFORMER":
        data["output_model_format"] = "ORIGINAL_SINGLE_FILE"
        notes.append(f"output_model_format ORIGINAL_TRANSFORMER: {family.label}'s transformer "
                     "alone in its original layout, which is Atelier's ORIGINAL_SINGLE_FILE "
                     "for it.")
    elif value == "ORIGINAL_SINGLE_FILE":
        notes.append(f"output_model_format ORIGINAL_SINGLE_FILE: Atelier writes {family.label}'s "
                     "transformer alone in its original layout (what ComfyUI loads as a "
                     "diffusion model); OneTrainer's file also packs the text encoders and VAE, "
                     "which stay those of the base model.")


def _masked_prior_preservation(data: dict, notes: list[str]) -> None:
    """OneTrainer applies masked_prior_preservation_weight only to a LoRA with masked training
    on, and ignores it otherwise; so is it dropped here then (Atelier would refuse it)."""
    weight = data.get("masked_prior_preservation_weight")
    if not weight:
        return
    if data.get("training_method", "LORA") != "LORA" or not data.get("masked_training"):
        data.pop("masked_prior_preservation_weight")
        notes.append(f"masked_prior_preservation_weight {weight}: OneTrainer uses it only for a "
                     "LoRA with masked training on, so this run did not; left out.")


def _not_done(data: dict, notes: list[str]) -> None:
    for key, (neutral, what) in keys.NOT_DONE.items():
        value = data.pop(key, neutral)
        if value not in (neutral, None):
            notes.append(f"{key} {value!r}: not done here: {what}; the trained weights are "
                         "the same.")


def _set_aside(data: dict, aside: dict[str, list[str]]) -> None:
    for key, kind in data.pop("__set_aside", []):
        aside[kind].append(key)
    for key in list(data):
        if key in keys.SET_ASIDE:
            aside[keys.SET_ASIDE[key]].append(key)
            data.pop(key)
        elif key in keys.NEUTRAL:  # checked before: it holds its neutral value
            aside["neutral"].append(key)
            data.pop(key)
        elif key in ("lokr_dim", "lokr_decompose_factor") and data.get("peft_type") != "LOKR":
            aside["adapters"].append(key)
            data.pop(key)
        elif key == "embedding" and data.get("training_method") != "EMBEDDING":
            aside["method"].append(key)  # OneTrainer trains its main embedding only then
            data.pop(key)


def summarize_set_aside(aside: dict[str, list[str]], shown: int = 3) -> str:
    """One line: how many keys of each kind were set aside, with a few of their names."""
    parts = []
    for kind, names in aside.items():
        if names:
            listed = ", ".join(f"'{n}'" for n in names[:shown])
            more = ", …" if len(names) > shown else ""
            parts.append(f"{len(names)} {keys.KINDS[kind]} ({listed}{more})")
    if not parts:
        return ""
    return ("OneTrainer settings with no effect on this run, set aside: "
            + "; ".join(parts) + ".")


# --- For every config (Atelier's older names too) ----------------------------------------

def _checkpointing(data: dict) -> None:
    """OneTrainer's `gradient_checkpointing` enum (__version 4-10): ON/OFF are the bool;
    CPU_OFFLOADED is checkpointing with its layers streamed from the CPU, which
    `layer_offload_fraction` says here (as it did there: the fraction picks how much)."""
    value = data.get("gradient_checkpointing")
    if value in ("ON", "CPU_OFFLOADED"):
        data["gradient_checkpointing"] = True
    elif value == "OFF":
        data["gradient_checkpointing"] = False


def _main_embedding(data: dict) -> None:
    """OneTrainer trains its `embedding` (the main one) only with EMBEDDING, together with the
    additional ones (its all_embedding_configs()); Atelier lists every embedding in
    `additional_embeddings`, the main one first (the file at the output path). Outside
    EMBEDDING OneTrainer ignores `embedding`."""
    main = data.get("embedding")
    if data.get("training_method") != "EMBEDDING" or not isinstance(main, dict):
        return
    data.pop("embedding")
    others = data.get("additional_embeddings") or []
    data["additional_embeddings"] = [main, *others]


def _unset_values(data: dict, model: type[BaseModel]) -> None:
    """OneTrainer saves an unset value as null (a part's `stop_training_after`, an optional
    optimizer parameter); where Atelier's field takes no null it is left out, so the default
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
    """The older name SAFETENSORS -> the method's current one (Atelier's older configs); a
    format Atelier writes for no family is refused by name. Whether a format fits the
    family and the training method is check_supported's question (trainer/config.py)."""
    value = data.get("output_model_format")
    if not isinstance(value, str):
        return
    method = data.get("training_method", "LORA")
    if value == "SAFETENSORS" and method in ATELIER_SAFETENSORS:
        data["output_model_format"] = ATELIER_SAFETENSORS[method]
    elif value in UNWRITTEN_FORMATS:
        family = _family(data)
        label = family.label if family else "this model"
        fitting = output_formats(family.model_type, method) if family else []
        raise ConfigError(
            f"output_model_format: {value} ({UNWRITTEN_FORMATS[value]}) is not a format "
            f"Atelier writes; for {label} and training_method {method} it writes "
            f"{', '.join(fitting) or 'nothing'}.")


def _layer_filter(data: dict, notes: list[str]) -> None:
    """OneTrainer's layer filter, both generations: `layer_filter_preset` / `layer_filter` /
    `layer_filter_regex` (older: `lora_layer_preset` / `lora_layers` / `lora_layers_regex`).
    OneTrainer trains the filter; its LoRA tab fills the filter in from the preset, and a
    partial preset carries only the preset. So a named preset is used as such, unless the
    config also holds a different filter, which is then what OneTrainer trained with (and is
    that preset when it is another preset's filter)."""
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
    custom = ",".join(p.strip() for p in str(data.get("layer_filter") or "").split(","))
    if preset == "custom" or not custom:
        return
    filters = _preset_filters(data)
    if custom == filters.get(preset):
        return
    family = _family(data)
    regex = registry.family_class(family.model_type).REGEX_PRESETS if family else frozenset()
    same = [name for name, patterns in filters.items()
            if patterns == custom and bool(data.get("layer_filter_regex")) == (name in regex)]
    data["lora_layer_preset"] = same[0] if same else "custom"
    notes.append(f"layer preset {preset} with layer_filter {custom!r}: OneTrainer trains the "
                 f"filter, so the layers are {data['lora_layer_preset']}"
                 + ("" if same else " with that filter") + ".")


def _preset_filters(data: dict) -> dict[str, str]:
    """The family's layer presets (its LAYER_PRESETS, OneTrainer's) as the layer_filter
    OneTrainer's LoRA tab writes for each."""
    family = _family(data)
    if family is None:
        return {}
    presets = registry.family_class(family.model_type).LAYER_PRESETS
    return {name: ",".join(patterns) for name, patterns in presets.items()}


def _weight_dtypes(data: dict) -> None:
    """A `weight_dtype` per part (OneTrainer's current shape, and Atelier's). The older
    generation had one at the top (and before it `unet_weight_dtype`, ...): each part without
    its own takes it, as OneTrainer's config migration 9 does; NONE means the same."""
    top = data.pop("weight_dtype", None)
    family = _family(data)
    parts = family.parts if family else PARTS
    for part in (*PARTS, "vae"):
        flat = data.pop(f"{part}_weight_dtype", None)
        section = data.get(part)
        if section is None and (flat or (top and part in parts)):
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
