"""The disk cache of quantized frozen parts (issue 26): a part stored as FLOAT_8, INT_8 or
NFLOAT_4 is quantized once, written to `<workspace>/cache/quantized/<part>-<slot>/` (in the app:
one folder for all its jobs and users, `<app workspace>/cache/quantized`, through
ATELIER_QUANTIZED_CACHE_DIR), and read back by the next run in place of the model's
full-precision files. Flux.1's transformer is
23.8 GB in bfloat16 and 6.7 GB in NF4: the next run reads a quarter of the bytes and quantizes
nothing.

An entry holds the part as the run trained on it right after quantization (before adapters):
the quantized layers' stored tensors (float8 codes and row scales; bitsandbytes' int8 weight
and row scales; NF4's packed weight and its quantization state, as bitsandbytes writes them in
a state dict), everything else in the train dtype, and `meta.json`: the part's class and
config (the model is rebuilt from them without weights, then given the stored tensors) and the
key it was made under. An entry holds a base model's weights only, read from files the run
could read: sharing the folder between users gives none of them anything they could not load
themselves (the key names each source file's absolute path).

The key is what changes the stored tensors: the sources the part is read from (each local file
by path, byte size and modification time; a diffusers folder by the files of the part's
subfolder; a hub id by the files of its local snapshot), the model type, the part, its
weight_dtype, the train dtype, the denoiser's quantization filter, bitsandbytes' version for
its types, and this format's version. A source that changed (a new file written over the old
one) changes the key: the entry is rebuilt and replaces the old one in the same slot (the slot
is the key without the files' sizes and times), so a workspace keeps one entry per model part.

Read from the cache wherever the loaders read a part: a diffusers folder or hub id (every
family), a transformer file beside it (`transformer.model_name`), an SD 3 / 3.5 single file, and
an SD 1.5 / SDXL single-file checkpoint (diffusers' `from_single_file` is given the cached UNet
and text encoders and converts only the other parts; it still reads the whole file). A single
file's parts are built with a diffusers config folder (the shipped one, or the model's own):
that folder is a source of their key too, so another folder, or an edited config in it, makes
another entry.
Only diffusers and transformers models are cached (every family's UNet, transformer and text
encoders); a quantized VAE is quantized each run.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.config import DataType, TrainConfig
from trainer.data.cache import _digest, source_fingerprint

CACHE_FORMAT = 1
WEIGHTS = "weights.safetensors"
META = "meta.json"
# The attribute a part read from the cache carries: its status line (quantize_frozen_parts
# reports it and quantizes nothing).
FROM_CACHE = "_atelier_quantized_from_cache"
# The attribute a part built from a single file carries: the config folder it was built with,
# which `store` adds to its key as the loader's `cached_or` did (the run config names no folder).
CONFIG_FOLDER = "_atelier_config_folder"

_serving: contextvars.ContextVar["_Serving | None"] = contextvars.ContextVar(
    "quantized_cache_serving", default=None)


def writes_enabled() -> bool:
    """Off with ATELIER_QUANTIZED_CACHE=off: the benchmarks run each case in a throw-away
    workspace, where writing 17 GB of a FLOAT_8 Flux.1 would only cost time and disk."""
    return os.environ.get("ATELIER_QUANTIZED_CACHE", "").lower() not in {"off", "0", "false"}


# Where the entries go when set (the app sets it: each of its jobs runs in a folder of its own,
# where an entry would serve no later job); else `<workspace>/cache/quantized`.
CACHE_DIR_ENV = "ATELIER_QUANTIZED_CACHE_DIR"


def cache_root(config: TrainConfig) -> Path:
    override = os.environ.get(CACHE_DIR_ENV, "").strip()
    if override:
        return Path(override)
    return Path(config.workspace_dir) / "cache" / "quantized"


# --- The key ----------------------------------------------------------------------------------

def _hub_snapshot(name: str) -> str:
    """A hub id's local snapshot folder (its revision is in the path), or the id itself."""
    if Path(name).expanduser().exists() or "/" not in name:
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local cache: the run fails on it later
        return name


def part_sources(config: TrainConfig, part: str, config_folder: str | None = None) -> list[str]:
    """The names a part is read from: the base model, the part's own file, and the config folder
    a single file's part is built with (its class's config comes from there)."""
    names = [config.base_model_name]
    own = getattr(getattr(config, part), "model_name", "") or ""
    if own:
        names.append(own)
    if config_folder:
        names.append(str(Path(config_folder).resolve()))
    return names


def part_key(config: TrainConfig, part: str,
             config_folder: str | None = None) -> tuple[str, dict]:
    """(the slot's name, the full key) of `part`'s entry; `config_folder`: see part_sources."""
    from trainer.quantization import BITSANDBYTES, quantization_patterns
    from trainer.models import registry

    dtype = getattr(config, part).weight_dtype
    names = part_sources(config, part, config_folder)
    settings = {"format": CACHE_FORMAT, "model_type": config.model_type.value, "part": part,
                "weight_dtype": dtype.value, "train_dtype": config.train_dtype.value,
                "sources": names}
    if part == registry.facts(config.model_type).denoiser:
        settings["filter"] = quantization_patterns(config)
    if dtype in BITSANDBYTES:
        import bitsandbytes
        settings["bitsandbytes"] = bitsandbytes.__version__
    files = [source_fingerprint(_hub_snapshot(name), part) for name in names]
    return f"{part}-{_digest(settings)[:16]}", {**settings, "files": files}


# --- Writing ----------------------------------------------------------------------------------

def _library(module: torch.nn.Module) -> str | None:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel
    if isinstance(module, ModelMixin):
        return "diffusers"
    if isinstance(module, PreTrainedModel):
        return "transformers"
    return None


def _model_config(module: torch.nn.Module, library: str) -> dict:
    if library == "diffusers":
        return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    return module.config.to_dict()


def _unique_tensors(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (safetensors refuses shared storage, and
    T5's token table is both `shared` and `encoder.embed_tokens`), and {dropped name: kept}."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in module.state_dict(keep_vars=False).items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
        if tensor.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


# Room left on the disk beyond an entry, for the run's own outputs (samples, backups, the LoRA)
SPARE_BYTES = 2**30


def store(config: TrainConfig, part: str, module: torch.nn.Module, layers: list[str],
          dtype: DataType) -> str | None:
    """Write `module` (its `layers` just quantized to `dtype`) as `part`'s entry and say so;
    None for a module the cache cannot rebuild or an entry that is there already. Written into a temporary folder, then renamed:
    a reader never sees half an entry. A disk without room for it (and SPARE_BYTES more) is
    not filled, and a failed write is removed: the run goes on either way, and the next one
    quantizes the part again."""
    from safetensors.torch import save_file

    from trainer.quantization import stored_bytes
    library = _library(module)
    if library is None:
        return None
    slot, key = part_key(config, part, getattr(module, CONFIG_FOLDER, None))
    root = cache_root(config)
    target = root / slot
    if _meta(target, key) is not None:  # written already (a loader that reads the whole file)
        return None
    root.mkdir(parents=True, exist_ok=True)
    needed, free = stored_bytes(module), shutil.disk_usage(root).free
    if needed + SPARE_BYTES > free:
        return (f"Not writing the quantized {part} to {root}: it takes {needed / 2**30:.1f} GB "
                f"and the disk has {free / 2**30:.1f} GB free (the next run quantizes it again)")
    temporary = root / f".{slot}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        tensors, aliases = _unique_tensors(module)
        save_file(tensors, str(temporary / WEIGHTS))
        meta = {"key": key, "class": f"{type(module).__module__}:{type(module).__qualname__}",
                "library": library, "config": _model_config(module, library),
                "layers": layers, "weight_dtype": dtype.value, "aliases": aliases}
        (temporary / META).write_text(json.dumps(meta, default=str), encoding="utf-8")
        stale = root / f".{slot}.{os.getpid()}.old"
        if target.exists():
            os.replace(target, stale)
        os.replace(temporary, target)
        shutil.rmtree(stale, ignore_errors=True)
    except OSError as err:
        return (f"Could not write the quantized {part} to {root} ({err.strerror or err}); the "
                "next run quantizes it again")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return f"Wrote the quantized {part} to {target} for the next run"


# --- Reading ----------------------------------------------------------------------------------

def _meta(folder: Path, key: dict) -> dict | None:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    # the key as JSON reads it back (lists for tuples)
    return meta if meta.get("key") == json.loads(json.dumps(key, default=str)) else None


def _empty_model(meta: dict) -> torch.nn.Module:
    """The part's model built from its config, its parameters on the meta device."""
    from accelerate import init_empty_weights
    module_name, _, qualname = meta["class"].partition(":")
    # a file in the workspace names the class: only the two libraries' models are built
    if module_name.partition(".")[0] not in ("diffusers", "transformers"):
        raise ValueError(f"not a diffusers or transformers model: {meta['class']}")
    cls: Any = importlib.import_module(module_name)
    for attribute in qualname.split("."):
        cls = getattr(cls, attribute)
    with init_empty_weights():
        if meta["library"] == "diffusers":
            return cls.from_config(meta["config"])
        return cls._from_config(cls.config_class.from_dict(meta["config"]))


def _quantized_layer(state: dict[str, torch.Tensor], dtype: DataType,
                     compute: torch.dtype) -> torch.nn.Module:
    """A quantized layer from the tensors its state dict held."""
    from trainer.quantization import Float8Linear, _bias_first, _bitsandbytes_layers
    bias = state.get("bias")
    if dtype == DataType.FLOAT_8:
        return Float8Linear(state["weight"], state["weight_scale"], bias, compute)
    bnb, Int8Linear, NF4Linear = _bitsandbytes_layers()
    if dtype == DataType.INT_8:
        out_features, in_features = state["weight"].shape
        layer = Int8Linear(in_features, out_features, bias=bias is not None,
                           has_fp16_weights=False, device="meta")
        layer.weight = bnb.nn.Int8Params(state["weight"], requires_grad=False,
                                         has_fp16_weights=False)
        # as bitsandbytes leaves a weight it quantized: codes (CB) and row scales (SCB) on it
        layer.weight.CB, layer.weight.SCB = layer.weight.data, state["SCB"]
    else:
        stats = {k: v for k, v in state.items() if k.startswith("weight.")}
        weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats,
                                                     requires_grad=False, device="cpu")
        out_features, in_features = weight.quant_state.shape
        layer = NF4Linear(in_features, out_features, bias=bias is not None,
                          compute_dtype=compute, quant_type="nf4", device="meta")
        weight.module = layer
        layer.weight = weight
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return _bias_first(layer)


def _tie(module: torch.nn.Module, aliases: dict[str, str]) -> None:
    """A parameter the model shared (T5's token table) is one parameter again, as
    from_pretrained leaves it, not two that share storage."""
    for alias, kept in aliases.items():
        owner_name, _, name = alias.rpartition(".")
        source_name, _, source = kept.rpartition(".")
        owner = module.get_submodule(owner_name)
        parameter = module.get_submodule(source_name)._parameters.get(source)
        if parameter is not None and name in owner._parameters:
            owner._parameters[name] = parameter


def load(config: TrainConfig, part: str,
         config_folder: str | None = None) -> torch.nn.Module | None:
    """`part` from its entry, quantized as it was stored; None without a valid entry (no entry,
    another key, or one that does not rebuild, which is removed: the part is then loaded,
    quantized and written again). `config_folder`: see part_sources."""
    from safetensors.torch import load_file

    from trainer.quantization import compute_dtype, flag_quantized
    slot, key = part_key(config, part, config_folder)
    folder = cache_root(config) / slot
    meta = _meta(folder, key)
    if meta is None:
        return None
    try:
        tensors = load_file(str(folder / WEIGHTS))
        module = _empty_model(meta)
        dtype = DataType(meta["weight_dtype"])
        compute = compute_dtype(config)
        for alias, kept in meta["aliases"].items():
            tensors[alias] = tensors[kept]
        for name in meta["layers"]:
            prefix = name + "."
            state = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, _quantized_layer(state, dtype, compute))
        # the quantized layers have their tensors already: everything else must be given
        result = module.load_state_dict(tensors, strict=False, assign=True)
        quantized = tuple(name + "." for name in meta["layers"])
        if result.unexpected_keys or any(not k.startswith(quantized)
                                         for k in result.missing_keys):
            return None
        _tie(module, meta["aliases"])
    except Exception:  # noqa: BLE001 - a damaged or outdated entry is rebuilt, never fatal
        shutil.rmtree(folder, ignore_errors=True)  # so that this run writes it again
        return None
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        shutil.rmtree(folder, ignore_errors=True)
        return None
    flag_quantized(module, dtype)
    size = (folder / WEIGHTS).stat().st_size / 2**30
    setattr(module, FROM_CACHE,
            f"Read the {part} as {dtype.value} from the quantized cache ({folder}, "
            f"{size:.2f} GB): nothing to quantize")
    return module.eval()


# --- Serving the loaders ----------------------------------------------------------------------

class _Serving:
    def __init__(self, config: TrainConfig):
        from trainer.quantization import quantized_parts
        self.config = config
        self.parts = set(quantized_parts(config)) - {"vae"}


@contextlib.contextmanager
def serving(config: TrainConfig) -> Iterator[None]:
    """While a family loads: `cached_or` serves the quantized parts that have an entry."""
    token = _serving.set(_Serving(config))
    try:
        yield
    finally:
        _serving.reset(token)


def cached_or(part: str, build: Callable[[], Any], config_folder: str | None = None) -> Any:
    """`part` from the quantized cache when a run is loading with one for it, else `build()`
    (the loader's own reading of the part). The loaders call this where they read one part;
    `config_folder`: the config folder a single file's part is built with (see part_sources)."""
    from trainer.errors import AtelierError
    active = _serving.get()
    if active is not None and part in active.parts:
        try:
            module = load(active.config, part, config_folder)
        except AtelierError:  # a setting the run refuses by name later (the layer filter)
            module = None
        if module is not None:
            return module
    return build()


def built_with_config(module: torch.nn.Module, config_folder: str) -> None:
    """Note on a part the loader built from a single file the config folder it used, for the
    key its entry is written under (`store`)."""
    setattr(module, CONFIG_FOLDER, str(config_folder))
