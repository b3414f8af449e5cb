"""The model families: the one place that lists them.

Each `model_type` (OneTrainer's names) maps to the facts the rest of the program asks before a
model is loaded (which parts it has, its denoiser, its training objective, what it is called)
and to the module whose class loads and drives it. This module imports nothing heavy: the
config reads it to say which fields apply to which family; the family's own module (diffusers,
transformers) is imported only by `family_class`.

Adding a family: one module under trainer/models/, one `FamilyFacts` line here, one
`ModelType` member in trainer/config.py, and its tests.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class FamilyFacts:
    model_type: str               # OneTrainer's model_type value
    label: str                    # what the page and model cards call it
    module: str                   # the family's module, holding `class_name`
    class_name: str
    denoiser: str                 # the part that predicts: "unet" or "transformer"
    # config part name -> what the encoder is ("CLIP", "CLIP-L", "CLIP-G", "T5"), in the
    # model's order. The page labels each encoder's section with it ("Text encoder 2 (T5)");
    # the config reads it: a T5 is never trained here, clip skip is a CLIP setting.
    encoders: tuple[tuple[str, str], ...]
    objective: str                # "ddpm" (ε / v-prediction) or "flow" (flow matching)
    bucket_quantum: int = 8       # bucket sides are multiples of this (pixels)
    inpainting: bool = False      # the denoiser also reads a mask and the masked image
    plain: str = ""               # the same family without inpainting ("" = itself)
    # OneTrainer's family-specific settings the family reads (dotted config keys): the page
    # shows only these, the config refuses them elsewhere.
    switches: tuple[str, ...] = ()
    # The standard model's dynamic-shift constants (its scheduler_config.json) where they are
    # not Flux.1-dev's: what the page's timestep preview uses for a hub id it does not read.
    scheduler: tuple[tuple[str, object], ...] = ()

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text encoders' config part names, in the model's order."""
        return tuple(part for part, _ in self.encoders)

    @property
    def parts(self) -> tuple[str, ...]:
        """Every trainable part: the text encoders, then the denoiser."""
        return (*self.text_encoders, self.denoiser)

    @property
    def plain_type(self) -> str:
        return self.plain or self.model_type

    @property
    def flow_matching(self) -> bool:
        return self.objective == "flow"


def _sd(model_type: str, label: str, module: str, class_name: str, encoders, quantum: int,
        inpainting: bool, plain: str = "") -> FamilyFacts:
    return FamilyFacts(model_type, label, module, class_name, "unet", encoders, "ddpm",
                       quantum, inpainting, plain)


def _flow(model_type: str, label: str, module: str, class_name: str, encoders,
          switches: tuple[str, ...] = (), scheduler: dict | None = None) -> FamilyFacts:
    """A flow-matching transformer on 2x2-packed (or 2x2-patched) latents of an 8x VAE: bucket
    sides in multiples of 16."""
    return FamilyFacts(model_type, label, module, class_name, "transformer", encoders, "flow",
                       16, switches=switches, scheduler=tuple((scheduler or {}).items()))


_SD15 = (("text_encoder", "CLIP"),)
_SDXL = (("text_encoder", "CLIP-L"), ("text_encoder_2", "CLIP-G"))
_SD3 = (("text_encoder", "CLIP-L"), ("text_encoder_2", "CLIP-G"), ("text_encoder_3", "T5"))
GUIDANCE, MASK, DYNAMIC = ("transformer.guidance_scale", "transformer.attention_mask",
                           "dynamic_timestep_shifting")

FAMILIES: dict[str, FamilyFacts] = {f.model_type: f for f in (
    _sd("STABLE_DIFFUSION_15", "Stable Diffusion 1.5", "trainer.models.sd15", "SD15Family",
        _SD15, 8, False),
    _sd("STABLE_DIFFUSION_15_INPAINTING", "Stable Diffusion 1.5 inpainting",
        "trainer.models.sd15", "SD15Family", _SD15, 8, True, "STABLE_DIFFUSION_15"),
    _sd("STABLE_DIFFUSION_XL_10_BASE", "SDXL", "trainer.models.sdxl", "SDXLFamily", _SDXL, 64,
        False),
    _sd("STABLE_DIFFUSION_XL_10_BASE_INPAINTING", "SDXL inpainting", "trainer.models.sdxl",
        "SDXLFamily", _SDXL, 64, True, "STABLE_DIFFUSION_XL_10_BASE"),
    # Flux.1 dev and schnell: CLIP-L + T5, as OneTrainer numbers them; OneTrainer applies
    # dynamic shifting to Flux.1 only.
    _flow("FLUX_DEV_1", "Flux.1", "trainer.models.flux", "FluxFamily",
          (("text_encoder", "CLIP-L"), ("text_encoder_2", "T5")), (GUIDANCE, MASK, DYNAMIC)),
    # Chroma: T5 only (OneTrainer's text_encoder), always masked.
    _flow("CHROMA_1", "Chroma", "trainer.models.chroma", "ChromaFamily",
          (("text_encoder", "T5"),)),
    _flow("STABLE_DIFFUSION_3", "Stable Diffusion 3", "trainer.models.sd3", "SD3Family", _SD3,
          (MASK,)),
    _flow("STABLE_DIFFUSION_35", "Stable Diffusion 3.5", "trainer.models.sd3", "SD3Family",
          _SD3, (MASK,)),
    # Qwen-Image: a Qwen2.5-VL language model as its one, frozen, text encoder; OneTrainer
    # shifts it dynamically when asked.
    _flow("QWEN", "Qwen-Image", "trainer.models.qwen_image", "QwenImageFamily",
          (("text_encoder", "Qwen2.5-VL"),), (DYNAMIC,),
          dict(base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
               time_shift_type="exponential")),
    # Z-Image (and Turbo / De-Turbo): a Qwen3 language model as its one, frozen, text encoder;
    # OneTrainer applies dynamic shifting to it too.
    _flow("Z_IMAGE", "Z-Image", "trainer.models.z_image", "ZImageFamily",
          (("text_encoder", "Qwen3"),), (DYNAMIC,)),
    # Flux.2 klein (4B / 9B): a Qwen3 language model as its one, frozen, text encoder;
    # OneTrainer shifts it dynamically when asked.
    _flow("FLUX_2", "Flux.2 klein", "trainer.models.flux2", "Flux2Family",
          (("text_encoder", "Qwen3"),), (DYNAMIC, "text_encoder_sequence_length")),
)}

# Every part name any family has, in the order the page shows their sections.
ALL_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")


def facts(model_type) -> FamilyFacts:
    """The facts of a `ModelType` (or its value)."""
    value = str(getattr(model_type, "value", model_type))
    try:
        return FAMILIES[value]
    except KeyError:
        raise ValueError(f"model_type {value}: no such model family (choose one of "
                         f"{', '.join(FAMILIES)})") from None


def types_where(predicate) -> list[str]:
    """The model_type values whose facts satisfy `predicate` (for the config's applies_to)."""
    return [value for value, f in FAMILIES.items() if predicate(f)]


def types_with_part(part: str) -> list[str]:
    return types_where(lambda f: part in f.parts)


def family_class(model_type):
    """The family's class (imports its module: diffusers, transformers)."""
    f = facts(model_type)
    return getattr(importlib.import_module(f.module), f.class_name)




def text_encoder_kinds(model_type) -> dict[str, str]:
    """{text encoder part: what it is ("CLIP", "CLIP-L", "CLIP-G", "T5")} of a family."""
    return dict(facts(model_type).encoders)


def reads_switch(model_type, key: str) -> bool:
    """Whether the family reads the family-specific setting `key` (its dotted config key:
    transformer.guidance_scale, transformer.attention_mask, dynamic_timestep_shifting,
    text_encoder_sequence_length where the encoder is not a T5)."""
    return key in facts(model_type).switches
