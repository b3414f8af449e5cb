"""Warnings about the user's own settings and data, worked out before training starts, with
the numbers that make them actionable. The loop emits them (so the CLI prints them and the page
lists them); the page's LR preview shows the warm-up one before Start is even pressed."""
from __future__ import annotations

from typing import Sequence

from trainer.config import LearningRateScheduler, TrainConfig, output_formats
from trainer.optim.schedules import warmup_steps

NAMES_SHOWN = 3


def warmup_longer_than_run(config: TrainConfig, total_steps: int) -> str | None:
    """A warm-up of at least the whole run never lets the learning rate reach its value."""
    if total_steps <= 0 or config.learning_rate_scheduler in (LearningRateScheduler.CUSTOM,
                                                              LearningRateScheduler.ADAFACTOR):
        return None  # these schedules do not use learning_rate_warmup_steps
    warm = warmup_steps(config.learning_rate_warmup_steps, total_steps)
    if warm < total_steps:
        return None
    peak = (total_steps - 1) / warm  # the last update, still in the warm-up ramp
    return (f"The warm-up (learning_rate_warmup_steps {config.learning_rate_warmup_steps:g} = "
            f"{warm} steps) is longer than the whole run ({total_steps} optimizer steps): the "
            f"learning rate never reaches {config.learning_rate:g}; it ends at "
            f"{config.learning_rate * peak:.2g} ({peak:.1%} of it). Lower the warm-up (a value "
            f"≤ 1 is a fraction of the run, e.g. 0.1) or train for more steps.")


def images_without_masks(config: TrainConfig, items: Sequence) -> str | None:
    """With masked training on, images with no mask train on the whole image: say how many."""
    if not config.masked_training:
        return None
    bare = [item.image_path for item in items if item.mask_path is None]
    if not bare:
        return None
    names = ", ".join(f"'{path.name}'" for path in bare[:NAMES_SHOWN])
    more = f" and {len(bare) - NAMES_SHOWN} more" if len(bare) > NAMES_SHOWN else ""
    # An inpainting model learns (and is weighted) inside its conditioning mask, which for
    # these images is a random circle (trainer/inpainting.py).
    instead = ("learn to inpaint a random circle each epoch" if config.model_type.is_inpainting
               else "train on the whole image")
    return (f"masked_training is on, but {len(bare)} of {len(items)} images have no mask "
            f"(<image name>-masklabel.png beside the image) and {instead}: {names}{more}.")


# What ComfyUI's own LoRA loader leaves out of a format Atelier writes, by (model type, format,
# adapter), measured with tools/comfyui_check.py (docs/comfyui_results.md, whose rows
# tests/test_comfyui_check.py holds this table to).
_SD_ATTENTION = "every UNet attention projection, to_q/to_k/to_v/to_out.0"
_MAGNITUDES = "every DoRA magnitude: the layers change as a plain LoRA"
_SD3_PROJECTION = "the trained text encoders' text_projection layer"
_FLUX2_OUTSIDE_BLOCKS = ("the layers outside the blocks, the timestep embedder and the global "
                         "modulations, which the full preset adapts")
COMFYUI_PARTIAL: dict[tuple[str, str, str], str] = {
    **{(model_type, "DIFFUSERS_LORA", "LORA"): _SD_ATTENTION
       for model_type in ("STABLE_DIFFUSION_15", "STABLE_DIFFUSION_15_INPAINTING",
                          "STABLE_DIFFUSION_XL_10_BASE",
                          "STABLE_DIFFUSION_XL_10_BASE_INPAINTING")},
    # (the inpainting models' DoRA was not run; their LoRA rows show the same UNet names lost)
    **{(model_type, "DIFFUSERS_LORA", "DORA"): f"{_SD_ATTENTION}, and {_MAGNITUDES}"
       for model_type in ("STABLE_DIFFUSION_15", "STABLE_DIFFUSION_15_INPAINTING",
                          "STABLE_DIFFUSION_XL_10_BASE",
                          "STABLE_DIFFUSION_XL_10_BASE_INPAINTING")},
    **{(model_type, "DIFFUSERS_LORA", "DORA"): _MAGNITUDES
       for model_type in ("FLUX_DEV_1", "CHROMA_1")},
    **{(model_type, "DIFFUSERS_LORA", "DORA"): f"{_MAGNITUDES}, and {_SD3_PROJECTION}"
       for model_type in ("STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35")},
    **{(model_type, "DIFFUSERS_LORA", "LORA"): _SD3_PROJECTION
       for model_type in ("STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35")},
    **{(model_type, "DIFFUSERS_LORA", "DORA"): _MAGNITUDES for model_type in ("QWEN", "Z_IMAGE")},
    ("FLUX_2", "DIFFUSERS_LORA", "LORA"): _FLUX2_OUTSIDE_BLOCKS,
    ("FLUX_2", "DIFFUSERS_LORA", "DORA"): f"{_MAGNITUDES}, and {_FLUX2_OUTSIDE_BLOCKS}",
}
# ... of which these lose only a text encoder's layer: nothing when no text encoder trains.
COMFYUI_PARTIAL_TEXT_ENCODER_ONLY = {
    (model_type, "DIFFUSERS_LORA", "LORA")
    for model_type in ("STABLE_DIFFUSION_3", "STABLE_DIFFUSION_35")}
# ... and this one only layers outside the blocks: nothing with the attn-only or blocks preset.
COMFYUI_PARTIAL_OUTSIDE_BLOCKS = {("FLUX_2", "DIFFUSERS_LORA", "LORA")}


def adapter_kind(config: TrainConfig) -> str:
    """LORA, DORA, LOHA or LOKR: the adapter a LoRA run writes."""
    if config.peft_type.value == "LORA" and config.lora_decompose:
        return "DORA"
    return config.peft_type.value


def comfyui_loads_part(config: TrainConfig) -> str | None:
    """A LoRA format that ComfyUI loads only in part, chosen for this family and adapter: say
    what it drops (silently: only its log says "lora key not loaded") and what to choose."""
    if config.training_method.value != "LORA":
        return None
    fmt = config.output_model_format.value
    key = (config.model_type.value, fmt, adapter_kind(config))
    lost = COMFYUI_PARTIAL.get(key)
    if lost is None:
        return None
    if key in COMFYUI_PARTIAL_TEXT_ENCODER_ONLY and not any(
            getattr(config, part).train for part in config.model_type.facts.text_encoders):
        return None
    if key in COMFYUI_PARTIAL_OUTSIDE_BLOCKS and config.lora_layer_preset.value in (
            "attn-only", "blocks"):
        return None
    whole = [f for f in ("KOHYA_LORA", "COMFY_LORA")
             if f in output_formats(config.model_type, config.training_method)]
    instead = (" or ".join(whole) if not config.model_type.facts.flow_matching
               or adapter_kind(config) != "DORA" else "a plain LoRA (DoRA off)")
    if key in COMFYUI_PARTIAL_OUTSIDE_BLOCKS:
        instead += " (or the blocks layer preset)"
    return (f"output_model_format {fmt}: ComfyUI loads this file only in part for "
            f"{config.model_type.value} (it drops {lost}) and says so only in its log. For "
            f"ComfyUI choose {instead}.")
