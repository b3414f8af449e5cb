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
    text_encoders: tuple[str, ...]  # config part names, in the model's order
    objective: str                # "ddpm" (ε / v-prediction) or "flow" (flow matching)
    bucket_quantum: int = 8       # bucket sides are multiples of this (pixels)
    inpainting: bool = False      # the denoiser also reads a mask and the masked image
    plain: str = ""               # the same family without inpainting ("" = itself)

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


_SD15 = ("text_encoder",)
_SDXL = ("text_encoder", "text_encoder_2")

FAMILIES: dict[str, FamilyFacts] = {f.model_type: f for f in (
    _sd("STABLE_DIFFUSION_15", "Stable Diffusion 1.5", "trainer.models.sd15", "SD15Family",
        _SD15, 8, False),
    _sd("STABLE_DIFFUSION_15_INPAINTING", "Stable Diffusion 1.5 inpainting",
        "trainer.models.sd15", "SD15Family", _SD15, 8, True, "STABLE_DIFFUSION_15"),
    _sd("STABLE_DIFFUSION_XL_10_BASE", "SDXL", "trainer.models.sdxl", "SDXLFamily", _SDXL, 64,
        False),
    _sd("STABLE_DIFFUSION_XL_10_BASE_INPAINTING", "SDXL inpainting", "trainer.models.sdxl",
        "SDXLFamily", _SDXL, 64, True, "STABLE_DIFFUSION_XL_10_BASE"),
    # Flux.1 dev and schnell: CLIP-L (text_encoder) + T5 (text_encoder_2), as OneTrainer
    # numbers them; 2x2-packed latents of an 8x VAE: sides in multiples of 16.
    FamilyFacts("FLUX_DEV_1", "Flux.1", "trainer.models.flux", "FluxFamily", "transformer",
                ("text_encoder", "text_encoder_2"), "flow", 16),
    # Chroma: T5 only (OneTrainer's text_encoder).
    FamilyFacts("CHROMA_1", "Chroma", "trainer.models.chroma", "ChromaFamily", "transformer",
                ("text_encoder",), "flow", 16),
    # SD 3 / 3.5: CLIP-L, CLIP-G (both with projection) and T5.
    FamilyFacts("STABLE_DIFFUSION_3", "Stable Diffusion 3", "trainer.models.sd3", "SD3Family",
                "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"), "flow", 16),
    FamilyFacts("STABLE_DIFFUSION_35", "Stable Diffusion 3.5", "trainer.models.sd3", "SD3Family",
                "transformer", ("text_encoder", "text_encoder_2", "text_encoder_3"), "flow", 16),
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


# What each family's text encoders are, in `text_encoders` order, by family module (SD 1.5 and
# its inpainting model share one). The page labels each encoder's section with it ("Text
# encoder 2 (T5)"), and the config reads it: T5 is never trained here, clip skip is a CLIP
# setting, and a T5's sequence length is OneTrainer's key of that encoder.
_TEXT_ENCODER_KINDS = {
    "trainer.models.sd15": ("CLIP",),
    "trainer.models.sdxl": ("CLIP-L", "CLIP-G"),
    "trainer.models.flux": ("CLIP-L", "T5"),
    "trainer.models.chroma": ("T5",),
    "trainer.models.sd3": ("CLIP-L", "CLIP-G", "T5"),
}


def text_encoder_kinds(model_type) -> dict[str, str]:
    """{text encoder part: what it is ("CLIP", "CLIP-L", "CLIP-G", "T5")} of a family."""
    f = facts(model_type)
    return dict(zip(f.text_encoders, _TEXT_ENCODER_KINDS[f.module]))
