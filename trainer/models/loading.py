"""Loading a base model of any family, from wherever the user's model is.

`base_model_name` may be a diffusers folder, a single-file `.safetensors` checkpoint (the
original LDM/SGM layout that ComfyUI/A1111 use), or a Hugging Face hub id. Everything is loaded
offline-safe: single files are read with the configs this project ships (diffusers would
otherwise fetch them from the hub), and only safetensors weights are read — pickle files
(.ckpt/.pt/.bin) can run code when loaded, so they are refused.

What differs between families (SD 1.5, SDXL) is described by a `FamilySpec`: the pipeline
class, the text encoders and tokenizers, the shipped config folder, how to recognise a model of
another family. Each family module (sd15.py, sdxl.py) declares one and wraps the result in its
own components dataclass.

Every failure a user can fix is a `ModelLoadError` whose message starts with the config field
at fault ("base_model_name: ..." or "vae_model_name: ...") and names the path or id.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from trainer.config import GGUF_SUFFIX
from trainer.errors import ModelLoadError
from trainer.quantized_cache import built_with_config, cached_or
from trainer.quiet import hide_weight_loading_bars

BASE_FIELD = "base_model_name"
TRANSFORMER_FIELD = "transformer.model_name"
VAE_FIELD = "vae_model_name"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# "org/name" as the hub spells repo ids; anything else that does not exist is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class FamilySpec:
    """What the loader needs to know about one model family."""

    name: str                                   # "SD 1.5", "SDXL": used in messages
    pipeline_class: type                        # StableDiffusionPipeline, ...XLPipeline
    config_dir: pathlib.Path                    # the shipped configs for single files
    text_encoders: dict[str, type]              # subfolder -> transformers class
    tokenizers: tuple[str, ...]                 # subfolders
    # {part: {ldm key: tensor}} of models built from a config folder (the single-file layout)
    ldm_state_dicts: Callable[[dict[str, torch.nn.Module]], dict[str, dict]]
    check_index: Callable[[dict, str], None]    # a diffusers folder of another family?
    check_keys: Callable[[list[str], pathlib.Path], None]  # a single file of another family?
    other_architectures: str                    # for the "wrong shapes" hint
    single_file_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Source:
    kind: str  # "folder" | "single_file" | "hub"
    location: str  # resolved path, or the hub id


def load_components(
    spec: FamilySpec,
    base_model_name: str,
    vae_name: str | None = None,
    *,
    allowed_root: str | os.PathLike | None = None,
    single_file_config: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """{"tokenizer"..., "text_encoder"..., "vae", "unet", "noise_scheduler"} of a model of
    `spec`'s family; see the family modules' `load_*` for the arguments."""
    hide_weight_loading_bars()
    source = resolve_source(base_model_name, BASE_FIELD, allowed_root, hub_probe="model_index.json")
    config_dir = (single_file_config_dir(spec, single_file_config)
                  if source.kind == "single_file" else None)
    vae = None
    if vae_name:
        base_vae_config = _base_vae_config(source, config_dir)
        vae = load_vae(vae_name, base_vae_config, allowed_root=allowed_root, dtype=dtype)
    if source.kind == "single_file":
        parts = _load_single_file(spec, pathlib.Path(source.location), config_dir, vae, dtype)
    else:
        parts = _load_pretrained(spec, source, vae, dtype)
    for name in (*spec.text_encoders, "vae", "unet"):
        parts[name].eval()
    return parts


def load_vae(vae_name: str, base_vae_config: dict, allowed_root=None, dtype=torch.float32) -> AutoencoderKL:
    """A replacement VAE: a diffusers VAE folder (or a model folder with vae/), a single-file
    VAE `.safetensors` (LDM or diffusers keys), or a hub id. `base_vae_config` is the base
    model's VAE config: a single file is read with it, and the VAE must be compatible with it."""
    source = resolve_source(vae_name, VAE_FIELD, allowed_root, hub_probe="config.json")
    if source.kind == "single_file":
        vae = _vae_from_single_file(pathlib.Path(source.location), base_vae_config)
    else:
        vae = _vae_from_pretrained(source)
    _check_vae_fits(vae, base_vae_config, vae_name)
    return as_dtype(vae, dtype)


def as_dtype(model, dtype):
    # diffusers warns on every dtype cast, needed or not: cast only when it changes something.
    return model if model.dtype == dtype else model.to(dtype)


# --- Where the model is ----------------------------------------------------------------------

def resolve_source(name: str, field: str, allowed_root, hub_probe: str) -> _Source:
    name = (name or "").strip()
    if not name:
        raise ModelLoadError(f"{field}: no model given.")
    path = _local_path(name, field, allowed_root)
    if path is not None:
        return _local_source(path, name, field)
    if _looks_like_hub_id(name):
        _check_hub_reachable(name, field, hub_probe)
        return _Source("hub", name)
    raise ModelLoadError(
        f"{field}: '{name}' does not exist. Give a diffusers model folder (with "
        "model_index.json), a single-file .safetensors checkpoint, or a Hugging Face hub id "
        "such as 'org/name'."
    )


def _local_path(name: str, field: str, allowed_root) -> pathlib.Path | None:
    """The existing file or folder `name` points at, or None if there is none."""
    path = pathlib.Path(name).expanduser()
    if allowed_root is not None and not path.is_absolute():
        path = pathlib.Path(allowed_root) / path
    if not path.exists():
        return None
    path = path.resolve()  # symlinks and ".." resolved before the check below
    if allowed_root is not None:
        root = pathlib.Path(allowed_root).resolve()
        if not path.is_relative_to(root):
            raise ModelLoadError(
                f"{field}: '{name}' is outside the workspace folder '{root}'; on this "
                "server only files inside it can be used."
            )
    return path


def _local_source(path: pathlib.Path, name: str, field: str) -> _Source:
    if path.is_dir():
        if (path / "model_index.json").is_file() or (field == VAE_FIELD and _is_vae_folder(path)):
            return _Source("folder", str(path))
        expected = "config.json (a VAE folder) or model_index.json" if field == VAE_FIELD else "model_index.json"
        raise ModelLoadError(
            f"{field}: the folder '{path}' is not a diffusers model: it has no {expected}. "
            "Give the folder that holds it, or a single .safetensors file."
        )
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{field}: '{path}' is a pickle file ({suffix}). Only .safetensors files and "
            "diffusers folders are loaded, because pickle files can run arbitrary code when "
            "opened. If you trust it, convert it on your own machine first: "
            f"python -m trainer convert-checkpoint '{path}' '{path.with_suffix('.safetensors')}'"
        )
    if suffix == GGUF_SUFFIX and field == TRANSFORMER_FIELD:  # read by flow_family (GGUF)
        return _Source("single_file", str(path))
    if suffix != ".safetensors":
        raise ModelLoadError(
            f"{field}: '{path}' is not a model format Atelier reads (expected a .safetensors "
            "file or a diffusers folder)."
        )
    return _Source("single_file", str(path))


def _is_vae_folder(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() or (path / "vae" / "config.json").is_file()


def _looks_like_hub_id(name: str) -> bool:
    suffix = pathlib.PurePosixPath(name).suffix.lower()
    return bool(_HUB_ID.match(name)) and suffix not in PICKLE_SUFFIXES | {".safetensors"}


def _downloads_off() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(constants.HF_HUB_OFFLINE)


def _check_hub_reachable(repo_id: str, field: str, probe_file: str) -> None:
    """With downloads off, a hub id only works if it is already in the local cache; say so
    plainly instead of letting diffusers fail deep inside with a connection error."""
    if not _downloads_off():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, probe_file), str):
        return
    what = "VAE" if field == VAE_FIELD else "Base model"
    raise ModelLoadError(
        f"{field}: {what} '{repo_id}' was not found locally and downloads are off "
        "(HF_HUB_OFFLINE=1). Give a local diffusers folder or .safetensors file, or run once "
        "with downloads on to fetch it into the Hugging Face cache."
    )


def load_error(field: str, name: str, err: Exception) -> ModelLoadError:
    # The library's first line says what was wrong; its traceback stays on the chained error.
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ModelLoadError(f"{field}: could not load '{name}': {reason}")


# --- Diffusers folders and hub ids ------------------------------------------------------------

def _load_pretrained(spec: FamilySpec, source: _Source, vae: AutoencoderKL | None, dtype) -> dict:
    from transformers import CLIPTokenizer

    where = source.location
    try:
        index = spec.pipeline_class.load_config(where)
    except Exception as err:  # noqa: BLE001
        raise load_error(BASE_FIELD, where, err) from err
    spec.check_index(index, where)
    parts: dict[str, Any] = {}
    try:
        for name in spec.tokenizers:
            parts[name] = CLIPTokenizer.from_pretrained(where, subfolder=name)
        for name, cls in spec.text_encoders.items():
            # transformers renamed its dtype keyword (torch_dtype -> dtype); a cast works in
            # all versions.
            parts[name] = cached_or(name, lambda: cls.from_pretrained(
                where, subfolder=name, use_safetensors=True).to(dtype))
        parts["unet"] = cached_or("unet", lambda: UNet2DConditionModel.from_pretrained(
            where, subfolder="unet", use_safetensors=True, torch_dtype=dtype))
        parts["vae"] = vae if vae is not None else AutoencoderKL.from_pretrained(
            where, subfolder="vae", use_safetensors=True, torch_dtype=dtype
        )
        # As diffusers' own training scripts do: the model's schedule (betas, prediction type)
        # with DDPM's training-time maths, whatever sampler the model ships with.
        parts["noise_scheduler"] = DDPMScheduler.from_pretrained(where, subfolder="scheduler")
    except Exception as err:  # noqa: BLE001 - any library failure is a load failure here
        raise load_error(BASE_FIELD, where, err) from err
    return parts


# --- Single-file checkpoints -----------------------------------------------------------------

def single_file_config_dir(spec: FamilySpec, single_file_config) -> pathlib.Path:
    config_dir = pathlib.Path(single_file_config) if single_file_config else spec.config_dir
    needed = ["model_index.json", "unet/config.json", "vae/config.json",
              *(f"{name}/config.json" for name in spec.text_encoders), *spec.tokenizers]
    missing = [n for n in needed if not (config_dir / n).exists()]
    if missing:
        raise ModelLoadError(
            f"single_file_config: '{config_dir}' is not a diffusers config folder of an "
            f"{spec.name} model (missing {', '.join(missing)})."
        )
    return config_dir


# The UNet's first convolution in the single-file layout: [out, in channels, 3, 3].
LDM_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def _load_single_file(spec: FamilySpec, path: pathlib.Path, config_dir: pathlib.Path, vae,
                      dtype) -> dict:
    # An inpainting checkpoint's UNet reads 9 channels where the shipped configs say 4: the
    # file says how many (whether they fit the model type is checked by the caller). The
    # quantized cache keys on the folder given, not on that temporary copy of it.
    with _config_with_checkpoint_in_channels(path, config_dir) as build_dir:
        return _load_single_file_with(spec, path, build_dir, vae, dtype, config_source=config_dir)


@contextlib.contextmanager
def _config_with_checkpoint_in_channels(path: pathlib.Path, config_dir: pathlib.Path):
    """`config_dir`, or a temporary copy of it whose unet/config.json has the checkpoint's
    conv_in input channels where they differ."""
    shape = checkpoint_shapes(path, BASE_FIELD).get(LDM_CONV_IN)
    config = json.loads((config_dir / "unet" / "config.json").read_text(encoding="utf-8"))
    if shape is None or len(shape) != 4 or shape[1] == config.get("in_channels"):
        yield config_dir
        return
    with tempfile.TemporaryDirectory(prefix="atelier-config-") as folder:
        copy = pathlib.Path(folder) / "config"
        shutil.copytree(config_dir, copy)
        config["in_channels"] = int(shape[1])
        (copy / "unet" / "config.json").write_text(json.dumps(config, indent=2),
                                                    encoding="utf-8")
        yield copy


def _load_single_file_with(spec: FamilySpec, path: pathlib.Path, config_dir: pathlib.Path, vae,
                           dtype, config_source: pathlib.Path | None = None) -> dict:
    """The parts of single file `path`, built with the configs in `config_dir`; the UNet and
    text encoders that an earlier run quantized from this file and `config_source` (the config
    folder as given, `config_dir` by default) come from the quantized cache instead."""
    check_checkpoint_layout(spec, path, config_dir, need_vae=vae is None)
    config_source = str(config_source or config_dir)
    # diffusers uses a component it is given as it is (as for `vae=`): it neither converts nor
    # loads those parts from the file.
    cacheable = (*spec.text_encoders, "unet")
    served = {name: module for name in cacheable
              if (module := cached_or(name, lambda: None, config_source)) is not None}
    extra = {"vae": vae} if vae is not None else {}
    try:
        # config=<local folder> + local_files_only: diffusers otherwise downloads the configs
        # of the model it guesses the checkpoint to be.
        pipe = spec.pipeline_class.from_single_file(
            str(path), config=str(config_dir), local_files_only=True,
            **spec.single_file_kwargs, **extra, **served,
        )
    except Exception as err:  # noqa: BLE001
        raise load_error(BASE_FIELD, str(path), err) from err
    models = (*spec.text_encoders, "vae", "unet")
    for name in models:
        _check_all_weights_loaded(getattr(pipe, name), name, path)
    parts: dict[str, Any] = {name: getattr(pipe, name) for name in spec.tokenizers}
    # a served part is in its stored dtypes already (a cast would touch its quantized codes)
    parts.update({name: served[name] if name in served else as_dtype(getattr(pipe, name), dtype)
                  for name in models})
    for name in set(cacheable) - set(served):  # its entry's key names the config folder too
        built_with_config(parts[name], config_source)
    parts["noise_scheduler"] = DDPMScheduler.from_config(pipe.scheduler.config)
    return parts


def checkpoint_shapes(path: pathlib.Path, field: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header, without reading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"{field}: '{path}' is not a readable .safetensors file (corrupt or truncated?): {err}"
        ) from err


def expected_shapes(spec: FamilySpec, config_dir: pathlib.Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per part ("unet", "vae", "text_encoder", ...), the single-file tensor names and shapes
    of the model described by `config_dir`. Built on the meta device: no memory used."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
        }
        for name, cls in spec.text_encoders.items():
            models[name] = cls(cls.config_class.from_pretrained(config_dir / name))
    parts = spec.ldm_state_dicts(models)
    return {part: {k: tuple(t.shape) for k, t in sd.items()} for part, sd in parts.items()}


def check_checkpoint_layout(spec: FamilySpec, path: pathlib.Path, config_dir: pathlib.Path,
                            need_vae: bool) -> None:
    """Refuse, with a reason, a file that is not a checkpoint of the family and configured
    shape, before diffusers turns it into a shape error or a model with uninitialised weights."""
    shapes = checkpoint_shapes(path, BASE_FIELD)
    spec.check_keys(list(shapes), path)
    expected = expected_shapes(spec, config_dir)
    if not need_vae:
        expected.pop("vae")
    for part, tensors in expected.items():
        # Shapes first: "conv_in is [32, 4, 3, 3], [320, 4, 3, 3] expected" says more about a
        # model of another size than the list of blocks it lacks.
        wrong = [k for k in tensors if k in shapes and shapes[k] != tensors[k]]
        if wrong:
            k = wrong[0]
            raise ModelLoadError(
                f"{BASE_FIELD}: '{path}' does not have the expected {spec.name} shapes: "
                f"{len(wrong)} {part} weights differ (e.g. '{k}' is {list(shapes[k])} in the "
                f"file, {list(tensors[k])} expected)." + _config_hint(spec, config_dir)
            )
        missing = [k for k in tensors if k not in shapes]
        if part == "vae" and len(missing) == len(tensors):
            raise ModelLoadError(
                f"{BASE_FIELD}: '{path}' holds no VAE weights; give a VAE in {VAE_FIELD}."
            )
        if missing:
            raise ModelLoadError(
                f"{BASE_FIELD}: '{path}' does not match the expected {spec.name} layout: "
                f"{len(missing)} {part} weights are missing (e.g. '{missing[0]}')."
                + _config_hint(spec, config_dir)
            )


def _config_hint(spec: FamilySpec, config_dir: pathlib.Path) -> str:
    if config_dir.resolve() == spec.config_dir.resolve():
        return (
            f" It may be another architecture ({spec.other_architectures}) or a custom-size "
            "model; for the latter, give its diffusers config folder as single_file_config."
        )
    return f" Checked against the configs in '{config_dir}'."


def check_common_keys(keys: list[str], path: pathlib.Path) -> None:
    """What every family refuses: LoRA files and files without a diffusion model."""
    if any(k.startswith("lora_") or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise ModelLoadError(f"{BASE_FIELD}: '{path}' is a LoRA, not a base model.")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ModelLoadError(
            f"{BASE_FIELD}: '{path}' is not a Stable Diffusion checkpoint (it has no UNet "
            "weights 'model.diffusion_model.*')."
        )


def _check_all_weights_loaded(model: torch.nn.Module, part: str, path) -> None:
    # diffusers builds models on the meta device and fills in what the file holds; anything
    # the file lacked would stay an empty placeholder and fail at the first step.
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise ModelLoadError(
            f"{BASE_FIELD}: '{path}' is missing {len(empty)} {part} weights (e.g. '{empty[0]}')."
        )


# --- VAE override ----------------------------------------------------------------------------

def _base_vae_config(source: _Source, config_dir: pathlib.Path | None) -> dict:
    try:
        if source.kind == "single_file":
            return dict(AutoencoderKL.load_config(config_dir / "vae"))
        return dict(AutoencoderKL.load_config(source.location, subfolder="vae"))
    except Exception as err:  # noqa: BLE001
        raise load_error(BASE_FIELD, source.location, err) from err


def _vae_from_pretrained(source: _Source) -> AutoencoderKL:
    where = pathlib.Path(source.location)
    subfolder = "vae" if source.kind == "folder" and not (where / "config.json").is_file() else None
    try:
        return AutoencoderKL.from_pretrained(source.location, subfolder=subfolder, use_safetensors=True)
    except Exception as err:  # noqa: BLE001
        raise load_error(VAE_FIELD, source.location, err) from err


def _vae_from_single_file(path: pathlib.Path, base_vae_config: dict) -> AutoencoderKL:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    checkpoint_shapes(path, VAE_FIELD)  # a clear message for corrupt files
    state = load_file(str(path))
    diffusers_keys = any(".down_blocks." in k or ".up_blocks." in k for k in state)
    if diffusers_keys:
        state = {k.removeprefix("vae."): v for k, v in state.items()}
    else:
        # VAE files come bare ("encoder.*") or inside a whole checkpoint ("first_stage_model.*").
        state = convert_ldm_vae_checkpoint(state, base_vae_config)
    vae = AutoencoderKL.from_config(base_vae_config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(
            f"{VAE_FIELD}: '{path}' is not a VAE of the base model's kind: "
            + str(err).strip().splitlines()[0]
        ) from err
    return vae


def _check_vae_fits(vae: AutoencoderKL, base_vae_config: dict, name: str) -> None:
    # Same latent channels and downsampling depth, or the UNet cannot read its latents.
    got = (vae.config.latent_channels, len(vae.config.block_out_channels))
    want = (base_vae_config["latent_channels"], len(base_vae_config["block_out_channels"]))
    if got != want:
        raise ModelLoadError(
            f"{VAE_FIELD}: '{name}' does not fit the base model: it has {got[0]} latent "
            f"channels and scale factor {2 ** (got[1] - 1)}, the base model's VAE "
            f"{want[0]} and {2 ** (want[1] - 1)}."
        )
