"""What the flow-matching transformer families (Flux.1, Chroma, SD 3 / 3.5, Z-Image, Qwen-Image,
Flux.2) share: loading a diffusers folder or hub id (and a transformer file in the original
layout beside it), the flow-matching objective, caption dropout by zeroing an encoder's output
(or, for the Qwen-encoded families, by the empty caption), the transformer-only single file, a
VAE wrapper's plumbing, and the pipeline call's extra arguments. Each family's own module
(flux.py, chroma.py, sd3.py, z_image.py, ...) adds its text encoding, its prediction and its
pipeline.
"""
from __future__ import annotations

import contextlib
import contextvars
import pathlib
import random
from dataclasses import dataclass
from collections.abc import Callable, Collection, Iterator
from typing import Any, ClassVar

import torch

from trainer.config import GGUF_SUFFIX
from trainer.errors import ModelLoadError
from trainer.models import loading, registry
from trainer.models.family import READ_LATER, ModelFamily, to_device
from trainer.models.loading import BASE_FIELD, TRANSFORMER_FIELD
from trainer.models.objectives import FlowMatchingObjective
from trainer.quantization import BITSANDBYTES, prepare_gguf_transformer
from trainer.quantized_cache import cached_or
from trainer.quiet import hide_weight_loading_bars


@dataclass(frozen=True)
class FlowSpec:
    """How one flow family's diffusers folder is laid out."""
    name: str                              # "Flux.1": used in messages
    pipeline_class: type                   # FluxPipeline, ...
    pipeline_names: tuple[str, ...]        # model_index.json _class_name values it accepts
    transformer_class: type
    text_encoders: dict[str, type]         # subfolder (= config part) -> transformers class
    tokenizers: dict[str, type]            # subfolder -> tokenizer class
    layout: str                            # trainer/models/transformer_layouts.py family
    vae_class: type | None = None          # the VAE's diffusers class (None: AutoencoderKL)
    # For a family whose transformer files diffusers' own single-file converter reads as they
    # are (Z-Image, Qwen-Image, Flux.2): a file's tensors made ready for it, ValueError when
    # they are not this family's. None: transformer_layouts reads the file (Flux.1, Chroma).
    single_file_state: Callable[[dict], dict] | None = None


def load_flow_components(spec: FlowSpec, base_model_name: str, vae_name: str | None = None,
                         transformer_file: str = "", *,
                         dtypes: dict[str, torch.dtype] | None = None,
                         read_later: Collection[str] = ()) -> dict[str, Any]:
    """{tokenizers, text encoders, "vae", "transformer", "noise_scheduler"} of a diffusers
    folder or hub id; `transformer_file` (transformer.model_name), when given, replaces the
    folder's transformer with a .safetensors file in the original (BFL / SAI) layout.
    `dtypes`: the type each part is loaded in (float32 where not given). The text encoders in
    `read_later` are built on the meta device and marked (family.READ_LATER): the run reads
    their weights when they first run."""
    dtypes = dtypes or {}

    def dtype_of(part: str) -> torch.dtype:
        return dtypes.get(part, torch.float32)

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    hide_weight_loading_bars()
    source = loading.resolve_source(base_model_name, BASE_FIELD, None,
                                    hub_probe="model_index.json")
    if source.kind == "single_file":
        raise ModelLoadError(
            f"{BASE_FIELD}: '{base_model_name}' is a single file; a {spec.name} model is a "
            "diffusers folder (or hub id) for its text encoders and VAE. Give that folder as "
            "base_model_name and the transformer file as transformer.model_name.")
    where = source.location
    try:
        index = spec.pipeline_class.load_config(where)
    except Exception as err:  # noqa: BLE001
        raise loading.load_error(BASE_FIELD, where, err) from err
    name = str(index.get("_class_name", ""))
    if name not in spec.pipeline_names:
        raise ModelLoadError(
            f"{BASE_FIELD}: '{where}' is a {name or 'model of unknown type'}, not a {spec.name} "
            f"model; choose the model type that fits it.")
    parts: dict[str, Any] = {}
    try:
        for sub, cls in spec.tokenizers.items():
            parts[sub] = cls.from_pretrained(where, subfolder=sub)
        for sub, cls in spec.text_encoders.items():
            parts[sub] = (_skeleton(cls, where, sub) if sub in read_later
                          else _text_encoder(cls, where, sub, dtype_of(sub)))
        if not transformer_file:
            parts["transformer"] = cached_or("transformer", lambda: (
                spec.transformer_class.from_pretrained(
                    where, subfolder="transformer", use_safetensors=True,
                    torch_dtype=dtype_of("transformer"))))
        parts["vae"] = (spec.vae_class or AutoencoderKL).from_pretrained(
            where, subfolder="vae", use_safetensors=True, torch_dtype=dtype_of("vae"))
        parts["noise_scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(
            where, subfolder="scheduler")
    except Exception as err:  # noqa: BLE001 - any library failure is a load failure here
        raise loading.load_error(BASE_FIELD, where, err) from err
    if transformer_file:
        parts["transformer"] = cached_or("transformer", lambda: _transformer_from_file(
            spec, transformer_file, where, dtype_of("transformer")))
    if vae_name:
        parts["vae"] = loading.load_vae(vae_name, dict(parts["vae"].config),
                                        dtype=dtype_of("vae"))
    for name in (*spec.text_encoders, "vae", "transformer"):
        parts[name].eval()
    return parts


def _text_encoder(cls, where: str, part: str, dtype: torch.dtype) -> torch.nn.Module:
    """Text encoder `part` of the diffusers folder `where`, or the quantized cache's copy."""
    # transformers renamed its dtype keyword (torch_dtype -> dtype): `dtype` here
    return cached_or(part, lambda: cls.from_pretrained(where, subfolder=part,
                                                       use_safetensors=True, dtype=dtype))


def _skeleton(cls, where: str, part: str) -> torch.nn.Module:
    """Text encoder `part` of the folder `where` on the meta device (its config read, no
    weights), marked to be read when it first runs."""
    from accelerate import init_empty_weights
    config = cls.config_class.from_pretrained(where, subfolder=part)
    with init_empty_weights(include_buffers=True):
        module = cls(config)
    setattr(module, READ_LATER, True)
    return module.eval()


# Set by a training run around its `load_family` (`encoders_read_later`): only the run's
# placement and residency know to read an encoder built without weights.
_READ_LATER_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("read_later",
                                                                      default=False)


@contextlib.contextmanager
def encoders_read_later() -> Iterator[None]:
    """While a training run loads its family: the text encoders of `read_later_parts` are
    built without weights (any other caller of `load_family` gets every part read)."""
    token = _READ_LATER_ON.set(True)
    try:
        yield
    finally:
        _READ_LATER_ON.reset(token)


def read_later_parts(config) -> set[str]:
    """The text encoders a run reads from the files only when they first run: frozen ones the
    text cache serves (`text_cache_on`), which the run drops while it does (trainer/
    placement.py's `_reader`: not INT_8 / NFLOAT_4). With every caption cached already they
    are never read."""
    from trainer.data.loader import text_cache_on
    if not _READ_LATER_ON.get() or not text_cache_on(config):
        return set()
    return {part for part in config.model_type.facts.text_encoders
            if getattr(config, part).weight_dtype not in BITSANDBYTES}


def _transformer_from_file(spec: FlowSpec, path: str, config_folder: str, dtype):
    """The transformer of file `path` (transformer.model_name) on the base model's config: a
    .safetensors file, or a .gguf file read pre-quantized (weight_dtype GGUF), its layers
    computing in `dtype`."""
    from trainer.models.transformer_layouts import load_original_transformer
    source = loading.resolve_source(path, TRANSFORMER_FIELD, None, hub_probe="config.json")
    if source.kind != "single_file":
        raise ModelLoadError(f"{TRANSFORMER_FIELD}: '{path}' is not a .safetensors or .gguf "
                             "file.")
    gguf = source.location.lower().endswith(GGUF_SUFFIX)
    state = read_gguf(source.location, path) if gguf else None
    quantized = {"quantization_config": gguf_quantization(dtype)} if gguf else {}
    if spec.single_file_state is not None:
        transformer = _transformer_by_diffusers(spec, path, state or source.location,
                                                config_folder, dtype, quantized)
    else:
        try:
            transformer = load_original_transformer(
                spec.transformer_class, source.location if state is None else state,
                config=config_folder, subfolder="transformer", torch_dtype=dtype,
                name=pathlib.Path(path).name, **quantized)
        except ModelLoadError as err:
            raise ModelLoadError(f"{TRANSFORMER_FIELD}: {err}") from None
    if gguf:  # its backward pass dequantizes again: no full-precision copy kept per layer
        prepare_gguf_transformer(transformer, dtype)
    return transformer


def read_gguf(location: str, shown: str) -> dict[str, torch.Tensor]:
    """A .gguf file's tensors as diffusers reads them: the quantized ones as its GGUFParameter
    (packed bytes and their quantization type), the rest as plain tensors."""
    try:
        from diffusers.models.model_loading_utils import load_gguf_checkpoint
        return load_gguf_checkpoint(location)
    except ImportError as err:
        raise ModelLoadError(f"{TRANSFORMER_FIELD}: reading '{shown}' needs the gguf package "
                             f"({err}).") from None
    except Exception as err:  # noqa: BLE001 - gguf raises its own types for a broken file
        raise ModelLoadError(f"{TRANSFORMER_FIELD}: '{shown}' is not a readable GGUF file "
                             f"({type(err).__name__}: {err}).") from None


def gguf_quantization(dtype: torch.dtype):
    """diffusers' GGUF layers, dequantizing each weight into `dtype` (the train dtype) when
    their layer runs."""
    from diffusers import GGUFQuantizationConfig
    return GGUFQuantizationConfig(compute_dtype=dtype)


def _transformer_by_diffusers(spec: FlowSpec, path: str, source: str | dict, config_folder: str,
                              dtype, quantized: dict):
    """The transformer of a file diffusers' `from_single_file` reads (spec.single_file_state),
    on the config of the base model's folder; `source`: the file, or a GGUF file's tensors."""
    from safetensors.torch import load_file
    try:
        state = spec.single_file_state(source if isinstance(source, dict) else load_file(source))
        return spec.transformer_class.from_single_file(
            state, config=config_folder, subfolder="transformer", torch_dtype=dtype,
            local_files_only=True, **quantized)
    except Exception as err:  # noqa: BLE001 - the file does not fit this model
        raise ModelLoadError(
            f"{TRANSFORMER_FIELD}: '{path}' is not a {spec.name} transformer of this model's "
            f"shape ({type(err).__name__}).") from None


def load_dtypes(config) -> dict[str, torch.dtype]:
    """The type each part is loaded in: the type it is stored in while training (a quantized
    part's: the train dtype it is quantized from), so that a 12B-parameter transformer is never
    held in float32 on the host on its way to bfloat16; float32 for a part whose own weights
    train (a fine-tune's float32 masters are made from it)."""
    from trainer.config import TrainingMethod
    from trainer.loop import weight_dtypes
    dtypes = weight_dtypes(config, "cuda")  # FLOAT_16 on a CPU is refused later, by name
    if config.training_method == TrainingMethod.FINE_TUNE:
        for part in config.model_type.facts.parts:
            if getattr(config, part).train:
                dtypes[part] = torch.float32
    return dtypes


class FlowFamily(ModelFamily):
    """The shared half of a flow-matching transformer family."""

    SPEC: ClassVar[FlowSpec]
    # Conditioning keys each text encoder produces: caption dropout zeroes them per sample.
    DROPOUT_KEYS: ClassVar[dict[str, tuple[str, ...]]] = {}
    # How many latent pixels one image token covers per side (the dynamic shift reads it).
    PACKING: ClassVar[int] = 2

    @classmethod
    def load_components(cls, config) -> dict[str, Any]:
        return load_flow_components(cls.SPEC, config.base_model_name,
                                    config.vae_model_name or None,
                                    getattr(config.transformer, "model_name", "") or "",
                                    dtypes=load_dtypes(config),
                                    read_later=read_later_parts(config))

    @classmethod
    def objective_for(cls, scheduler, config) -> FlowMatchingObjective:
        # dynamic_timestep_shifting applies where the registry says (OneTrainer: Flux.1 only)
        dynamic = registry.reads_switch(config.model_type, registry.DYNAMIC)
        return FlowMatchingObjective(scheduler, config, packing=cls.PACKING,
                                     dynamic_shift=dynamic)

    def caption_dropout(self, captions, encode):
        """Each text encoder's output is zeroed per sample with that encoder's probability (as
        OneTrainer trains these models; their pipelines encode an empty prompt instead, which
        a frozen T5 maps near zero)."""
        conditioning = encode(captions)
        for part, keys in self.DROPOUT_KEYS.items():
            probability = self._setting(part, "caption_dropout_probability", 0.0)
            keep = [random.random() >= probability for _ in captions]
            if all(keep):
                continue
            for key in keys:
                value = conditioning[key]
                factor = to_device(keep, value.dtype, value.device)
                conditioning[key] = value * factor.view(-1, *([1] * (value.ndim - 1)))
        return conditioning

    def text_cache_identity(self) -> list:
        from trainer.data.cache import source_fingerprint
        config = self.config
        out = []
        for part in self.facts.text_encoders[2:]:
            out += [source_fingerprint(config.base_model_name, part),
                    getattr(config, part).weight_dtype.value,
                    getattr(config, part).clip_skip]
        lengths = [self.sequence_length(p) for p in self.facts.text_encoders
                   if "T5" in type(self.parts[p]).__name__]
        return out + [lengths, config.transformer.attention_mask]

    def sequence_length(self, part: str) -> int:
        """A T5's token count: the config's `<part>_sequence_length`, else its tokenizer's."""
        length = getattr(self.config, f"{part}_sequence_length", None) if self.config else None
        tokenizer = getattr(self.components, "tokenizer" + part.removeprefix("text_encoder"))
        return int(length or tokenizer.model_max_length)

    def text_encoder_reader(self, part: str) -> Callable[[], torch.nn.Module] | None:
        """How to read text encoder `part` from the base model's files again as `load` read it
        (the quantized cache's copy where the run loads with one), for a run that drops its
        weights while the text cache serves it (trainer/residency.py). None where its files
        are not a diffusers folder (SD 3's all-in-one file)."""
        from trainer import quantized_cache
        config = self.config
        source = loading.resolve_source(config.base_model_name, BASE_FIELD, None,
                                        hub_probe="model_index.json")
        if source.kind == "single_file":
            return None
        cls, dtype = self.SPEC.text_encoders[part], load_dtypes(config)[part]

        def read() -> torch.nn.Module:
            hide_weight_loading_bars()
            try:
                with quantized_cache.serving(config):
                    module = _text_encoder(cls, source.location, part, dtype)
            except Exception as err:  # noqa: BLE001 - the files changed since the run began
                raise loading.load_error(BASE_FIELD, source.location, err) from err
            return module.eval()
        return read

    def export_pipeline(self):
        return self.pipeline()  # flow-match Euler is already the family's usual sampler

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The transformer's weights in its original layout."""
        from trainer.models.transformer_layouts import to_original
        return to_original(self.SPEC.layout, self.parts["transformer"].state_dict())

    def save_single_file(self, path, dtype, metadata):
        """The transformer alone in its original layout (what ComfyUI and Forge load as a
        diffusion model; `from_single_file` reads it back)."""
        from trainer.io import atomic_save_safetensors
        state = self.original_state_dict()
        atomic_save_safetensors({k: v.detach().to("cpu", dtype).contiguous()
                                 for k, v in state.items()}, str(path), metadata)


class EmptyCaptionDropout:
    """Caption dropout for a family whose pipeline's unconditional input is the empty caption
    (Z-Image, Qwen-Image, Flux.2; OneTrainer has none for them): each caption is dropped with
    the text encoder's probability and becomes the empty caption (the engine caches it beside
    the others), rather than zeroed states the pipeline never feeds."""

    def caption_dropout(self, captions, encode):
        probability = self._setting("text_encoder", "caption_dropout_probability", 0.0)
        return encode(["" if random.random() < probability else c for c in captions])


class WrappedVAE(torch.nn.Module):
    """A VAE the engine reads through a wrapper of the family's (its latents normalised on the
    way in); the VAE's halves stay reachable for the hooks that cast a pipeline's inputs
    (trainer/sampling.py), and samples and exports use the VAE itself (`.vae`)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    encoder = property(lambda self: self.vae.encoder)
    decoder = property(lambda self: self.vae.decoder)
    quant_conv = property(lambda self: self.vae.quant_conv)
    post_quant_conv = property(lambda self: self.vae.post_quant_conv)
