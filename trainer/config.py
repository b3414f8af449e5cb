"""The one config model: every training key with its type, default, range, section, label and
tooltip. The page, the presets, the CLI and the metadata saved with each output all read and
write this model, so a field is declared here once and nowhere else.

Key names follow OneTrainer's JSON config (so its presets import), enum values are its
upper-case names. A field that the engine cannot honour yet is refused by `check_supported`
with a clear message; nothing here is silently ignored.
"""
from __future__ import annotations

import json
import math
import re
from enum import Enum
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from trainer.errors import ConfigError
from trainer.flow_matching import FLOW_LOSS_WEIGHTS, LossWeight, TimestepDistribution
from trainer.models import registry


# Upper bounds of the counting fields (issue 23): far beyond any real run, low enough that no
# number a visitor types makes the engine spin before step 1 (an epoch count of 10**30 was
# counted epoch by epoch) or overflow a seed or a database integer. A shared server's own
# limits (trainer/limits.py) are much lower.
MAX_EPOCHS = 1_000_000
MAX_COUNT = 1_000_000_000      # steps, epochs or time units in "every N" / "after N" fields
MAX_BATCH = 10_000             # batch size, accumulation steps, rolling backups kept
MAX_SEED = 2 ** 32 - 1         # numpy's seed range; torch's and Python's take it too
MAX_LIST = 1_000               # concepts, sample prompts: each costs a check and a walk


def setting(default: Any, *, section: str, label: str, tooltip: str,
            applies_to: dict[str, list[str]] | None = None,
            choices_for: dict[str, dict[str, list[str]]] | None = None, **range_: Any) -> Any:
    """A field with the metadata the page needs to draw it.

    `applies_to` limits where the page shows it, e.g. {"training_method": ["LORA"]}.
    `choices_for` limits an enum's values by another field's, e.g. {"training_method":
    {"LORA": [...], "FINE_TUNE": [...]}}; the first listed is that value's default.
    `range_` takes pydantic's ge/gt/le/lt; they are enforced on load and drawn as slider limits.
    """
    extra: dict[str, Any] = {"section": section}
    if applies_to:
        extra["applies_to"] = applies_to
    if choices_for:
        extra["choices_for"] = choices_for
    return Field(default, title=label, description=tooltip, json_schema_extra=extra, **range_)


# --- Enums (OneTrainer's upper-case names) ------------------------------------------------

class ModelType(str, Enum):
    """OneTrainer's model types that Atelier trains; what each one is (its parts, objective,
    label) is trainer/models/registry.py's, read through `facts`."""
    STABLE_DIFFUSION_15 = "STABLE_DIFFUSION_15"
    STABLE_DIFFUSION_15_INPAINTING = "STABLE_DIFFUSION_15_INPAINTING"
    STABLE_DIFFUSION_XL_10_BASE = "STABLE_DIFFUSION_XL_10_BASE"
    STABLE_DIFFUSION_XL_10_BASE_INPAINTING = "STABLE_DIFFUSION_XL_10_BASE_INPAINTING"
    FLUX_DEV_1 = "FLUX_DEV_1"  # Flux.1 dev and schnell
    CHROMA_1 = "CHROMA_1"
    STABLE_DIFFUSION_3 = "STABLE_DIFFUSION_3"
    STABLE_DIFFUSION_35 = "STABLE_DIFFUSION_35"
    QWEN = "QWEN"  # Qwen-Image
    Z_IMAGE = "Z_IMAGE"  # Z-Image, Z-Image-Turbo and De-Turbo
    FLUX_2 = "FLUX_2"  # Flux.2 klein 4B / 9B (and their base models)

    @property
    def facts(self) -> registry.FamilyFacts:
        return registry.facts(self)

    @property
    def is_sdxl(self) -> bool:
        """SDXL's architecture (two text encoders, time ids), inpainting or not."""
        return self in (ModelType.STABLE_DIFFUSION_XL_10_BASE,
                        ModelType.STABLE_DIFFUSION_XL_10_BASE_INPAINTING)

    @property
    def is_inpainting(self) -> bool:
        """An inpainting denoiser: it also reads the mask and the masked image's latents."""
        return self.facts.inpainting

    @property
    def plain(self) -> "ModelType":
        """The same family without inpainting (itself when it is not an inpainting model)."""
        return ModelType(self.facts.plain_type)


class TrainingMethod(str, Enum):
    LORA = "LORA"
    FINE_TUNE = "FINE_TUNE"
    EMBEDDING = "EMBEDDING"  # textual inversion: only new embeddings train (trainer/embeddings.py)


class ModelFormat(str, Enum):
    """OneTrainer's current output formats (trainer/lora_formats.py and trainer/finetune.py
    write them; each family writes those of `output_formats`; the README's table says who loads
    which). Its older name SAFETENSORS is read as KOHYA_LORA or ORIGINAL_SINGLE_FILE
    (trainer/onetrainer.py)."""
    # LoRA
    KOHYA_LORA = "KOHYA_LORA"
    LEGACY_LORA = "LEGACY_LORA"
    COMFY_LORA = "COMFY_LORA"
    DIFFUSERS_LORA = "DIFFUSERS_LORA"
    # The whole model
    ORIGINAL_SINGLE_FILE = "ORIGINAL_SINGLE_FILE"
    DIFFUSERS = "DIFFUSERS"
    LEGACY_SAFETENSORS = "LEGACY_SAFETENSORS"
    # An embedding's vectors (OneTrainer's name for its embedding file)
    SAFETENSORS = "SAFETENSORS"


# The formats each training method writes for SD 1.5 / SDXL; the first is the method's default
# (OneTrainer's).
OUTPUT_FORMATS: dict[str, list[str]] = {
    "LORA": ["KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA"],
    "FINE_TUNE": ["ORIGINAL_SINGLE_FILE", "DIFFUSERS", "LEGACY_SAFETENSORS"],
    "EMBEDDING": ["SAFETENSORS"],
}
# ... and for the flow-matching families (Flux.1, Chroma, SD 3 / 3.5): DIFFUSERS_LORA first, the
# format of OneTrainer's presets for them; their kohya layout has no LEGACY variant, and
# ORIGINAL_SINGLE_FILE is the model's original layout. Embeddings are not built for them yet.
FLOW_OUTPUT_FORMATS: dict[str, list[str]] = {
    "LORA": ["DIFFUSERS_LORA", "KOHYA_LORA", "COMFY_LORA"],
    "FINE_TUNE": ["DIFFUSERS", "ORIGINAL_SINGLE_FILE"],
    "EMBEDDING": [],
}


# ... and the families with a table of their own. Z-Image, Qwen-Image: no kohya layout (kohya's
# sd-scripts has none for them); COMFY_LORA names diffusers' layers, as ComfyUI reads them.
FAMILY_OUTPUT_FORMATS: dict[str, dict[str, list[str]]] = {
    "QWEN": {"LORA": ["DIFFUSERS_LORA", "COMFY_LORA"],
             "FINE_TUNE": ["DIFFUSERS", "ORIGINAL_SINGLE_FILE"], "EMBEDDING": []},
    "Z_IMAGE": {"LORA": ["DIFFUSERS_LORA", "COMFY_LORA"],
                "FINE_TUNE": ["DIFFUSERS", "ORIGINAL_SINGLE_FILE"], "EMBEDDING": []},
    # Flux.2 klein: no kohya layout either; COMFY_LORA names BFL's layers (fused q/k/v).
    "FLUX_2": {"LORA": ["DIFFUSERS_LORA", "COMFY_LORA"],
               "FINE_TUNE": ["DIFFUSERS", "ORIGINAL_SINGLE_FILE"], "EMBEDDING": []},
}


def output_formats(model_type: Any, method: Any) -> list[str]:
    """The formats `model_type` writes for a training method; the first is the default."""
    facts = registry.facts(model_type)
    table = FAMILY_OUTPUT_FORMATS.get(facts.model_type) or (
        FLOW_OUTPUT_FORMATS if facts.flow_matching else OUTPUT_FORMATS)
    return list(table.get(getattr(method, "value", method), []))


# Every format of each method, for the page's choices_for (model_type picks among them).
OUTPUT_FORMATS_ANY = {method: list(dict.fromkeys([*OUTPUT_FORMATS[method],
                                                  *FLOW_OUTPUT_FORMATS[method]]))
                      for method in OUTPUT_FORMATS}


def _formats_by_model_type() -> dict[str, list[str]]:
    """Every format each model type writes, its defaults first (for the page's choices)."""
    return {value: [f for method in TrainingMethod for f in output_formats(value, method)]
            for value in registry.FAMILIES}


# The LoRA formats that can hold each adapter type (peft_type). diffusers' SD 1.5 / SDXL loaders
# read LoRA and DoRA (peft's lora_magnitude_vector) but no LoHa or LoKr, so DIFFUSERS_LORA has
# no layout for them; the kohya layouts and ComfyUI's names hold every type
# (trainer/lora_formats.py). The page offers only these (output_model_format's choices_for).
ADAPTER_FORMATS: dict[str, list[str]] = {
    "LORA": ["KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA", "DIFFUSERS_LORA"],
    "LOHA": ["KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA"],
    "LOKR": ["KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA"],
}


# The model types of each training objective (their settings apply only there).
FLOW_TYPES = registry.types_where(lambda f: f.flow_matching)
DDPM_TYPES = registry.types_where(lambda f: not f.flow_matching)


def types_reading(key: str) -> list[str]:
    """The model types whose family reads the family-specific setting `key`."""
    return registry.types_where(lambda f: registry.reads_switch(f.model_type, key))


# The model types whose text encoder `part` is a T5 (never trained here; its sequence length).
T5_AS: dict[str, list[str]] = {
    part: registry.types_where(lambda f, part=part: registry.text_encoder_kinds(
        f.model_type).get(part) == "T5")
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3")}
# The text encoders kept frozen (OneTrainer's presets train none of them): T5, Z-Image's Qwen3
# and Qwen-Image's Qwen2.5-VL.
FROZEN_ENCODERS = ("T5", "Qwen3", "Qwen2.5-VL")


class CompileMode(str, Enum):
    """`compile`: OneTrainer's key is a bool (read as ON/OFF); AUTO follows the device."""
    AUTO = "AUTO"
    ON = "ON"
    OFF = "OFF"


class DataType(str, Enum):
    FLOAT_32 = "FLOAT_32"
    FLOAT_16 = "FLOAT_16"
    BFLOAT_16 = "BFLOAT_16"
    TFLOAT_32 = "TFLOAT_32"
    # Storage of a part's frozen weights only (`<part>.weight_dtype`; trainer/quantization.py):
    # float8 e4m3 with row scales, bitsandbytes' int8 and NF4. Never a compute or file type.
    FLOAT_8 = "FLOAT_8"
    INT_8 = "INT_8"
    NFLOAT_4 = "NFLOAT_4"
    # The transformer read pre-quantized from a .gguf file (`transformer.model_name`: city96's
    # Q8_0, Q4_K, ... files), its layers dequantized one at a time by diffusers' GGUF layers.
    GGUF = "GGUF"


# The types that store weights quantized, and those that compute (train_dtype, output_dtype:
# the page offers them only, for every model type).
QUANTIZED_TYPES = ("FLOAT_8", "INT_8", "NFLOAT_4", "GGUF")
FLOAT_TYPES = [d.value for d in DataType if d.value not in QUANTIZED_TYPES]
FLOAT_TYPES_ONLY = {"model_type": {value: FLOAT_TYPES for value in registry.FAMILIES}}
# Every part's storage types but the transformer's GGUF, which only a transformer file holds.
NOT_GGUF = {"model_type": {value: [d.value for d in DataType if d != DataType.GGUF]
                           for value in registry.FAMILIES}}
GGUF_SUFFIX = ".gguf"


class Optimizer(str, Enum):
    ADAMW = "ADAMW"
    ADAMW_8BIT = "ADAMW_8BIT"
    PRODIGY = "PRODIGY"
    ADAFACTOR = "ADAFACTOR"
    LION = "LION"
    SGD = "SGD"


class LearningRateScheduler(str, Enum):
    CONSTANT = "CONSTANT"
    LINEAR = "LINEAR"
    COSINE = "COSINE"
    COSINE_WITH_RESTARTS = "COSINE_WITH_RESTARTS"
    COSINE_WITH_HARD_RESTARTS = "COSINE_WITH_HARD_RESTARTS"
    REX = "REX"
    ADAFACTOR = "ADAFACTOR"
    CUSTOM = "CUSTOM"


class TimeUnit(str, Enum):
    EPOCH = "EPOCH"
    STEP = "STEP"
    SECOND = "SECOND"
    MINUTE = "MINUTE"
    HOUR = "HOUR"
    NEVER = "NEVER"


class EMAMode(str, Enum):
    OFF = "OFF"
    GPU = "GPU"
    CPU = "CPU"


class PromptSource(str, Enum):
    SAMPLE = "sample"      # a .txt file beside each image
    FILENAME = "filename"  # the image's file name
    CONCEPT = "concept"    # one prompt for the whole concept


class ConceptType(str, Enum):
    """What a concept's images are for (OneTrainer's concept `type`, plus kohya's
    regularization images): STANDARD = learn them; PRIOR_PREDICTION = keep the base model's own
    prediction on them (the adapters switched off give the target); VALIDATION = never trained,
    measured (trainer/validation.py); REGULARIZATION = class
    images trained like standard ones at `prior_loss_weight`, as many per epoch as the other
    concepts' samples (trainer/regularization.py)."""
    STANDARD = "STANDARD"
    VALIDATION = "VALIDATION"
    PRIOR_PREDICTION = "PRIOR_PREDICTION"
    REGULARIZATION = "REGULARIZATION"


class PeftType(str, Enum):
    """OneTrainer's adapter types (its `peft_type`), all built with peft (trainer/lora.py)."""
    LORA = "LORA"
    LOHA = "LOHA"
    LOKR = "LOKR"


class LoraLayerPreset(str, Enum):
    """OneTrainer's layer presets, matched as OneTrainer matches them (trainer/lora.py); each
    family has its own (its LAYER_PRESETS): `blocks` only the transformer families."""
    ATTN_ONLY = "attn-only"
    ATTN_MLP = "attn-mlp"
    BLOCKS = "blocks"
    FULL = "full"
    CUSTOM = "custom"


# --- Nested sections ----------------------------------------------------------------------

class Strict(BaseModel):
    # Unknown keys are collected and reported by `unknown_keys` before validation, then dropped.
    model_config = ConfigDict(extra="ignore", use_enum_values=False, validate_assignment=True)


# Every optimizer's parameter names (their defaults, ranges and tooltips live in the schemas of
# trainer/optim/registry.py, which the "⋯" dialog draws). Empty = the chosen optimizer's default.
OPTIMIZER_PARAMETER_TYPES: dict[str, Any] = {
    "beta1": float, "beta2": float, "beta3": float, "eps": float, "eps2": float,
    "weight_decay": float, "min_8bit_size": int,
    "decouple": bool, "use_bias_correction": bool, "safeguard_warmup": bool, "d0": float,
    "d_coef": float, "growth_rate": float, "clip_threshold": float, "decay_rate": float,
    "scale_parameter": bool, "relative_step": bool, "warmup_init": bool, "momentum": float,
    "nesterov": bool, "stochastic_rounding": bool,
}


def _optimizer_config() -> type[Strict]:
    from pydantic import create_model
    fields: dict[str, Any] = {"optimizer": (Optimizer, setting(
        Optimizer.ADAMW, section="Optimizer", label="Optimizer",
        tooltip="The algorithm that updates the weights. AdamW is the safe default; Prodigy "
                "finds its own step size (set learning rates to 1); the ⋯ button edits the "
                "chosen optimizer's parameters."))}
    for name, kind in OPTIMIZER_PARAMETER_TYPES.items():
        fields[name] = (Optional[kind], setting(
            None, section="Optimizer", label=name,
            tooltip="A parameter of the chosen optimizer (see its ⋯ dialog); "
                    "empty = the optimizer's default."))
    return create_model("OptimizerConfig", __base__=Strict, **fields)


OptimizerConfig = _optimizer_config()


def part_weight_dtype(name: str) -> Any:
    gguf = name == "Transformer"
    return setting(
        DataType.FLOAT_32, section="Train data type", label=f"{name} weight data type",
        choices_for=None if gguf else NOT_GGUF,
        tooltip=f"Storage type of the {name}'s frozen weights. A fine-tuned part trains "
                "float32 master weights, or with optimizer.stochastic_rounding (⋯ dialog) its "
                "BFLOAT_16 weights in place. BFLOAT_16 halves their memory; FLOAT_16 needs a "
                "CUDA GPU. FLOAT_8 (float8, any device), INT_8 and NFLOAT_4 (bitsandbytes, as "
                "QLoRA) store its linear layers in 8 or 4 bits under a LoRA, the rest in the "
                "train data type; not for a fine-tuned part."
                + (" GGUF: the transformer as the .gguf file named by the transformer file "
                   "stores it (Q8_0, Q4_K, ...), under a LoRA." if gguf else ""))


def _part(key: str, name: str, *, train: bool, stop_after: int,
          stop_unit: TimeUnit) -> type[Strict]:
    """One model part's settings (every part shares a shape; text encoders add their own keys,
    the transformer OneTrainer's switches). `key` is the config key, `name` its section."""
    section = name
    fields: dict[str, Any] = {
        "train": (bool, setting(train, section=section, label="Train",
                                tooltip=f"Train the {name}. Off = keep it frozen.")),
        "learning_rate": (Optional[float], setting(
            None, section=section, label="Learning rate", gt=0,
            tooltip=f"Learning rate of the {name}. Empty = use the base learning rate.")),
        "stop_training_after": (int, setting(
            stop_after, section=section, label="Stop training after", ge=0, le=MAX_COUNT,
            tooltip=f"Freeze the {name} after this many units (see the unit).")),
        "stop_training_after_unit": (TimeUnit, setting(
            stop_unit, section=section, label="Stop training unit",
            tooltip="EPOCH or STEP counts for 'Stop training after'; NEVER trains to the end.")),
        "gradient_checkpointing": (bool, setting(
            True, section=section, label="Gradient checkpointing",
            tooltip=f"Recompute the {name}'s activations in the backward pass when the main "
                    "gradient checkpointing switch is on.")),
        # Shown with the other data types; the section of the part would hide it among
        # training switches.
        "weight_dtype": (DataType, part_weight_dtype(name)),
        "offload_fraction": (float, setting(
            0.0, section=section, label="Offload fraction", ge=0, le=1,
            tooltip=f"Keep this fraction of the {name}'s frozen weights (whole blocks, the "
                    "largest first) in CPU memory and copy each block to the GPU only while it "
                    "runs: less GPU memory, some speed. OneTrainer's key. A part a gradient "
                    "flows through needs gradient checkpointing; not for a fine-tuned part, "
                    "with compile, INT_8/NFLOAT_4 storage or several GPUs. 0 = all on the GPU; "
                    "empty here and layer_offload_fraction set = that fraction for the "
                    "denoiser and trained text encoders.")),
    }
    if key in ("unet", "transformer"):
        fields["activation_offloading"] = (bool, setting(
            False, section=section, label="Activation offloading",
            tooltip=f"Keep the activations gradient checkpointing saves between the {name}'s "
                    "blocks (each block's inputs) in CPU memory, copied back when the block "
                    "is recomputed: less GPU memory for large images and batches, some speed; "
                    "the same weights. Needs gradient checkpointing. OneTrainer's key."))
    if key.startswith("text_encoder"):
        clip = registry.types_where(
            lambda f: registry.text_encoder_kinds(f.model_type).get(key, "").startswith("CLIP"))
        fields["train_embedding"] = (bool, setting(
            True, section=section, label="Train embeddings",
            applies_to={"training_method": ["LORA", "EMBEDDING"]},
            tooltip=f"Train the additional embeddings' vectors of the {name} (off = they keep "
                    "their starting vectors for this encoder)."))
        fields["caption_dropout_probability"] = (float, setting(
            0.0, section=section, label="Caption dropout", ge=0, le=1,
            tooltip="Probability of training a sample with an empty caption (helps CFG)."))
        fields["clip_skip"] = (int, setting(
            0, section=section, label="Clip skip", ge=0, le=10, applies_to={"model_type": clip},
            tooltip="Use the hidden states this many layers earlier (0 = the model's usual "
                    "layer: the last for SD 1.5, the penultimate for SDXL). CLIP encoders only."))
    if key == "transformer":
        reading = {switch: {"model_type": types_reading(f"transformer.{switch}")}
                   for switch in ("guidance_scale", "attention_mask")}
        fields["model_name"] = (str, setting(
            "", section="Model", label="Transformer file",
            tooltip="Optional: the transformer as one .safetensors file in its original layout "
                    "(BFL's Flux.1 and Chroma files, SAI's SD 3 ones), in place of the base "
                    "model's; the text encoders and VAE still come from the base model. A "
                    ".gguf file (city96's quantized transformers) with the transformer's "
                    "weight data type GGUF. Empty = the base model's transformer."))
        fields["guidance_scale"] = (float, setting(
            1.0, section=section, label="Guidance scale", ge=0, le=100,
            applies_to=reading["guidance_scale"],
            tooltip="The constant guidance input while training a model with a guidance "
                    "embedding (Flux.1 dev); 1.0 is OneTrainer's and most Flux trainers' value. "
                    "A model without one (Flux.1 schnell) ignores it."))
        fields["attention_mask"] = (bool, setting(
            False, section=section, label="Attention mask",
            applies_to=reading["attention_mask"],
            tooltip="Mask T5's padding tokens in the transformer's attention (OneTrainer's Force "
                    "Attention Mask); can help short captions. Chroma always masks them."))
    from pydantic import create_model
    return create_model(f"{name.replace(' ', '')}Config", __base__=Strict, **fields)


# The model parts, OneTrainer's keys and defaults. Each family has some of them
# (trainer/models/registry.py); the page shows the sections of the chosen one.
TextEncoderConfig = _part("text_encoder", "Text encoder", train=True, stop_after=30,
                          stop_unit=TimeUnit.EPOCH)
TextEncoder2Config = _part("text_encoder_2", "Text encoder 2", train=False, stop_after=30,
                           stop_unit=TimeUnit.EPOCH)
TextEncoder3Config = _part("text_encoder_3", "Text encoder 3", train=False, stop_after=30,
                           stop_unit=TimeUnit.EPOCH)
UNetConfig = _part("unet", "UNet", train=True, stop_after=0, stop_unit=TimeUnit.NEVER)
TransformerConfig = _part("transformer", "Transformer", train=True, stop_after=0,
                          stop_unit=TimeUnit.NEVER)


def part_field(config_class: type[Strict], part: str) -> Any:
    """A part's section in TrainConfig, shown for the families that have the part."""
    return Field(default_factory=config_class,
                 json_schema_extra={"applies_to": {"model_type": registry.types_with_part(part)}})


class VAEConfig(Strict):
    """The VAE only encodes the training images (once, when latents are cached) and decodes
    samples; it is never trained."""
    weight_dtype: DataType = part_weight_dtype("VAE")


class QuantizationConfig(Strict):
    """Which linear layers of a UNet / transformer stored quantized (weight_dtype FLOAT_8,
    INT_8, NFLOAT_4) are quantized: OneTrainer's `quantization` keys, its presets (the LoRA's
    layer presets of each family). Text encoders and the VAE quantize every linear layer, as in
    OneTrainer (trainer/quantization.py)."""
    layer_filter_preset: LoraLayerPreset = setting(
        LoraLayerPreset.FULL, section="Train data type", label="Quantized layers",
        tooltip="Which linear layers of a UNet / transformer stored in FLOAT_8, INT_8 or "
                "NFLOAT_4 are quantized, by the LoRA's layer presets: full = every linear "
                "layer; blocks = those of the transformer blocks (not the embedders or the "
                "final layer); custom = the filter below. Norms, embeddings and convolutions "
                "are never quantized.")
    layer_filter: str = setting(
        "", section="Train data type", label="Quantization filter",
        applies_to={"quantization.layer_filter_preset": ["custom"]},
        tooltip="Comma-separated parts of layer names (transformer_block, attn); a linear "
                "layer whose name contains any of them is quantized. Empty = every one.")
    layer_filter_regex: bool = setting(
        False, section="Train data type", label="Quantization filter as regular expressions",
        applies_to={"quantization.layer_filter_preset": ["custom"]},
        tooltip="Read each quantization filter entry as a regular expression searched in the "
                "layer name.")


class ConceptConfig(Strict):
    path: str = setting("", section="Data", label="Folder", tooltip="Folder of training images.")
    enabled: bool = setting(True, section="Data", label="Enabled",
                            tooltip="Train on this concept.")
    repeats: float = setting(1.0, section="Data", label="Repeats", ge=0,
                             tooltip="How many times each image is seen per epoch "
                                     "(fractions take that share of the images).")
    prompt_source: PromptSource = setting(
        PromptSource.SAMPLE, section="Data", label="Caption source",
        tooltip="sample = a .txt beside each image; filename = the file name; "
                "concept = the prompt below for every image.")
    prompt: str = setting("", section="Data", label="Prompt",
                          tooltip="The caption used when the caption source is 'concept'.")
    loss_weight: float = setting(1.0, section="Data", label="Loss weight", ge=0,
                                 tooltip="Multiplies this concept's loss.")
    resolution: str = setting(
        "", section="Data", label="Resolution override",
        tooltip="This concept's training size(s), written like the main resolution "
                "(512, 384,512,640 or 768x512). Empty = the run's resolution.")
    crop_jitter: bool = setting(
        False, section="Data", label="Crop jitter",
        tooltip="Crop each image at a random position (off = centred). Each new crop is a new "
                "latent-cache entry, so the cache is reused less.")
    include_subdirectories: bool = setting(
        False, section="Data", label="Subfolders",
        tooltip="Also train on the images in the folder's subfolders (OneTrainer's "
                "include_subdirectories).")
    random_flip: bool = setting(
        False, section="Data", label="Random flip",
        tooltip="Mirror each image left-right half of the time (masks follow). Not for "
                "subjects whose sides differ (text, asymmetric faces).")
    type: ConceptType = setting(
        ConceptType.STANDARD, section="Data", label="Type",
        tooltip="STANDARD = learn these images. VALIDATION = never trained on: the validation "
                "loss is measured on them (Validation). PRIOR_PREDICTION (LoRA only) = keep what the "
                "base model does on them: the target is the base model's own prediction (the "
                "adapters switched off; one more forward pass per such batch), so the LoRA "
                "leaves similar images alone. REGULARIZATION = class images (kohya's reg "
                "images): trained at the prior loss weight, as many per epoch as the other "
                "concepts' images with repeats, taken in turn (their own repeats unused).")

    @field_validator("resolution")
    @classmethod
    def _resolution_parses(cls, value: str) -> str:
        if value.strip():
            parse_resolution(value)  # raises with the bad item named
        return value.strip()


class SchedulerArgument(Strict):
    key: str = setting("", section="Learning-rate scheduler", label="Argument",
                       tooltip="Keyword argument of the custom scheduler class.")
    value: str = setting("", section="Learning-rate scheduler", label="Value",
                         tooltip="Its value: a number, true/false, or text.")


class SampleConfig(Strict):
    prompt: str = setting("", section="Sampling", label="Prompt", tooltip="What to draw.")
    negative_prompt: str = setting("", section="Sampling", label="Negative prompt",
                                   tooltip="What to steer away from.")
    seed: int = setting(42, section="Sampling", label="Seed", ge=0, le=MAX_SEED,
                        tooltip="Same seed = same starting noise, so samples are comparable.")
    width: int = setting(512, section="Sampling", label="Width", ge=8, multiple_of=8,
                         tooltip="Sample width in pixels.")
    height: int = setting(512, section="Sampling", label="Height", ge=8, multiple_of=8,
                          tooltip="Sample height in pixels.")
    diffusion_steps: int = setting(20, section="Sampling", label="Steps", ge=1, le=200,
                                   tooltip="Denoising steps.")
    cfg_scale: float = setting(7.0, section="Sampling", label="CFG scale", ge=0,
                               tooltip="Classifier-free guidance strength.")


EMBEDDINGS_SECTION = "Embeddings"


class EmbeddingConfig(Strict):
    """One additional embedding (OneTrainer's TrainEmbeddingConfig, its key names): new tokens
    whose vectors are trained, with a LoRA (pivotal tuning) or alone (EMBEDDING). How they are
    tokenised, initialised, trained and saved: trainer/embeddings.py."""
    placeholder: str = setting(
        "<embedding>", section=EMBEDDINGS_SECTION, label="Placeholder",
        tooltip="The word that stands for the embedding in captions and sample prompts, e.g. "
                "<mychar>. Lower case (CLIP lower-cases every prompt); not a word the tokenizer "
                "already knows.")
    token_count: int = setting(
        1, section=EMBEDDINGS_SECTION, label="Tokens", ge=1, le=75,
        tooltip="Vectors per placeholder: the placeholder becomes this many tokens in each "
                "caption. More = more capacity, fewer tokens left for the rest of the caption.")
    initial_embedding_text: str = setting(
        "*", section=EMBEDDINGS_SECTION, label="Initial text",
        tooltip="The vectors start as the token embeddings of these words (e.g. 'woman'); "
                "fewer tokens than the count are padded with '*'.")
    train: bool = setting(True, section=EMBEDDINGS_SECTION, label="Train",
                          tooltip="Train this embedding. Off = use it as it starts (from its "
                                  "file or its initial text).")
    stop_training_after: Optional[int] = setting(
        None, section=EMBEDDINGS_SECTION, label="Stop after", ge=0, le=MAX_COUNT,
        tooltip="Freeze the embedding after this many units; empty = train to the end.")
    stop_training_after_unit: TimeUnit = setting(
        TimeUnit.NEVER, section=EMBEDDINGS_SECTION, label="Stop unit",
        tooltip="EPOCH or STEP counts for 'Stop after'; NEVER trains to the end.")
    model_name: str = setting(
        "", section=EMBEDDINGS_SECTION, label="Start from file",
        tooltip="Optional: an embedding .safetensors (emb_params / emp_params / "
                "string_to_param, or clip_l "
                "and clip_g for SDXL) whose vectors this one starts from instead of the "
                "initial text; its vector count must be the token count.")
    uuid: str = setting(
        "", section=EMBEDDINGS_SECTION, label="Id",
        tooltip="OneTrainer's id of the embedding; kept with the config, not used in training.")
    is_output_embedding: bool = setting(
        False, section=EMBEDDINGS_SECTION, label="Output embedding",
        tooltip="OneTrainer's output embeddings (vectors that replace the text encoder's output) "
                "are not supported; must stay off.")

    @field_validator("placeholder")
    @classmethod
    def _placeholder_is_one_new_word(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value):
            raise ValueError("a placeholder is one word without spaces, e.g. <mychar>")
        if value != value.lower():
            raise ValueError(f"write the placeholder in lower case ({value.lower()}): CLIP's "
                             "tokenizer lower-cases every caption and prompt")
        if re.search(r"_\d+$", value):
            raise ValueError("a placeholder may not end in _<number>: diffusers reads "
                             "<name>_1, <name>_2 ... as the further vectors of <name>")
        return value

    @field_validator("is_output_embedding")
    @classmethod
    def _no_output_embedding(cls, value: bool) -> bool:
        if value:
            raise ValueError("output embeddings (vectors replacing the text encoder's output) "
                             "are not supported; Atelier trains input embeddings")
        return value


# --- The whole config ---------------------------------------------------------------------

class TrainConfig(Strict):
    # Top bar / model
    model_type: ModelType = setting(
        ModelType.STABLE_DIFFUSION_15, section="Model", label="Model type",
        tooltip="Stable Diffusion 1.5 or SDXL 1.0, plain or inpainting (an inpainting "
                "model's UNet also reads a mask and the masked image); Flux.1 (dev or schnell), "
                "Chroma, SD 3 or SD 3.5, the flow-matching transformer models.")
    training_method: TrainingMethod = setting(
        TrainingMethod.LORA, section="Model", label="Training method",
        tooltip="LoRA trains small adapter matrices; Fine-tune trains the weights themselves.")
    base_model_name: str = setting(
        "", section="Model", label="Base model",
        tooltip="A hub id, a diffusers folder or a single .safetensors checkpoint.")
    vae_model_name: str = setting(
        "", section="Model", label="VAE override",
        tooltip="Optional: a diffusers VAE folder or .safetensors file. Empty = the model's VAE.")
    output_model_destination: str = setting(
        "", section="Model", label="Output file",
        tooltip="Where the trained model is written. Empty = <workspace>/output/<name>.")
    # The default follows the model type and training method (`_default_output_format`): a
    # new fine-tune config gets ORIGINAL_SINGLE_FILE, not a LoRA format it cannot write, and a
    # Flux.1 LoRA DIFFUSERS_LORA. The model type's list comes first in choices_for: its order
    # is the page's (its first fitting value, the default).
    output_model_format: ModelFormat = setting(
        ModelFormat.KOHYA_LORA, section="Model", label="Output format",
        choices_for={"model_type": _formats_by_model_type(),
                     "training_method": OUTPUT_FORMATS_ANY, "peft_type": ADAPTER_FORMATS},
        tooltip="LoRA: KOHYA_LORA for A1111/Forge, ComfyUI and diffusers (SDXL's UNet under "
                "the original input_blocks_… names, as kohya's scripts write them); "
                "LEGACY_LORA the same with diffusers' UNet names (down_blocks_…; for SD 1.5 "
                "identical to KOHYA_LORA); "
                "COMFY_LORA (ComfyUI's own key names); DIFFUSERS_LORA (peft keys, alpha folded "
                "in, for diffusers' load_lora_weights). Fine-tune: ORIGINAL_SINGLE_FILE (= "
                "LEGACY_SAFETENSORS), one checkpoint for ComfyUI, A1111/Forge and diffusers' "
                "from_single_file; DIFFUSERS, a from_pretrained folder. Flux.1, Chroma, SD 3: "
                "DIFFUSERS_LORA (their default), KOHYA_LORA or COMFY_LORA (the original layer "
                "names); fine-tune DIFFUSERS or ORIGINAL_SINGLE_FILE (the original layout). "
                "ComfyUI (checked with its own loader, docs/comfyui_results.md) loads "
                "KOHYA_LORA, LEGACY_LORA and COMFY_LORA whole; DIFFUSERS_LORA of SD 1.5 / "
                "SDXL only in part (it drops the UNet's attention layers, silently), of "
                "SD 3 without a trained text encoder's text_projection, and of any family "
                "without DoRA's magnitudes. Forge (checked with its own code, "
                "docs/forge_results.md) loads KOHYA_LORA and LEGACY_LORA whole; COMFY_LORA "
                "only without a trained text encoder (with one it applies none of the file); "
                "DIFFUSERS_LORA not at all.")
    output_dtype: DataType = setting(
        DataType.FLOAT_32, section="Model", label="Output data type",
        choices_for=FLOAT_TYPES_ONLY,
        tooltip="Precision of the saved weights. FLOAT_16 halves the file size.")
    workspace_dir: str = setting(
        "workspace/run", section="Model", label="Workspace folder",
        tooltip="Samples, logs (metrics.jsonl, TensorBoard) and backups of this run go here.")
    seed: int = setting(42, section="Main settings", label="Seed", ge=0, le=MAX_SEED,
                        tooltip="Same seed and data = the same run.")

    # Data
    concepts: list[ConceptConfig] = setting(
        [], section="Data", label="Concepts", tooltip="Folders of training images.",
        max_length=MAX_LIST)
    prior_loss_weight: float = setting(
        1.0, section="Data", label="Prior loss weight", ge=0,
        tooltip="Loss weight of the REGULARIZATION concepts' images (kohya's "
                "prior_loss_weight), on top of their concept's loss weight.")
    aspect_ratio_bucketing: bool = setting(
        True, section="Data", label="Aspect-ratio bucketing",
        tooltip="Train each image at the bucket of its own aspect ratio (same pixel area as the "
                "resolution; sides multiples of 8, 64 for SDXL), scaled to cover and cropped, "
                "never stretched; a batch holds one bucket. Off = every image cropped square.")
    latent_caching: bool = setting(
        True, section="Data", label="Latent caching",
        tooltip="Keep each image's VAE latents (and the captions' text-encoder outputs when no "
                "text encoder is trained) on disk under <workspace>/cache: encoded once in the "
                "first epoch, reused after and by later runs on the same data. In the app a "
                "user's jobs share one cache folder, pruned to ATELIER_DATA_CACHE_GB "
                "(default 5), least recently used first.")

    # Optimizer and scheduler
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)  # type: ignore
    optimizer_defaults: dict[str, dict[str, Any]] = setting(
        {}, section="Optimizer", label="Remembered optimizer settings",
        tooltip="Edited parameters of each optimizer, restored when switching back to it.")
    learning_rate_scheduler: LearningRateScheduler = setting(
        LearningRateScheduler.CONSTANT, section="Learning-rate scheduler", label="Scheduler",
        tooltip="How the learning rate changes over the run.")
    learning_rate_warmup_steps: float = setting(
        200, section="Learning-rate scheduler", label="Warmup steps", ge=0, le=MAX_COUNT,
        tooltip="Ramp the learning rate up from 0. A value > 1 is a number of steps, "
                "a value <= 1 a fraction of all steps.")
    learning_rate_min_factor: float = setting(
        0.0, section="Learning-rate scheduler", label="Min factor", ge=0, le=1,
        tooltip="The schedule never goes below this factor times the learning rate.")
    learning_rate_cycles: float = setting(
        1.0, section="Learning-rate scheduler", label="Cycles", gt=0,
        tooltip="Number of cycles of the restart schedules.")
    custom_learning_rate_scheduler: str = setting(
        "", section="Learning-rate scheduler", label="Custom scheduler class",
        applies_to={"learning_rate_scheduler": ["CUSTOM"]},
        tooltip="For CUSTOM: a torch LR scheduler class as module.Class, built with the "
                "optimizer and the arguments below (runs only on a local server).")
    scheduler_params: list[SchedulerArgument] = setting(
        [], section="Learning-rate scheduler", label="Custom scheduler arguments",
        applies_to={"learning_rate_scheduler": ["CUSTOM"]},
        tooltip="key/value arguments; %LR%, %EPOCHS%, %STEPS_PER_EPOCH% and %TOTAL_STEPS% "
                "are replaced by their values.")

    # Main settings
    learning_rate: float = setting(
        3e-6, section="Main settings", label="Learning rate", gt=0,
        tooltip="Base learning rate of every trained part (LoRA presets use 3e-4).")
    resolution: str = setting(
        "512", section="Main settings", label="Resolution",
        tooltip="Training size in pixels: one size (512); a comma list (384,448,512,576,640: "
                "each step trains at a randomly chosen one of them); or one exact "
                "WIDTHxHEIGHT (768x512, not bucketed).")
    gradient_checkpointing: bool = setting(
        True, section="Main settings", label="Gradient checkpointing",
        tooltip="Saves memory by recomputing activations in the backward pass; slower.")
    fused_backward_pass: bool = setting(
        False, section="Main settings", label="Fused backward pass",
        applies_to={"training_method": ["FINE_TUNE"]},
        tooltip="Update each weight as soon as its gradient is computed and free that gradient "
                "at once, instead of holding all gradients until the step: saves the memory of "
                "a full set of gradients (SD 1.5 UNet 3.4 GB, SDXL 10 GB) in full fine-tunes. "
                "Needs accumulation steps 1 and an empty clip grad norm; not with FLOAT_16 or "
                "Prodigy.")
    compile: CompileMode = setting(
        CompileMode.AUTO, section="Main settings", label="Compile (torch.compile)",
        tooltip="Compile the UNet's blocks with torch.compile, each block on its own "
                "(compiled once per bucket shape: the first step of each bucket is slow). "
                "Pays only in long runs: compiling takes minutes. AUTO = off until a "
                "measurement shows where it pays (see the README's GPU figures). "
                "OneTrainer's true/false read as ON/OFF.")
    layer_offload_fraction: float = setting(
        0.0, section="Main settings", label="Layer offload fraction", ge=0, le=1,
        tooltip="Keep this fraction of the frozen layers of the UNet (and of each trained "
                "text encoder) in pinned CPU memory and stream them to "
                "the GPU as each layer runs: less GPU memory, some speed. Needs gradient "
                "checkpointing; not with a fine-tune of that part or with compile. "
                "0 = everything stays on the GPU.")

    # Train data type
    train_dtype: DataType = setting(
        DataType.FLOAT_16, section="Train data type", label="Train data type",
        choices_for=FLOAT_TYPES_ONLY,
        tooltip="Autocast type of the forward pass. FLOAT_16 is fast on GPUs (with gradient "
                "scaling); FLOAT_32 the most precise; BFLOAT_16 works on CPUs and recent GPUs.")

    # Model parts
    text_encoder: TextEncoderConfig = part_field(TextEncoderConfig, "text_encoder")  # type: ignore
    text_encoder_2: TextEncoder2Config = part_field(  # type: ignore
        TextEncoder2Config, "text_encoder_2")
    text_encoder_3: TextEncoder3Config = part_field(  # type: ignore
        TextEncoder3Config, "text_encoder_3")
    unet: UNetConfig = part_field(UNetConfig, "unet")  # type: ignore
    transformer: TransformerConfig = part_field(TransformerConfig, "transformer")  # type: ignore
    vae: VAEConfig = Field(default_factory=VAEConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    # T5's token count (OneTrainer's keys, top level as there): longer captions are cut there.
    text_encoder_sequence_length: Optional[int] = setting(
        512, section="Text encoder", label="Sequence length", ge=1, le=4096,
        applies_to={"model_type": T5_AS["text_encoder"]
                    + types_reading("text_encoder_sequence_length")},
        tooltip="Tokens of the text encoder's input (Chroma's T5, Flux.2 klein's Qwen3): "
                "longer captions are cut there, shorter ones padded. Empty = the tokenizer's "
                "maximum.")
    text_encoder_2_sequence_length: Optional[int] = setting(
        77, section="Text encoder 2", label="Sequence length", ge=1, le=4096,
        applies_to={"model_type": T5_AS["text_encoder_2"]},
        tooltip="Tokens of T5's input (Flux.1's second text encoder). OneTrainer's default 77 "
                "is fast and fits short captions; Flux.1 itself was trained with 512. Empty = "
                "the tokenizer's maximum.")

    # Masked training
    masked_training: bool = setting(
        False, section="Masked training", label="Masked training",
        tooltip="Weight the loss by each image's <name>-masklabel.png (white = focus).")
    unmasked_probability: float = setting(
        0.1, section="Masked training", label="Unmasked probability", ge=0, le=1,
        tooltip="Share of samples trained without their mask.")
    unmasked_weight: float = setting(
        0.1, section="Masked training", label="Unmasked weight", ge=0, le=1,
        tooltip="Loss weight of the area outside the mask.")
    normalize_masked_area_loss: bool = setting(
        False, section="Masked training", label="Normalize masked area loss",
        tooltip="Divide each sample's loss by its mean mask weight (for large masked areas).")
    masked_prior_preservation_weight: float = setting(
        0.0, section="Masked training", label="Masked prior preservation weight", ge=0,
        tooltip="LoRA only: outside the mask, also hold the model to the base model's own "
                "prediction (adapters off), with this weight: the LoRA learns the masked "
                "subject and leaves the background as the base model draws it. 0 = off; costs "
                "one more forward pass per step.")

    # Epochs, batch, accumulation
    epochs: int = setting(100, section="Epochs / batch size", label="Epochs", ge=1,
                          le=MAX_EPOCHS,
                          tooltip="How many times the whole dataset is visited.")
    batch_size: int = setting(1, section="Epochs / batch size", label="Batch size", ge=1,
                              le=MAX_BATCH,
                              tooltip="Images per step.")
    gradient_accumulation_steps: int = setting(
        1, section="Epochs / batch size", label="Accumulation steps", ge=1, le=MAX_BATCH,
        tooltip="Steps whose gradients add up before one update: effective batch = "
                "batch size x accumulation steps.")
    clip_grad_norm: Optional[float] = setting(
        1.0, section="Epochs / batch size", label="Clip grad norm", gt=0,
        tooltip="Largest gradient norm allowed; empty = no clipping.")

    # EMA
    ema: EMAMode = setting(EMAMode.OFF, section="EMA", label="EMA",
                           tooltip="Keep an exponential moving average of the weights.")
    ema_decay: float = setting(0.999, section="EMA", label="EMA decay", gt=0, lt=1,
                               tooltip="0.9999 for large datasets, 0.999 or 0.998 for small.")
    ema_update_step_interval: int = setting(5, section="EMA", label="EMA update interval",
                                            ge=1, le=MAX_COUNT,
                                            tooltip="Update the EMA every N steps.")

    # Noise and loss
    offset_noise_weight: float = setting(
        0.0, section="Noise and loss", label="Offset noise weight", ge=0, le=1,
        tooltip="Adds per-channel constant noise: helps very dark/bright images.")
    min_snr_gamma: float = setting(
        0.0, section="Noise and loss", label="Min-SNR gamma", ge=0,
        applies_to={"model_type": DDPM_TYPES},
        tooltip="Min-SNR loss weighting (5 is typical); 0 = off.")
    timestep_distribution: TimestepDistribution = setting(
        TimestepDistribution.UNIFORM, section="Noise and loss", label="Timestep distribution",
        tooltip="How the noise level of each training sample is drawn (OneTrainer's "
                "distributions). UNIFORM draws every level alike; LOGIT_NORMAL, SIGMOID, "
                "INVERTED_PARABOLA and COS_MAP favour the middle levels, HEAVY_TAIL and BETA "
                "the ends, shaped by the noising weight and bias.")
    noising_weight: float = setting(
        0.0, section="Noise and loss", label="Noising weight",
        tooltip="The distribution's shape: SIGMOID's steepness, the spread of LOGIT_NORMAL "
                "(weight + 1), INVERTED_PARABOLA's curvature, HEAVY_TAIL's scale, BETA's alpha. "
                "UNIFORM and COS_MAP ignore it.")
    noising_bias: float = setting(
        0.0, section="Noise and loss", label="Noising bias",
        tooltip="Where the distribution centres: added to the middle (0.5) for SIGMOID and "
                "INVERTED_PARABOLA, LOGIT_NORMAL's mean, BETA's beta. UNIFORM, COS_MAP and "
                "HEAVY_TAIL ignore it.")
    timestep_shift: float = setting(
        1.0, section="Noise and loss", label="Timestep shift", gt=0, le=100,
        tooltip="Moves the drawn timesteps toward more noise (above 1) or less (below 1); "
                "1 = no shift. Ignored when dynamic timestep shifting is on.")
    dynamic_timestep_shifting: bool = setting(
        False, section="Noise and loss", label="Dynamic timestep shifting",
        applies_to={"model_type": types_reading("dynamic_timestep_shifting")},
        tooltip="Shift by the image size as the model's scheduler config defines it (larger "
                "images get more noise), instead of the timestep shift above (Flux.1, as "
                "OneTrainer).")
    loss_weight_fn: LossWeight = setting(
        LossWeight.CONSTANT, section="Noise and loss", label="Loss weight function",
        applies_to={"model_type": FLOW_TYPES},
        choices_for={"model_type": {value: [w.value for w in (
            FLOW_LOSS_WEIGHTS if value in FLOW_TYPES else (LossWeight.CONSTANT,))]
            for value in registry.FAMILIES}},
        tooltip="CONSTANT weighs every sample's loss alike; SIGMA multiplies it by the "
                "sample's noise level σ. (SD 1.5 / SDXL weigh by min-SNR gamma instead.)")
    min_noising_strength: float = setting(
        0.0, section="Noise and loss", label="Min noising strength", ge=0, le=1,
        tooltip="Lowest timestep trained, as a fraction of all timesteps.")
    max_noising_strength: float = setting(
        1.0, section="Noise and loss", label="Max noising strength", gt=0, le=1,
        tooltip="Highest timestep trained, as a fraction of all timesteps.")
    mse_strength: float = setting(1.0, section="Noise and loss", label="MSE strength", ge=0,
                                  tooltip="Weight of the mean squared error.")
    mae_strength: float = setting(0.0, section="Noise and loss", label="MAE strength", ge=0,
                                  tooltip="Weight of the mean absolute error.")
    huber_strength: float = setting(
        0.0, section="Noise and loss", label="Huber strength", ge=0,
        tooltip="Weight of the Huber loss: squared for small errors, linear beyond the delta "
                "(less pulled by outliers than MSE).")
    huber_delta: float = setting(
        1.0, section="Noise and loss", label="Huber delta", gt=0,
        tooltip="Where the Huber loss turns from squared to linear.")

    # LoRA
    peft_type: PeftType = setting(
        PeftType.LORA, section="LoRA", label="Adapter type",
        applies_to={"training_method": ["LORA"]},
        # the flow-matching families' files name fused layers: LoRA only (check_adapter_type)
        choices_for={"model_type": {value: ["LORA"] if value in FLOW_TYPES
                                    else [p.value for p in PeftType]
                                    for value in registry.FAMILIES}},
        tooltip="LORA: two low-rank matrices (up @ down). LOHA (LyCORIS LoHa): the Hadamard "
                "product of two low-rank products, more expressive at the same rank. LOKR "
                "(LyCORIS LoKr): a Kronecker product of two small factors, smallest files. All "
                "three load in ComfyUI, Forge and A1111; DIFFUSERS_LORA writes only LORA.")
    lora_decompose: bool = setting(
        False, section="LoRA", label="Decompose weights (DoRA)",
        applies_to={"training_method": ["LORA"], "peft_type": ["LORA"]},
        tooltip="DoRA: also learn a magnitude per output channel beside the LoRA's "
                "direction (peft's use_dora); each step costs more. Saved as .dora_scale "
                "beside lora_down/lora_up, which ComfyUI and Forge load.")
    lora_rank: int = setting(16, section="LoRA", label="Rank", ge=1, le=1024,
                             applies_to={"training_method": ["LORA"]},
                             tooltip="Size of the LoRA matrices: more = more capacity, "
                                     "bigger file.")
    lora_alpha: float = setting(1.0, section="LoRA", label="Alpha", gt=0,
                                applies_to={"training_method": ["LORA"]},
                                tooltip="Scales the LoRA's effect by alpha / rank.")
    lora_dropout: float = setting(0.0, section="LoRA", label="Dropout", ge=0, lt=1,
                                  applies_to={"training_method": ["LORA"]},
                                  tooltip="Dropout inside the LoRA layers.")
    lora_layer_preset: LoraLayerPreset = setting(
        LoraLayerPreset.ATTN_ONLY, section="LoRA", label="Layers",
        applies_to={"training_method": ["LORA"]},
        tooltip="Denoiser layers with adapters, OneTrainer's presets per family. SD 1.5 / "
                "SDXL UNet: attn-only = the attention projections, attn-mlp = all of each "
                "transformer block (+ feed-forward, proj_in/out), full = every linear and conv "
                "layer. Flux.1 / Chroma: attn-only = the attention layers, attn-mlp = + the "
                "feed-forward and proj_mlp, blocks = every layer of the transformer blocks "
                "(not the embedders or the final layer), full = every linear layer; SD 3 / 3.5: "
                "attn-only, blocks, full. custom = the filter below; text encoders get adapters "
                "on all their linear layers.")
    layer_filter: str = setting(
        "", section="LoRA", label="Layer filter",
        applies_to={"training_method": ["LORA"], "lora_layer_preset": ["custom"]},
        tooltip="Comma-separated parts of UNet layer names (down_blocks.1, attn2, ff.net); a "
                "linear or conv layer whose name contains any of them gets an adapter. Empty "
                "= every layer. Each must match at least one layer.")
    layer_filter_regex: bool = setting(
        False, section="LoRA", label="Filter as regular expressions",
        applies_to={"training_method": ["LORA"], "lora_layer_preset": ["custom"]},
        tooltip="Read each filter entry as a regular expression searched in the layer name.")
    lokr_decompose_factor: int = setting(
        -1, section="LoRA", label="LoKr factor", ge=-1, le=1024,
        applies_to={"training_method": ["LORA"], "peft_type": ["LOKR"]},
        tooltip="How LoKr splits each layer's sizes into two factors (OneTrainer's and "
                "LyCORIS's decompose factor): -1 = as close to the square root as the size "
                "allows; a number = that factor where it divides the size. The rank is the "
                "LoRA rank.")
    lora_model_name: str = setting(
        "", section="LoRA", label="Continue from LoRA file",
        applies_to={"training_method": ["LORA"]},
        tooltip="Optional: a KOHYA_LORA / LEGACY_LORA file of the same type, rank and layers "
                "whose weights the new adapters start from (OneTrainer's LoRA base model); "
                "empty = new adapters.")

    # Embeddings (OneTrainer's keys; trainer/embeddings.py)
    additional_embeddings: list[EmbeddingConfig] = setting(
        [], section=EMBEDDINGS_SECTION, label="Additional embeddings",
        applies_to={"training_method": ["LORA", "EMBEDDING"]},
        tooltip="New tokens trained with the LoRA (pivotal tuning) or alone (EMBEDDING): each "
                "placeholder in a caption or sample prompt becomes its own trained vectors.")
    embedding_learning_rate: Optional[float] = setting(
        None, section=EMBEDDINGS_SECTION, label="Embedding learning rate", gt=0,
        applies_to={"training_method": ["LORA", "EMBEDDING"]},
        tooltip="Learning rate of the embeddings' vectors (their own parameter group). Empty = "
                "the base learning rate.")
    preserve_embedding_norm: bool = setting(
        False, section=EMBEDDINGS_SECTION, label="Preserve embedding norm",
        applies_to={"training_method": ["LORA", "EMBEDDING"]},
        tooltip="After each step, rescale every trained vector to the median norm of the text "
                "encoder's vocabulary, so that it weighs in a prompt like an ordinary word.")
    bundle_additional_embeddings: bool = setting(
        True, section=EMBEDDINGS_SECTION, label="Bundle embeddings in the LoRA",
        applies_to={"training_method": ["LORA"]},
        tooltip="Also write the embeddings into the LoRA file (bundle_emb.<placeholder>.clip_l "
                "/ .clip_g, OneTrainer's keys). A standalone file per placeholder is written "
                "beside it either way. ComfyUI's LoRA loader skips these keys: put the LoRA "
                "(or the standalone file) in ComfyUI/models/embeddings and write "
                "embedding:<file name> in the prompt; all of a file's bundled placeholders "
                "become that one embedding. Forge does not use them: put the standalone file "
                "in its embeddings folder and write its file name (without .safetensors) in "
                "the prompt; by Forge's code, more than 12 such keys (13 SD 1.5 or 7 SDXL "
                "placeholders) make it apply none of the LoRA. A1111 was not checked.")

    # Sampling
    samples: list[SampleConfig] = setting(
        [], section="Sampling", label="Sample prompts", tooltip="Prompts drawn during training.",
        max_length=MAX_LIST)
    sample_after: int = setting(10, section="Sampling", label="Sample every", ge=1,
                                le=MAX_COUNT,
                                tooltip="Draw the samples every N units.")
    sample_after_unit: TimeUnit = setting(
        TimeUnit.NEVER, section="Sampling", label="Sample unit",
        tooltip="STEP, EPOCH, SECOND, MINUTE or HOUR for 'Sample every'; NEVER = only on "
                "request.")

    # Validation
    validation: bool = setting(
        False, section="Validation", label="Validation loss",
        tooltip="Measure the loss on images the run never trains on (VALIDATION concepts, or "
                "the validation split) every 'Validate every' units: the same noise and "
                "timesteps each time, so it moves only when the weights do. With EMA on it "
                "measures the EMA weights; no caption dropout; masks under masked training.")
    validate_after: int = setting(
        1, section="Validation", label="Validate every", ge=1, le=MAX_COUNT,
        tooltip="Measure the validation loss every N units.")
    validate_after_unit: TimeUnit = setting(
        TimeUnit.EPOCH, section="Validation", label="Validate unit",
        tooltip="STEP, EPOCH, SECOND, MINUTE or HOUR for 'Validate every' (several processes: "
                "STEP or EPOCH).")
    validation_split: float = setting(
        0.0, section="Validation", label="Validation split", ge=0, lt=1,
        tooltip="Share of each STANDARD concept's images held out of training and validated "
                "on instead (kohya's idea), chosen by the seed; the run's folder lists them in "
                "validation_split.txt. 0 = only VALIDATION concepts.")

    # Backup and save
    backup_after: float = setting(
        30, section="Backup and save", label="Backup every", ge=0, le=MAX_COUNT,
        tooltip="Write a backup (weights, optimizer, schedule, EMA, RNG, progress) every N "
                "units; training can continue from it at the same step.")
    backup_after_unit: TimeUnit = setting(
        TimeUnit.MINUTE, section="Backup and save", label="Backup unit",
        tooltip="STEP, EPOCH, SECOND, MINUTE, HOUR, or NEVER.")
    rolling_backup: bool = setting(
        False, section="Backup and save", label="Rolling backups",
        tooltip="Keep only the newest backups (see the count).")
    rolling_backup_count: int = setting(
        3, section="Backup and save", label="Rolling backup count", ge=1, le=MAX_BATCH,
        tooltip="How many backups rolling backups keep.")
    backup_before_save: bool = setting(
        True, section="Backup and save", label="Backup before save",
        tooltip="Write a backup before the final model is saved.")
    continue_last_backup: bool = setting(
        False, section="Backup and save", label="Continue from last backup",
        tooltip="Resume from the newest backup in the workspace at the same step, with the "
                "same data order, LR, optimizer and EMA state.")
    save_every: float = setting(
        0, section="Backup and save", label="Save every", ge=0, le=MAX_COUNT,
        tooltip="Also save the model every N units (named with the step); 0 = only at the end.")
    save_every_unit: TimeUnit = setting(
        TimeUnit.NEVER, section="Backup and save", label="Save unit",
        tooltip="STEP, EPOCH, SECOND, MINUTE, HOUR, or NEVER.")

    @field_validator("resolution")
    @classmethod
    def _resolution_parses(cls, value: str) -> str:
        parse_resolution(value)  # raises with the bad item named
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        """OneTrainer writes `compile` as true/false."""
        if isinstance(value, bool):
            return CompileMode.ON if value else CompileMode.OFF
        return value

    @field_validator("additional_embeddings")
    @classmethod
    def _placeholders_differ(cls, value: list) -> list:
        seen: set[str] = set()
        for index, embedding in enumerate(value):
            if embedding.placeholder in seen:
                raise ValueError(f"placeholder {embedding.placeholder} is used twice (entry "
                                 f"{index}); each embedding needs its own")
            seen.add(embedding.placeholder)
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_embedding(cls, data: Any) -> Any:
        """EMBEDDING with no embedding listed trains OneTrainer's default one (its `embedding`:
        <embedding>, one token, from '*'), so that its EMBEDDING presets run as they are. A
        list that is given, even an empty one, is kept (check_supported refuses an empty one)."""
        if isinstance(data, dict) and "additional_embeddings" not in data:
            method = data.get("training_method")
            if getattr(method, "value", method) == TrainingMethod.EMBEDDING.value:
                data = {**data, "additional_embeddings": [{}]}
        return data

    @field_validator("lokr_decompose_factor")
    @classmethod
    def _factor_is_automatic_or_positive(cls, value: int) -> int:
        if value == 0:
            raise ValueError("use -1 (automatic) or a factor of 1 or more")
        return value

    @model_validator(mode="before")
    @classmethod
    def _absent_parts_do_not_train(cls, data: Any) -> Any:
        """A part the family lacks (a UNet in Flux.1, a second text encoder in SD 1.5) has its
        train switch read as off, as OneTrainer does (it writes every part's switch, on, for
        every model type). A T5 (Chroma's only text encoder) is off unless a config says
        otherwise, which check_family then refuses with the reason."""
        if not isinstance(data, dict):
            return data
        model = data.get("model_type", ModelType.STABLE_DIFFUSION_15)
        try:
            parts = registry.facts(model).parts
        except ValueError:
            return data  # an unknown model type: its field's validation names it
        for part, kind in registry.text_encoder_kinds(model).items():
            section = data.get(part)
            if kind in FROZEN_ENCODERS and (section is None or (
                    isinstance(section, dict) and "train" not in section)):
                # T5 is never trained here (check_family): not given, it is off
                data = {**data, part: {**(section or {}), "train": False}}
        for part in registry.ALL_PARTS:
            if part in parts:
                continue
            section = data.get(part)
            if section is None:  # read as off even when not given: a dump reloads the same
                data = {**data, part: {"train": False}}
            elif isinstance(section, dict) and section.get("train", True):
                data = {**data, part: {**section, "train": False}}
            elif isinstance(section, BaseModel) and getattr(section, "train", False):
                data = {**data, part: section.model_copy(update={"train": False})}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_output_format(cls, data: Any) -> Any:
        """No output format given: the training method's own default (OneTrainer's), so that
        `{"training_method": "FINE_TUNE"}` is a valid config. A format that is given is kept
        as it is, even a wrong one: check_supported refuses that by name."""
        if isinstance(data, dict) and "output_model_format" not in data:
            method = data.get("training_method", TrainingMethod.LORA)
            model = data.get("model_type", ModelType.STABLE_DIFFUSION_15)
            try:
                formats = output_formats(model, method)
            except ValueError:
                return data  # an unknown model type: its field's validation names it
            if formats:
                data = {**data, "output_model_format": formats[0]}
        return data

    # -- derived values ----------------------------------------------------------------------

    def part_learning_rate(self, part: str) -> float:
        """The override rule: a part's own LR when set, else the base LR ("embeddings": the
        embedding_learning_rate)."""
        own = (self.embedding_learning_rate if part == "embeddings"
               else getattr(self, part).learning_rate)
        return own if own is not None else self.learning_rate

    def offload_fraction_of(self, part: str) -> float:
        """The share of `part`'s frozen weights streamed from CPU memory (trainer/
        layer_offload.py): its own offload_fraction, else the older layer_offload_fraction,
        which streams the denoiser and each trained text encoder whose checkpointing is on."""
        own = getattr(self, part).offload_fraction
        if own > 0 or self.layer_offload_fraction <= 0:
            return own
        if part == self.model_type.facts.denoiser:
            return self.layer_offload_fraction
        section = getattr(self, part)
        trained = self.training_method != TrainingMethod.EMBEDDING and section.train
        return self.layer_offload_fraction if trained and section.gradient_checkpointing else 0.0

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2)


# --- Resolution ---------------------------------------------------------------------------

class TargetSize(NamedTuple):
    """One entry of the resolution setting. `exact` = written as WIDTHxHEIGHT: trained at that
    very size. A plain size (512) is a square whose pixel area the aspect buckets share."""
    width: int
    height: int
    exact: bool = False


MAX_RESOLUTION = 8192


def parse_resolution(value: str) -> list[TargetSize]:
    """'512' -> [512x512]; '384,512,640' -> three sizes (each step trains at a random one of
    them); '768x512' -> [width 768, height 512, exact]. A malformed value raises ValueError
    naming the bad item."""
    text = str(value).strip()
    if not text:
        raise ValueError("resolution is empty; give a size like 512, a list like 384,512,640 "
                         "or an exact size like 768x512")
    items = text.split(",")
    sizes: list[TargetSize] = []
    for position, raw in enumerate(items, 1):
        item = raw.strip()
        where = f" (item {position} of '{text}')" if len(items) > 1 else ""
        if not item:
            raise ValueError(f"resolution item {position} of '{text}' is empty; remove the "
                             "extra comma")
        sides = [side.strip() for side in item.lower().split("x")]
        if len(sides) > 2:
            raise ValueError(f"resolution item '{item}'{where} is malformed; use 512 or 768x512")
        numbers = []
        for side in sides:
            if not side.isdigit():
                kind = ("a positive whole number" if side.lstrip("-").isdigit()
                        else "a whole number")
                raise ValueError(f"resolution item '{item}'{where}: '{side}' is not {kind}")
            number = int(side)
            if number < 8 or number % 8:
                raise ValueError(f"resolution item '{item}'{where}: sizes must be multiples of 8 "
                                 "and at least 8")
            if number > MAX_RESOLUTION:
                raise ValueError(f"resolution item '{item}'{where}: larger than "
                                 f"{MAX_RESOLUTION} pixels")
            numbers.append(number)
        sizes.append(TargetSize(numbers[0], numbers[-1], exact=len(numbers) == 2))
    return sizes


# --- Loading, layering, overrides ---------------------------------------------------------

def unknown_keys(data: Any, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Keys in `data` that `model` does not declare, as dotted paths (reported, then dropped)."""
    found: list[str] = []
    if not isinstance(data, dict):
        return found
    for key, value in data.items():
        if str(key).startswith("__"):  # "__comment" and the like: notes for people
            continue
        path = f"{prefix}{key}"
        field = model.model_fields.get(key)
        if field is None:
            found.append(path)
            continue
        sub = _submodel(field.annotation)
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                found += unknown_keys(item, sub, f"{path}[{i}].")
        else:
            found += unknown_keys(value, sub, f"{path}.")
    return found


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        sub = _submodel(arg)
        if sub is not None:
            return sub
    return None


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message} (got {_shown_input(item.get('input'))})")
    return "Invalid config — " + "; ".join(lines)


def _shown_input(value: Any, limit: int = 80) -> str:
    """A refused value as the message quotes it: cut short (a visitor may send megabytes, or
    an integer too long for Python to print)."""
    try:
        text = repr(value)
    except ValueError:
        return "a number too long to show"
    return text if len(text) <= limit else text[:limit] + "…"


def config_from_dict(data: dict, warn: Callable[[str], None] = print, *,
                     beside: Callable[[str], Any] | None = None,
                     onetrainer: bool | None = None) -> TrainConfig:
    """Validate a (possibly partial) dict into a TrainConfig; unknown keys warned, not fatal.
    `beside` finds the files a OneTrainer config names (its concepts); `onetrainer` says
    whether it is one (None: judged from its keys; trainer/onetrainer.py)."""
    if not isinstance(data, dict):
        raise ConfigError("The config must be a JSON object of keys and values.")
    from trainer.onetrainer import translate
    data, notes = translate(data, beside, onetrainer=onetrainer)  # OneTrainer's files
    for note in notes:
        warn(note)
    for key in unknown_keys(data, TrainConfig):
        warn(f"Unknown config key '{key}' ignored.")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None


def deep_merge(base: dict, over: dict) -> dict:
    """`over` layered on `base`: nested dicts merge key by key, everything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Config file '{path}' does not exist.") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"Config file '{path}' is not valid JSON: {error}") from None


def apply_override(data: dict, assignment: str) -> dict:
    """`a.b=value` (from --set) into a nested dict. The value is read as JSON when it parses
    (numbers, true/false, null, lists), else taken as a string."""
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}': expected key=value")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set '{assignment}': the key is empty")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    data = json.loads(json.dumps(data))  # a copy
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set '{assignment}': '{part}' is not a section")
    node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                presets: list[dict] = (), warn: Callable[[str], None] = print) -> TrainConfig:
    """Defaults <- presets (partial dicts, in order) <- the file <- --set overrides. A
    OneTrainer file is read as such (with the files beside it: its concepts)."""
    from trainer.onetrainer import files_beside, is_onetrainer
    data: dict = {}
    for preset in presets:
        data = deep_merge(data, preset)
    beside, onetrainer = None, None
    if path is not None:
        loaded = read_json(path)
        data = deep_merge(data, loaded)
        beside, onetrainer = files_beside(path), is_onetrainer(loaded) or None
    for assignment in overrides:
        data = apply_override(data, assignment)
    return config_from_dict(data, warn=warn, beside=beside, onetrainer=onetrainer)


# --- What the engine can run today ----------------------------------------------------------

def check_supported(config: TrainConfig) -> None:
    """Refuse settings the engine does not implement yet, naming the key, so that nothing a
    user sets is silently ignored."""
    def refuse(key: str, value: Any, hint: str = "") -> None:
        shown = value.value if isinstance(value, Enum) else value
        raise ConfigError(f"{key} = {shown} is not supported yet.{(' ' + hint) if hint else ''}")

    check_family(config)
    check_output_format(config)
    check_optimizer_and_scheduler(config)
    counted = (TimeUnit.EPOCH, TimeUnit.STEP, TimeUnit.NEVER)
    for key in registry.ALL_PARTS:
        unit = getattr(config, key).stop_training_after_unit
        if unit not in counted:
            raise ConfigError(f"{key}.stop_training_after_unit: {unit.value} is not a count; "
                              "use EPOCH, STEP or NEVER.")
    for name in ("learning_rate", "lora_alpha", "noising_weight", "noising_bias",
                 "timestep_shift"):
        value = getattr(config, name)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number (got {value}).")
    check_timestep_draw(config)
    check_adapter_type(config)
    check_embeddings(config)
    check_quantization(config)
    from trainer.regularization import check_regularization
    check_regularization(config)
    from trainer.layer_offload import check_layer_offload
    check_layer_offload(config)  # the process count is checked again at the start
    from trainer.optim.stochastic_rounding import check_stochastic_rounding
    check_stochastic_rounding(config)


# LoRA files whose DoRA scale is computed from the base weights (trainer/lora.py dora_scale).
DORA_SCALE_FORMATS = ("KOHYA_LORA", "LEGACY_LORA", "COMFY_LORA")


def check_gguf(config: TrainConfig) -> None:
    """GGUF (OneTrainer's): the transformer read pre-quantized from the .gguf file that
    transformer.model_name names, and such a file read that way only. Its layers hold their
    weights packed (diffusers' GGUFLinear), so no DoRA trains on them: peft computes its
    magnitudes from the base weight as stored."""
    facts = config.model_type.facts
    for part in (*facts.parts, "vae"):
        if part != "transformer" and getattr(config, part).weight_dtype == DataType.GGUF:
            raise ConfigError(f"{part}.weight_dtype = GGUF: only a transformer is read from a "
                              ".gguf file (transformer.model_name); choose FLOAT_8, INT_8 or "
                              f"NFLOAT_4 to store the {part} quantized.")
    if "transformer" not in facts.parts:
        return
    name = config.transformer.model_name or ""
    gguf_file = name.strip().lower().endswith(GGUF_SUFFIX)
    stored_as_gguf = config.transformer.weight_dtype == DataType.GGUF
    if stored_as_gguf and not gguf_file:
        raise ConfigError("transformer.weight_dtype = GGUF reads the transformer pre-quantized "
                          "from a .gguf file: set transformer.model_name to one (city96's "
                          f"quantized {facts.label} transformers)"
                          + (f"; '{name}' is not one." if name else "."))
    if gguf_file and not stored_as_gguf:
        raise ConfigError(f"transformer.model_name: '{name}' is a GGUF file, whose weights are "
                          "stored quantized: set transformer.weight_dtype to GGUF.")
    if not stored_as_gguf or not config.transformer.train:
        return
    # (LoHa and LoKr, which peft would size from the packed weights, are not built for the
    # flow families at all: check_adapter_type)
    if config.training_method == TrainingMethod.LORA and config.lora_decompose:
        raise ConfigError("lora_decompose (DoRA) with transformer.weight_dtype = GGUF: DoRA's "
                          "magnitudes are computed from the base weights, which the GGUF "
                          "layers hold packed; switch DoRA off, or use a .safetensors "
                          "transformer stored in FLOAT_8.")


def check_quantization(config: TrainConfig) -> None:
    """Quantized weight types (trainer/quantization.py) store frozen weights: never a compute or
    file type, never a fine-tuned part's, and, stored by bitsandbytes, not where Atelier would
    read their values back yet. Whether bitsandbytes runs on the device is checked at the start
    (quantization.check_device)."""
    for key in ("train_dtype", "output_dtype"):
        value = getattr(config, key).value
        if value in QUANTIZED_TYPES:
            what = "compute" if key == "train_dtype" else "file"
            raise ConfigError(f"{key} = {value} is a storage type of frozen weights, not a "
                              f"{what} type; choose {', '.join(FLOAT_TYPES)}.")
    check_gguf(config)
    facts = config.model_type.facts
    quantized = {part: getattr(config, part).weight_dtype.value for part in (*facts.parts, "vae")
                 if getattr(config, part).weight_dtype.value in QUANTIZED_TYPES}
    method = config.training_method
    for part, value in quantized.items():
        # layer streaming (trainer/layer_offload.py)
        fraction = config.offload_fraction_of(part) if part != "vae" else 0.0
        if fraction > 0 and value in ("INT_8", "NFLOAT_4"):
            key = ("layer_offload_fraction" if getattr(config, part).offload_fraction <= 0
                   else f"{part}.offload_fraction")
            raise ConfigError(f"{key} = {fraction:g} with "
                              f"{part}.weight_dtype = {value}: streaming moves a block's "
                              "parameters, not the scales bitsandbytes keeps beside them; store "
                              f"the {part} in FLOAT_8 (which streams) or set the fraction to 0.")
        if part == "vae" or not getattr(config, part).train:
            continue
        if method == TrainingMethod.FINE_TUNE:
            raise ConfigError(f"{part}.weight_dtype = {value}: a fine-tuned part trains its own "
                              "weights, which are not stored quantized; choose BFLOAT_16 or "
                              f"FLOAT_32 for the {part}, or train a LoRA on it.")
        packed = value in ("INT_8", "NFLOAT_4")
        if method != TrainingMethod.LORA or not packed:
            continue
        # bitsandbytes holds the weights packed; peft's LoHa / LoKr and the writers below read
        # the shapes or values of plain (or FLOAT_8) base weights only
        fmt = config.output_model_format.value
        if value == "NFLOAT_4" and config.peft_type != PeftType.LORA:
            raise ConfigError(f"peft_type = {config.peft_type.value} with {part}.weight_dtype = "
                              "NFLOAT_4: peft sizes LoHa and LoKr factors from the base weight's "
                              "shape, which bitsandbytes' 4-bit layer holds packed; use peft_type "
                              f"LORA, or store the {part} in FLOAT_8 or INT_8.")
        if config.lora_decompose and fmt in DORA_SCALE_FORMATS:
            raise ConfigError(f"lora_decompose (DoRA) with {part}.weight_dtype = {value}: the "
                              f"{fmt} file's dora_scale is computed from the base weights, which "
                              "bitsandbytes holds quantized; write DIFFUSERS_LORA, or store the "
                              f"{part} in FLOAT_8.")
        if config.lora_decompose and config.lora_model_name:
            raise ConfigError(f"lora_model_name with DoRA and {part}.weight_dtype = {value}: "
                              "continuing a DoRA file reads the base weights, which "
                              f"bitsandbytes holds quantized; store the {part} in FLOAT_8.")
        if value == "NFLOAT_4" and part == facts.denoiser and facts.flow_matching \
                and fmt != "DIFFUSERS_LORA":
            raise ConfigError(f"output_model_format = {fmt} with {part}.weight_dtype = NFLOAT_4: "
                              f"{facts.label}'s {fmt} names the fused q/k/v layers, sized from "
                              "the base weights, which bitsandbytes holds packed; write "
                              "DIFFUSERS_LORA, or store the transformer in FLOAT_8 or INT_8.")
    settings = config.quantization
    if facts.denoiser not in quantized:
        return  # the filter picks among the denoiser's layers only: nothing to pick here
    preset = settings.layer_filter_preset
    if preset == LoraLayerPreset.CUSTOM:
        if settings.layer_filter_regex:
            for pattern in settings.layer_filter.split(","):
                try:
                    re.compile(pattern.strip())
                except re.error as error:
                    raise ConfigError(f"quantization.layer_filter: {pattern.strip()!r} is not a "
                                      f"valid regular expression ({error}).") from None
        return
    presets = registry.family_class(config.model_type).LAYER_PRESETS  # OneTrainer's
    if preset.value not in presets:
        raise ConfigError(f"quantization.layer_filter_preset = {preset.value} is not a layer "
                          f"preset of {facts.label}; it has {', '.join(presets)} (or custom).")


def check_embeddings(config: TrainConfig) -> None:
    """Additional embeddings train with a LoRA (pivotal tuning) or alone (EMBEDDING); what
    cannot hold or train them is refused here, with the reason."""
    embeddings = config.additional_embeddings
    method = config.training_method
    for index, embedding in enumerate(embeddings):
        unit = embedding.stop_training_after_unit
        if unit not in (TimeUnit.EPOCH, TimeUnit.STEP, TimeUnit.NEVER):
            raise ConfigError(f"additional_embeddings[{index}].stop_training_after_unit: "
                              f"{unit.value} is not a count; use EPOCH, STEP or NEVER.")
    if not embeddings:
        if method == TrainingMethod.EMBEDDING:
            raise ConfigError("additional_embeddings: training_method EMBEDDING trains "
                              "embeddings; add at least one (a placeholder such as <mychar>).")
        return
    if method == TrainingMethod.FINE_TUNE:
        raise ConfigError("additional_embeddings: embeddings train with training_method LORA "
                          "(pivotal tuning) or EMBEDDING; a fine-tuned checkpoint has no place "
                          "for them. Remove them or choose LORA.")
    encoders = config.model_type.facts.text_encoders
    trains = any(e.train for e in embeddings) and any(
        getattr(config, part).train_embedding for part in encoders)
    if method == TrainingMethod.EMBEDDING and not trains:
        raise ConfigError("additional_embeddings: training_method EMBEDDING trains only the "
                          "embeddings, and none of them trains; switch an embedding's train on "
                          "(and text_encoder.train_embedding).")
    if (method == TrainingMethod.LORA and config.bundle_additional_embeddings
            and config.output_model_format == ModelFormat.DIFFUSERS_LORA):
        raise ConfigError("bundle_additional_embeddings: a DIFFUSERS_LORA file is read by "
                          "diffusers' load_lora_weights, which refuses bundle_emb keys; switch "
                          "bundling off (each embedding is also written as its own file, which "
                          "load_textual_inversion reads) or use KOHYA_LORA.")



def check_adapter_type(config: TrainConfig) -> None:
    """DoRA is a LoRA option, and each adapter type is written only where it has a layout."""
    if config.training_method != TrainingMethod.LORA:
        return
    peft_type = config.peft_type
    if config.lora_decompose and peft_type != PeftType.LORA:
        raise ConfigError(f"lora_decompose (DoRA) works only with peft_type LORA, not "
                          f"{peft_type.value}; switch one of them off.")
    facts = config.model_type.facts
    if facts.flow_matching and peft_type != PeftType.LORA:
        # KOHYA_LORA / COMFY_LORA name the original fused layers (q, k, v as one), on which
        # a LoHa or LoKr of diffusers' separate layers has no exact form; diffusers loads
        # neither for these models.
        raise ConfigError(f"peft_type {peft_type.value} is not available for {facts.label} "
                          "yet: its LoRA files name the original fused q/k/v layers, where a "
                          "LoHa or LoKr trained on the separate layers has no exact form. "
                          "Use peft_type LORA (DoRA with DIFFUSERS_LORA).")
    if (facts.flow_matching and config.lora_decompose
            and config.output_model_format != ModelFormat.DIFFUSERS_LORA):
        raise ConfigError(f"lora_decompose (DoRA) on {facts.label} is written as "
                          "DIFFUSERS_LORA only (a magnitude per separate q/k/v layer has no "
                          "place on the fused layers that KOHYA_LORA / COMFY_LORA name); "
                          "choose output_model_format DIFFUSERS_LORA.")
    fitting = [f for f in output_formats(config.model_type, TrainingMethod.LORA)
               if f in ADAPTER_FORMATS[peft_type.value]]
    if config.output_model_format.value not in fitting:
        raise ConfigError(f"output_model_format = {config.output_model_format.value} cannot "
                          f"hold peft_type {peft_type.value} (diffusers loads no LoHa/LoKr for "
                          f"{config.model_type.facts.label}); use {', '.join(fitting)}.")


def check_output_format(config: TrainConfig) -> None:
    """A LoRA is written in a LoRA format, a fine-tune as a whole model, each in a format the
    family writes."""
    method = config.training_method.value
    value = config.output_model_format.value
    fitting = output_formats(config.model_type, method)
    if value in fitting:
        return
    label = config.model_type.facts.label
    if value in OUTPUT_FORMATS_ANY.get(method, []):
        raise ConfigError(f"output_model_format = {value}: Atelier writes no {value} for "
                          f"{label}; for training_method {method} it writes "
                          f"{', '.join(fitting)}.")
    raise ConfigError(f"output_model_format = {value} does not fit training_method "
                      f"{method}; it writes {', '.join(fitting)}.")


def check_timestep_draw(config: TrainConfig) -> None:
    """The timestep distribution's settings draw (a LOGIT_NORMAL spread above 0, a discrete
    density with weight somewhere): tried once here, so that Start names the key, not step 1."""
    import torch

    from trainer.flow_matching import draw_timesteps
    draw_timesteps(2, distribution=config.timestep_distribution,
                   noising_weight=config.noising_weight, noising_bias=config.noising_bias,
                   min_strength=config.min_noising_strength,
                   max_strength=config.max_noising_strength, shift=config.timestep_shift,
                   generator=torch.Generator().manual_seed(0))  # its own: the run's stays


def check_family(config: TrainConfig) -> None:
    """What the chosen family cannot do (yet), refused naming the key and why: its training
    objective's loss weights, its T5 encoder trained, clip skip on a T5, embeddings on the
    flow-matching families."""
    facts = config.model_type.facts
    label = facts.label
    flow = facts.flow_matching
    weight = config.loss_weight_fn
    if flow:
        if config.min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma = {config.min_snr_gamma:g}: min-SNR weighting is "
                              f"a DDPM (SD 1.5 / SDXL) rule; {label} is a flow-matching model. "
                              "Set it to 0 (loss_weight_fn SIGMA weights by noise level).")
        if weight not in FLOW_LOSS_WEIGHTS:
            raise ConfigError(f"loss_weight_fn = {weight.value}: {label} is a flow-matching "
                              "model, weighted by CONSTANT or SIGMA only.")
    elif weight != LossWeight.CONSTANT:
        hint = ("set min_snr_gamma (the gamma) instead" if weight == LossWeight.MIN_SNR_GAMMA
                else "SD 1.5 / SDXL weigh by min_snr_gamma or CONSTANT")
        raise ConfigError(f"loss_weight_fn = {weight.value} is not supported for {label}; "
                          f"{hint}.")
    for part, kind in registry.text_encoder_kinds(config.model_type).items():
        section = getattr(config, part)
        if kind not in FROZEN_ENCODERS:
            continue
        if section.train:
            raise ConfigError(f"{part}.train: {kind} training is not supported: {label}'s "
                              f"{part} is {kind}, which Atelier keeps frozen (as OneTrainer's "
                              "presets do); switch it off.")
        if section.clip_skip:
            raise ConfigError(f"{part}.clip_skip = {section.clip_skip}: {label}'s {part} is "
                              f"{kind}; clip skip is for CLIP encoders. Set it to 0.")
    if flow and config.training_method == TrainingMethod.EMBEDDING:
        raise ConfigError(f"training_method = EMBEDDING: additional_embeddings are not "
                          f"available for {label} yet; train a LoRA or fine-tune.")
    if flow and config.additional_embeddings:
        raise ConfigError(f"additional_embeddings: not available for {label} yet; remove "
                          "them.")
    if config.dynamic_timestep_shifting and not registry.reads_switch(
            config.model_type, "dynamic_timestep_shifting"):
        raise ConfigError(f"dynamic_timestep_shifting: {label}'s scheduler has no "
                          "resolution-dependent shift here (it applies to "
                          f"{', '.join(types_reading('dynamic_timestep_shifting'))}, as in "
                          "OneTrainer); switch it off and set timestep_shift instead.")
    preset = config.lora_layer_preset
    if config.training_method == TrainingMethod.LORA and preset != LoraLayerPreset.CUSTOM:
        presets = registry.family_class(config.model_type).LAYER_PRESETS  # OneTrainer's
        if preset.value not in presets:
            raise ConfigError(f"lora_layer_preset = {preset.value} is not a layer preset of "
                              f"{label}; it has {', '.join(presets)} (or custom).")


def check_optimizer_and_scheduler(config: TrainConfig) -> None:
    """The optimizer's parameters are valid, and the optimizer and the schedule agree."""
    from trainer.optim.registry import resolve_parameters
    values = config.optimizer.model_dump(exclude={"optimizer"})
    params = resolve_parameters(config.optimizer.optimizer, values)
    relative = config.optimizer.optimizer == Optimizer.ADAFACTOR and params["relative_step"]
    scheduler = config.learning_rate_scheduler
    if relative and scheduler != LearningRateScheduler.ADAFACTOR:
        raise ConfigError("learning_rate_scheduler must be ADAFACTOR when optimizer.relative_step "
                          "is on: Adafactor then sets the learning rate itself.")
    if scheduler == LearningRateScheduler.ADAFACTOR and not relative:
        raise ConfigError("learning_rate_scheduler ADAFACTOR needs optimizer ADAFACTOR with "
                          "optimizer.relative_step on; choose another schedule otherwise.")
    if scheduler == LearningRateScheduler.CUSTOM and "." not in config.custom_learning_rate_scheduler:
        raise ConfigError("custom_learning_rate_scheduler: give the class as module.Class "
                          "(e.g. torch.optim.lr_scheduler.StepLR).")
