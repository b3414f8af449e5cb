"""What a configured model's parts hold, without reading a weight: each part's tensors (names,
shapes, dtypes) from the safetensors headers of its files, and its module built on the meta
device (no memory) to tell which layers are linear or get adapters.

Where the files are, as the loaders find them (trainer/models/loading.py, flow_family.py,
sd3.py): a diffusers folder (each part's default file or the shards its index names; variants
such as .fp16 aside), a single-file checkpoint split by the loaders' own key prefixes, a hub
id's snapshot in the local cache (never downloaded here), a transformer file
(transformer.model_name: a .safetensors file, or a .gguf file's header) or a VAE override
replacing that part. With none of them (no base model
given, a hub id not cached) the family's standard model is built on the meta device from the
configs this project ships. trainer/memory_estimate.py counts bytes from these.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from trainer.config import GGUF_SUFFIX, TrainConfig
from trainer.errors import ModelLoadError
from trainer.models import registry

CONFIGS = pathlib.Path(__file__).parent / "models" / "configs"
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                     "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_TYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


# --- The files --------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str                        # safetensors' name: F32, BF16, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


MAX_HEADER = 100 * 2 ** 20


def read_header(path: str | os.PathLike, field_name: str) -> list[TensorInfo]:
    """The tensors of a .safetensors file from its JSON header (nothing else is read)."""
    stat = os.stat(path)
    return list(_read_header(str(path), stat.st_mtime_ns, stat.st_size, field_name))


@functools.lru_cache(maxsize=256)
def _read_header(path: str, _mtime: int, _size: int, field_name: str) -> tuple[TensorInfo, ...]:
    bad = ModelLoadError(f"{field_name}: '{path}' is not a readable .safetensors file "
                         "(corrupt or truncated?).")
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise bad
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER, _size - 8):
                raise bad
            header = json.loads(f.read(length))
    except (OSError, ValueError):
        raise bad from None
    if not isinstance(header, dict):
        raise bad
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors.append(TensorInfo(name, tuple(int(s) for s in info["shape"]),
                                      str(info["dtype"])))
        except (KeyError, TypeError, ValueError):
            raise bad from None
    return tuple(tensors)


def gguf_tensors(path: str | os.PathLike, field_name: str) -> list[TensorInfo]:
    """The tensors of a .gguf file (a transformer read pre-quantized, weight_dtype GGUF) from
    its header: names, torch-order shapes and GGML type names (Q8_0, Q4_K, F32, ...); gguf's
    reader maps the file and reads no tensor data."""
    stat = os.stat(path)
    return list(_gguf_tensors(str(path), stat.st_mtime_ns, stat.st_size, field_name))


@functools.lru_cache(maxsize=16)
def _gguf_tensors(path: str, _mtime: int, _size: int, field_name: str
                  ) -> tuple[TensorInfo, ...]:
    try:
        import gguf
    except ImportError:
        raise ModelLoadError(f"{field_name}: reading '{path}' needs the gguf package, which "
                             "is not installed.") from None
    try:
        reader = gguf.GGUFReader(path)
        return tuple(TensorInfo(t.name, tuple(int(n) for n in reversed(t.shape.tolist())),
                                t.tensor_type.name) for t in reader.tensors)
    except Exception:  # noqa: BLE001 - gguf raises its own (and numpy's) types for a bad file
        raise ModelLoadError(f"{field_name}: '{path}' is not a readable GGUF file (corrupt or "
                             "truncated?).") from None


def _part_files(folder: pathlib.Path) -> list[pathlib.Path]:
    """The weight files from_pretrained reads in a diffusers/transformers part folder: the
    shards an index names, else the one default file (variants such as .fp16 aside)."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        if index.name.count(".") > 3:     # a variant's index: x.fp16.safetensors.index.json
            continue
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                                .values()))
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        return [folder / s for s in shards]
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    return sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)


@dataclass
class ModelTensors:
    """The tensors of each part (text encoders, denoiser, "vae") and where they come from."""
    parts: dict[str, list[TensorInfo]]
    modules: dict[str, Any]           # part -> how to build its module on the meta device
    source: str
    standard: bool = False            # counted from the family's standard configs


# Single-file checkpoints: each part's prefix (the loaders' own constants).
def _single_file_prefixes(facts: registry.FamilyFacts) -> dict[str, str]:
    from trainer.models import single_file
    if facts.denoiser == "transformer":
        from trainer.models import sd3
        return {"transformer": sd3.TRANSFORMER_PREFIX, "vae": sd3.VAE_PREFIX,
                **sd3.ENCODER_PREFIXES}
    if "text_encoder_2" in facts.parts:
        return {"unet": single_file.UNET_PREFIX, "vae": single_file.VAE_PREFIX,
                "text_encoder": single_file.SDXL_TEXT_ENCODER_PREFIX.removesuffix("transformer."),
                "text_encoder_2": single_file.SDXL_TEXT_ENCODER_2_PREFIX.removesuffix("model.")}
    return {"unet": single_file.UNET_PREFIX, "vae": single_file.VAE_PREFIX,
            "text_encoder": single_file.TEXT_ENCODER_PREFIX.removesuffix("transformer.")}


def _split_single_file(tensors: list[TensorInfo], prefixes: dict[str, str]
                       ) -> dict[str, list[TensorInfo]]:
    parts: dict[str, list[TensorInfo]] = {p: [] for p in prefixes}
    for t in tensors:
        for part, prefix in prefixes.items():
            if t.name.startswith(prefix):
                parts[part].append(t)
                break
    return parts


def _looks_like_hub_id(name: str) -> bool:
    from trainer.models.loading import _looks_like_hub_id as hub_shaped
    return hub_shaped(name)


def _cached_hub_folder(repo_id: str) -> pathlib.Path | None:
    """The local snapshot of a hub id (never downloaded here), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - a malformed id or cache: treat as not cached
        return None
    return pathlib.Path(found).parent if isinstance(found, str) else None


def model_tensors(config: TrainConfig) -> ModelTensors:
    """Each part's tensors, from the files `config` names (or the standard model's)."""
    facts = registry.facts(config.model_type)
    wanted = (*facts.parts, "vae")
    name = (config.base_model_name or "").strip()
    local = pathlib.Path(name).expanduser() if name else None
    if local is not None and local.exists():
        from trainer.models.loading import BASE_FIELD, resolve_source
        source = resolve_source(name, BASE_FIELD, None, hub_probe="model_index.json")
        where = pathlib.Path(source.location)
        if source.kind == "single_file":
            found = _split_single_file(read_header(where, BASE_FIELD), _single_file_prefixes(facts))
            modules = _single_file_modules(facts, found)
            _check_single_file(facts, where, found, modules)
            result = ModelTensors({p: found.get(p, []) for p in wanted}, modules, str(where))
        else:
            result = _folder_tensors(where, wanted, f"the files of '{where}'")
    elif name and _looks_like_hub_id(name) and (cached := _cached_hub_folder(name)):
        result = _folder_tensors(cached, wanted, f"the cached files of {name}")
    elif name and not _looks_like_hub_id(name):
        raise ModelLoadError(f"base_model_name: '{name}' does not exist. Give a diffusers model "
                             "folder, a single-file .safetensors checkpoint, or a hub id.")
    else:
        result = standard_tensors(facts)
        what = f"'{name}' is not in the local cache" if name else "no base model is given"
        result.source = f"the standard {facts.label} ({what}): counted from its configs"
    _override_files(config, facts, result)
    if not result.parts.get(facts.denoiser):
        raise ModelLoadError(
            f"base_model_name: '{name}' holds no {facts.denoiser} weights that a "
            f"{facts.label} model has; give the model's diffusers folder"
            + (" (and a transformer file as transformer.model_name)."
               if facts.denoiser == "transformer" else "."))
    return result


def _folder_tensors(folder: pathlib.Path, wanted: Iterable[str], source: str) -> ModelTensors:
    parts, modules = {}, {}
    for part in wanted:
        sub = folder / part
        files = _part_files(sub) if sub.is_dir() else []
        parts[part] = [t for f in files for t in read_header(f, "base_model_name")]
        if (sub / "config.json").is_file():
            modules[part] = str(sub)
    return ModelTensors(parts, modules, source)


def _override_files(config: TrainConfig, facts: registry.FamilyFacts, result: ModelTensors):
    """A transformer file (transformer.model_name) or a VAE override replaces that part."""
    transformer_file = getattr(getattr(config, "transformer", None), "model_name", "") or ""
    if facts.denoiser == "transformer" and transformer_file.strip():
        path = pathlib.Path(transformer_file.strip()).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"transformer.model_name: '{transformer_file}' does not exist.")
        gguf = path.suffix.lower() == GGUF_SUFFIX  # read pre-quantized
        result.parts["transformer"] = (gguf_tensors if gguf else read_header)(
            path, "transformer.model_name")
        result.source += f"; the transformer from {'the GGUF file ' if gguf else ''}'{path}'"
    vae = (config.vae_model_name or "").strip()
    if vae and pathlib.Path(vae).expanduser().exists():
        path = pathlib.Path(vae).expanduser()
        if path.is_file():
            tensors = read_header(path, "vae_model_name")
            prefixed = [t for t in tensors if t.name.startswith("first_stage_model.")]
            result.parts["vae"] = prefixed or tensors
        else:
            sub = path if (path / "config.json").is_file() else path / "vae"
            result.parts["vae"] = [t for f in _part_files(sub)
                                   for t in read_header(f, "vae_model_name")]


# --- Modules on the meta device: which layers are linear, which get adapters -------------------

# FLUX.2 [klein] 4B's transformer (diffusers' scripts/convert_flux2_to_diffusers.py,
# "klein-4b"); its other settings are the class defaults. Its text encoder is Qwen3-4B; the
# LM head it is loaded with shares the input embedding's tensor, so Z-Image's Qwen3Model config
# counts the same bytes. AutoencoderKLFlux2's defaults are Flux.2's VAE.
FLUX2_KLEIN_4B = {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                  "attention_head_dim": 128, "joint_attention_dim": 7680, "in_channels": 128,
                  "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
                  "timestep_guidance_channels": 256, "guidance_embeds": False}


def _standard_folders(facts: registry.FamilyFacts) -> dict[str, Any]:
    """part -> a config folder, or ("class name", kwargs) for diffusers' defaults: the family's
    standard model as this project ships its configs (no weights)."""
    sd35 = CONFIGS / "sd35" / "large"
    t5_xxl, flux_vae = str(sd35 / "text_encoder_3"), str(sd35 / "vae")
    if facts.model_type.startswith("STABLE_DIFFUSION_XL"):
        return {p: str(CONFIGS / "sdxl" / p) for p in ("unet", "vae", "text_encoder",
                                                       "text_encoder_2")}
    if facts.model_type.startswith("STABLE_DIFFUSION_15"):
        return {p: str(CONFIGS / "sd15" / p) for p in ("unet", "vae", "text_encoder")}
    if facts.model_type == "FLUX_DEV_1":  # Flux.1-dev: diffusers' defaults are its shape
        return {"transformer": ("FluxTransformer2DModel", {"guidance_embeds": True}),
                "text_encoder": str(CONFIGS / "sdxl" / "text_encoder"),
                "text_encoder_2": t5_xxl, "vae": flux_vae}
    if facts.model_type == "CHROMA_1":    # Chroma1: diffusers' defaults are its shape
        return {"transformer": ("ChromaTransformer2DModel", {}), "text_encoder": t5_xxl,
                "vae": flux_vae}
    if facts.model_type == "QWEN":        # Qwen-Image: diffusers' defaults, Qwen2.5-VL-7B
        return {"transformer": ("QwenImageTransformer2DModel", {}),
                "text_encoder": str(CONFIGS / "qwen_image" / "text_encoder"),
                "vae": ("AutoencoderKLQwenImage", {})}
    if facts.model_type == "Z_IMAGE":     # Z-Image: diffusers' defaults, Qwen3-4B, Flux's VAE
        return {"transformer": ("ZImageTransformer2DModel", {}),
                "text_encoder": str(CONFIGS / "z_image" / "text_encoder"), "vae": flux_vae}
    if facts.model_type == "FLUX_2":      # Flux.2 klein 4B, Qwen3-4B (as Z-Image's), its VAE
        return {"transformer": ("Flux2Transformer2DModel", FLUX2_KLEIN_4B),
                "text_encoder": str(CONFIGS / "z_image" / "text_encoder"),
                "vae": ("AutoencoderKLFlux2", {})}
    sd3 = {"STABLE_DIFFUSION_35": sd35, "STABLE_DIFFUSION_3": CONFIGS / "sd35" / "sd3-medium"}
    if facts.model_type in sd3:
        return {p: str(sd3[facts.model_type] / p) for p in (*facts.parts, "vae")}
    raise ModelLoadError(f"base_model_name: no base model is given, and Atelier has no standard "
                         f"{facts.label} to count; give the model's folder.")


def standard_tensors(facts: registry.FamilyFacts) -> ModelTensors:
    modules = _standard_folders(facts)
    parts = {}
    for part in (*facts.parts, "vae"):
        parts[part] = _module_tensors(meta_module(modules[part]))
    return ModelTensors(parts, modules, "", standard=True)


def _module_tensors(module) -> list[TensorInfo]:
    """What a module's saved file would hold: its state dict with tied tensors once (T5's
    input embedding is also its `shared` table)."""
    seen: set[int] = set()
    tensors = []
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) in seen:
            continue
        seen.add(id(value))
        tensors.append(TensorInfo(name, tuple(value.shape), "F32"))
    return tensors


def _single_file_modules(facts: registry.FamilyFacts, found: dict[str, list[TensorInfo]]
                         ) -> dict[str, Any]:
    """Config folders for a single file's parts: the ones the loader reads it with."""
    if facts.denoiser == "unet":
        family = "sdxl" if "text_encoder_2" in facts.parts else "sd15"
        return {p: str(CONFIGS / family / p) for p in (*facts.parts, "vae")}
    from trainer.models import sd3
    blocks = {t.name.split(".")[3] for t in found.get("transformer", [])
              if ".joint_blocks." in t.name}
    for folder in sd3.SINGLE_FILE_CONFIGS.values():
        try:
            layers = json.loads((folder / "transformer" / "config.json").read_text())["num_layers"]
        except (OSError, ValueError, KeyError):
            continue
        if layers == len(blocks):
            return {p: str(folder / p) for p in (*facts.parts, "vae")
                    if (folder / p / "config.json").is_file()}
    return {}


def _check_single_file(facts: registry.FamilyFacts, path: pathlib.Path,
                       found: dict[str, list[TensorInfo]], modules: dict[str, Any]) -> None:
    """Refuse, as the loaders would, a single file that is not a checkpoint of the family at the
    size of the configs it is read with (the loaders read it with the same ones)."""
    denoiser = facts.denoiser
    hint = (" (and a transformer file as transformer.model_name)"
            if denoiser == "transformer" else "")
    if denoiser not in modules or not found.get(denoiser):
        raise ModelLoadError(f"base_model_name: '{path}' is not a single-file {facts.label} "
                             f"checkpoint Atelier reads; give the model's diffusers folder{hint}.")
    expected = sum(math.prod(t.shape) for t in _module_tensors(meta_module(modules[denoiser])))
    held = sum(t.numel for t in found[denoiser])
    if abs(held - expected) > 0.01 * expected:  # (an inpainting conv_in differs a little)
        raise ModelLoadError(
            f"base_model_name: '{path}' does not have the expected {facts.label} shapes: its "
            f"{denoiser} has {held:,} weights, {expected:,} expected. A custom-size model needs "
            "its diffusers folder.")


def meta_module(spec: Any):
    """A part's module on the meta device (no memory): from a config folder, or a diffusers
    class with keyword arguments. Cached: the page asks again at every change."""
    if isinstance(spec, tuple):
        return _meta_from_class(spec[0], json.dumps(spec[1], sort_keys=True))
    path = pathlib.Path(spec) / "config.json"
    stat = path.stat()
    return _meta_from_folder(str(spec), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _meta_from_class(class_name: str, kwargs: str):
    import diffusers
    from accelerate import init_empty_weights
    with warnings.catch_warnings(), init_empty_weights(include_buffers=True):
        warnings.simplefilter("ignore")
        return getattr(diffusers, class_name)(**json.loads(kwargs))


@functools.lru_cache(maxsize=16)
def _meta_from_folder(folder: str, _mtime: int, _size: int):
    import diffusers
    import transformers
    from accelerate import init_empty_weights
    config = json.loads((pathlib.Path(folder) / "config.json").read_text(encoding="utf-8"))
    with warnings.catch_warnings(), init_empty_weights(include_buffers=True):
        warnings.simplefilter("ignore")
        name = config.get("_class_name")
        if name and hasattr(diffusers, name):
            cls = getattr(diffusers, name)
            return cls.from_config(cls.load_config(folder))
        for name in config.get("architectures") or []:
            if hasattr(transformers, name):
                cls = getattr(transformers, name)
                return cls(cls.config_class.from_pretrained(folder))
    raise ModelLoadError(f"base_model_name: '{folder}' has a config of a model class Atelier "
                         "does not know.")


def part_config(spec: Any) -> dict:
    """A part's config as a dict (from its folder, or the class defaults it is built with)."""
    if isinstance(spec, tuple):
        return dict(meta_module(spec).config)
    return json.loads((pathlib.Path(spec) / "config.json").read_text(encoding="utf-8"))
