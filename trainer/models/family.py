"""What the engine needs from a model family, behind one small interface, so the loop, the
data pipeline and the formats read the same for every family: load, encode captions, the
training objective, predict, name LoRA files, sample, export the whole model.

The families themselves live one per module (sd15.py, sdxl.py, flux.py, ...); registry.py
says which `model_type` is which. This module holds the interface and the helpers several
families share (the token-id cache, clip skip).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from trainer.config import TrainConfig
from trainer.errors import ConfigError
from trainer.models import registry

@dataclass
class ModelFamily:
    """The loaded models of one family and the family's conventions.

    `parts` maps the config's part names ("text_encoder", ..., "unet" or "transformer") to
    modules;
    the loop may replace a module with its accelerate-wrapped version (`wrapped`), while
    `parts` keeps the plain module for saving and sampling. `config` (when set) supplies the
    per-text-encoder caption dropout and clip skip.
    """
    components: Any
    vae: torch.nn.Module
    noise_scheduler: Any
    parts: dict[str, torch.nn.Module]
    kohya_prefixes: dict[str, str]            # part -> 'lora_unet_', 'lora_te_', ...
    base_model_version: str                   # ss_base_model_version
    lora_architecture: str                    # modelspec.architecture of a LoRA
    wrapped: dict[str, torch.nn.Module] = field(default_factory=dict)
    config: TrainConfig | None = field(default=None, repr=False)
    # Which entries of `encode_text`'s result depend on the caption alone (the text cache
    # stores those; `batch_conditioning` supplies the rest).
    text_cache_keys: tuple[str, ...] = ("encoder_hidden_states",)
    # An inpainting model: its UNet also reads the mask and the masked image's latents
    # (trainer/inpainting.py); samples use the family's inpainting pipeline.
    inpainting: bool = False
    # The run's additional embeddings (trainer/embeddings.py), set by the loop; saved with
    # the output.
    embeddings: Any = field(default=None, repr=False)
    # The registry's facts of the model type (parts, denoiser, objective kind, label).
    facts: registry.FamilyFacts | None = field(default=None, repr=False)
    # How a batch is noised and what the model learns (objectives.py); set by `load`.
    objective: Any = field(default=None, repr=False)
    # part -> called by `module(part)` before the part runs: a parked or dropped text encoder
    # comes back there (trainer/residency.py), also where a family runs a submodule of it.
    before_use: dict[str, Callable[[], None]] = field(default_factory=dict, repr=False)

    # OneTrainer's LoRA layer presets for the denoiser: preset -> parts of layer names (an
    # empty list: every linear and conv layer). "custom" is the config's own filter.
    LAYER_PRESETS: ClassVar[dict[str, list[str]]] = {}
    # The presets whose patterns are regular expressions (OneTrainer's for Z-Image); the
    # others are parts of layer names.
    REGEX_PRESETS: ClassVar[frozenset[str]] = frozenset()
    # Whether some layers a preset adapts take no part in the prediction (their adapters get
    # no gradient; DDP must then look for unused parameters at each step).
    UNUSED_LAYERS: ClassVar[bool] = False
    # An example denoiser layer name, for the message when a layer filter matches nothing.
    LAYER_NAME_EXAMPLE: ClassVar[str] = ""

    @classmethod
    def card(cls, model_type: str):
        """What a model card says of the family (trainer/model_card.py's FamilyCard)."""
        raise NotImplementedError

    @classmethod
    def load(cls, config: TrainConfig) -> "ModelFamily":
        """Load the model `config` names (base model, VAE) with its objective set."""
        raise NotImplementedError

    @property
    def denoiser(self) -> str:
        """The part name of the model that predicts ("unet" or "transformer")."""
        return self.facts.denoiser

    @property
    def part_names(self) -> tuple[str, ...]:
        """Every trainable part this family has (text encoders, then the denoiser)."""
        return self.facts.parts

    @property
    def checkpoint_architecture(self) -> str:
        """modelspec.architecture of a whole checkpoint of this family. SD 1.5 inpainting has
        an id of its own; SDXL inpainting has none, so it keeps the base model's."""
        architecture = self.lora_architecture.removesuffix("/lora")
        if self.inpainting and architecture == "stable-diffusion-v1":
            return "stable-diffusion-v1-inpainting"
        return architecture

    @property
    def implementation(self) -> str:
        """modelspec.implementation of a whole checkpoint: the original code's repository."""
        if "xl" in self.checkpoint_architecture:
            return "https://github.com/Stability-AI/generative-models"
        return "https://github.com/CompVis/stable-diffusion"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def module(self, part: str) -> torch.nn.Module:
        """The module to call in the training step (wrapped for DDP when trained), ready to
        run (`before_use`)."""
        if (ready := self.before_use.get(part)) is not None:
            ready()
        return self.wrapped.get(part, self.parts[part])

    def _setting(self, part: str, name: str, default):
        return getattr(getattr(self.config, part), name) if self.config is not None else default

    def encode_text(self, captions: list[str], batch: dict, *, clip_skip: int,
                    device: torch.device, grad: dict[str, bool]) -> dict[str, Any]:
        """The conditioning of `captions` (no caption dropout: see `caption_dropout`)."""
        raise NotImplementedError

    def text_cache_identity(self) -> list:
        """What, beyond the first two encoders, their clip skips and dtypes, decides the
        cached text outputs (a third encoder, a T5's sequence length, an attention mask)."""
        return []

    def batch_conditioning(self, batch: dict, device: torch.device) -> dict[str, Any]:
        """Conditioning that depends on the sample, not its caption (SDXL's sizes)."""
        return {}

    def caption_dropout(self, captions: list[str],
                        encode: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
        """`encode(captions)` with each text encoder's caption dropout applied."""
        raise NotImplementedError

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def pipeline(self):
        """An inference pipeline over the training components, for samples."""
        raise NotImplementedError

    def sample_inputs(self) -> dict[str, Any]:
        """Arguments of the pipeline call beyond the sample's own (prompt, size, steps, CFG)."""
        return {}

    def export_pipeline(self):
        """The pipeline a diffusers-folder export writes (the family's usual sampler)."""
        raise NotImplementedError

    def save_single_file(self, path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
        raise NotImplementedError


def hidden_states_before_last(out, clip_skip: int, layers_before_last: int, part: str):
    """The hidden states `layers_before_last + clip_skip` layers before the last one."""
    index = -1 - layers_before_last - clip_skip
    if -index > len(out.hidden_states):
        raise ConfigError(f"{part}.clip_skip {clip_skip}: this text encoder has only "
                          f"{len(out.hidden_states) - 1} layers.")
    return out.hidden_states[index]


def compute_dtype_of(module: torch.nn.Module) -> torch.dtype:
    """The type `module` computes in: its first floating-point parameter's. A quantized layer's
    packed codes are not it (a GGUF file's uint8 blocks, float8 codes); float32 for a module
    with no such parameter."""
    for parameter in module.parameters():
        if parameter.is_floating_point() and parameter.element_size() > 1:
            return parameter.dtype
    return torch.float32


# Set on a text encoder built on the meta device in place of its weights, which the run reads
# from the model's files only when the encoder first runs (trainer/residency.py's ReadAgain):
# a frozen encoder the text cache serves, whose every caption may be cached already.
READ_LATER = "_atelier_read_later"


def is_read_later(module: torch.nn.Module) -> bool:
    return bool(getattr(module, READ_LATER, False))


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small tensor of host values on the device. Built on the host and copied without
    blocking: `torch.tensor(..., device="cuda")` would wait for all queued GPU work first."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


# Token ids per tokenizer and caption. A trained text encoder sees the same captions every
# epoch; each is tokenised once, not at every step (padded to the full length, a caption's ids
# do not depend on the others in its batch).
_TOKEN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_KEPT_CAPTIONS = 20_000


# Tokenizers with additional embeddings (trainer/embeddings.py): their placeholders are
# written out as all of their tokens before tokenising.
_WITH_EMBEDDINGS: weakref.WeakSet = weakref.WeakSet()


def forget_tokenized(tokenizer) -> None:
    """The tokenizer gained tokens: captions tokenised before read differently now."""
    _TOKEN_IDS.pop(tokenizer, None)
    _WITH_EMBEDDINGS.add(tokenizer)


def tokenize(tokenizer, captions: list[str], device, max_length: int | None = None
             ) -> torch.Tensor:
    """[B, max_length] token ids (padded, truncated); `max_length` None: the tokenizer's."""
    max_length = max_length or tokenizer.model_max_length
    known = _TOKEN_IDS.setdefault(tokenizer, {}).setdefault(max_length, {})
    missing = [c for c in dict.fromkeys(captions) if c not in known]
    if missing:
        if len(known) + len(missing) > MAX_KEPT_CAPTIONS:
            known.clear()
        texts = missing
        if tokenizer in _WITH_EMBEDDINGS:
            from trainer.embeddings import expand_placeholders
            texts = expand_placeholders(missing, tokenizer)
        ids = tokenizer(texts, padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt").input_ids
        known.update(zip(missing, ids))
    return torch.stack([known[c] for c in captions]).to(device, non_blocking=True)


def load_family(config: TrainConfig) -> ModelFamily:
    """The model of `config.model_type`, loaded by its family's module."""
    family = registry.family_class(config.model_type).load(config)
    family.facts = registry.facts(config.model_type)
    return family
