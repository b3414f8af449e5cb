"""The two training methods behind one set of calls the loop makes: which parameters a part
trains, where the result goes and how it is written.

- LORA: adapters on the part (trainer/lora.py); the output is one `.safetensors` in the
  chosen LoRA layout (KOHYA_LORA, LEGACY_LORA, COMFY_LORA, DIFFUSERS_LORA: trainer/lora_formats.py).
- EMBEDDING: no part trains; the output is the embedding file(s) (trainer/embeddings.py).
  A LoRA run with additional embeddings also writes one file per embedding beside the LoRA,
  and bundles them into it (`bundle_additional_embeddings`).
- FINE_TUNE: the part's own weights, all of them, as float32 master weights (even when the
  frozen parts are stored in bfloat16/float16), or, for a part stored in BFLOAT_16 with
  `optimizer.stochastic_rounding` on, its bfloat16 weights in place
  (trainer/optim/stochastic_rounding.py); the output is the whole model, either a
  single-file checkpoint in the original LDM (SD 1.5) / SGM (SDXL) layout that ComfyUI and
  A1111 load (ORIGINAL_SINGLE_FILE, LEGACY_SAFETENSORS), or a diffusers folder (DIFFUSERS) —
  in `output_dtype`.

Every output carries the exact config that produced it: beside it as `<output>.json`, and
inside it (the safetensors header's `atelier_config`; for a diffusers folder, each weight
file's header).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer import lora, lora_formats
from trainer.config import ModelFormat, TrainConfig, TrainingMethod
from trainer.optim import stochastic_rounding
from trainer.io import (atomic_write_text, mark_model_folder, refuse_unless_replaceable,
                        replace_folder)


def is_fine_tune(config: TrainConfig) -> bool:
    return config.training_method == TrainingMethod.FINE_TUNE


def trainable_parameters(module: torch.nn.Module, config: TrainConfig,
                         part: str) -> list[torch.nn.Parameter]:
    """Make `part` trainable by the configured method; its parameters for the optimizer."""
    if not is_fine_tune(config):
        return lora.add_lora(module, config, part)
    if not stochastic_rounding.trains_in_place(config, part):
        # float32 master weights: small updates vanish when added to bfloat16/float16 weights.
        module.to(torch.float32)
    # else its bfloat16 weights train in place, the optimizer rounding each update
    # stochastically (trainer/optim/stochastic_rounding.py)
    module.requires_grad_(True)
    return list(module.parameters())


def parameters_of(module: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    """The parameters the method trains in `module` (frozen by 'stop training after')."""
    return list(module.parameters()) if is_fine_tune(config) else lora.lora_parameters_of(module)


def writes_folder(config: TrainConfig) -> bool:
    return is_fine_tune(config) and config.output_model_format == ModelFormat.DIFFUSERS


def output_path(config: TrainConfig) -> Path:
    """A `.safetensors` file, or for a diffusers export a folder (a '.safetensors' ending
    given for it is dropped)."""
    if config.output_model_destination:
        path = Path(config.output_model_destination)
    else:
        name = {TrainingMethod.FINE_TUNE: "model", TrainingMethod.EMBEDDING: "embedding"}.get(
            config.training_method, "lora")
        path = Path(config.workspace_dir) / "output" / name
    if writes_folder(config):
        return path.with_suffix("") if path.suffix == ".safetensors" else path
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


def config_path(output: Path) -> Path:
    """The config JSON beside an output: `x.safetensors` -> `x.json`, folder `x` -> `x.json`."""
    output = Path(output)
    if output.suffix == ".safetensors":
        return output.with_suffix(".json")
    return output.with_name(output.name + ".json")


def save_output(path: Path, family, parts: list[str], config: TrainConfig, *,
                dtype: torch.dtype, steps: int, epochs: int, title: str) -> None:
    """Write the trained result to `path` (atomically) and its config beside it."""
    path = Path(path)
    embeddings = getattr(family, "embeddings", None)
    if config.training_method == TrainingMethod.EMBEDDING:
        embeddings.save_files(path, dtype, embedding_metadata(config, family, steps=steps,
                                                              epochs=epochs))
    elif not is_fine_tune(config):
        bundle = (embeddings.bundle_tensors(dtype)
                  if embeddings is not None and config.bundle_additional_embeddings else None)
        lora_formats.save_lora(str(path), family, parts, config, dtype=dtype, steps=steps,
                               epochs=epochs, title=title, extra=bundle)
        if embeddings is not None:
            embeddings.save_files(path, dtype, embedding_metadata(config, family, steps=steps,
                                                                  epochs=epochs))
    else:
        metadata = checkpoint_metadata(config, family, steps=steps, epochs=epochs, title=title)
        if writes_folder(config):
            save_diffusers_folder(family, path, dtype, metadata)
        else:
            # ORIGINAL_SINGLE_FILE, or LEGACY_SAFETENSORS: OneTrainer's older single-file
            # format, for SD 1.5 / SDXL the same original-layout checkpoint.
            family.save_single_file(path, dtype, metadata)
    atomic_write_text(config_path(path), config.to_json())


def embedding_metadata(config: TrainConfig, family, *, steps: int,
                       epochs: int) -> dict[str, str]:
    """An embedding file's header (its architecture and title are set per file)."""
    return {"modelspec.implementation": "diffusers",
            **_run_metadata(config, family, steps, epochs, "textual inversion")}


def _run_metadata(config: TrainConfig, family, steps: int, epochs: int,
                  what: str) -> dict[str, str]:
    """What every whole-model or embedding file's header says of its run."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": config.resolution,
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": config.base_model_name,
        "ss_steps": str(steps),
        "ss_num_epochs": str(epochs),
        "ss_training_comment": f"{what}, trained with Atelier",
        "atelier_config": config.to_json(),
    }


def checkpoint_metadata(config: TrainConfig, family, *, steps: int, epochs: int,
                        title: str) -> dict[str, str]:
    """Stability's model-spec fields, a few kohya-style facts, and the exact config."""
    return {
        "modelspec.architecture": family.checkpoint_architecture,
        "modelspec.implementation": family.implementation,
        "modelspec.title": title,
        **_run_metadata(config, family, steps, epochs, "full fine-tune"),
    }


# --- Diffusers folder -----------------------------------------------------------------------

def save_diffusers_folder(family, path: Path, dtype: torch.dtype,
                          metadata: dict[str, str]) -> Path:
    """The model as a diffusers folder (`from_pretrained` loads it), weights in `dtype`.

    The training modules are not cast (training may go on after a save): each model's state
    dict is converted tensor by tensor as it is written. Written into a temporary folder
    beside `path` and renamed into place, so an interrupted save leaves the old output (if
    any) or nothing, never a half-written model.
    """
    from diffusers import ModelMixin

    path = Path(path)
    refuse_unless_replaceable(path)  # never a job folder, a dataset or any other folder
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline = family.export_pipeline()
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        pipeline.save_config(staging)  # model_index.json
        for name, component in pipeline.components.items():
            if component is None:
                continue
            folder = staging / name
            if isinstance(component, torch.nn.Module):
                component = getattr(component, "_orig_mod", component)  # torch.compile
                state = _cast_state_dict(component, dtype)
                header = {"format": "pt", **metadata}
                if isinstance(component, ModelMixin):
                    component.save_config(folder)
                    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), header)
                else:  # transformers
                    folder.mkdir()
                    component.config.save_pretrained(folder)
                    _set_config_dtype(folder / "config.json", dtype)
                    save_file(state, str(folder / "model.safetensors"), header)
            else:  # tokenizers, scheduler
                component.save_pretrained(folder)
        for file in staging.rglob("*"):
            os.chmod(file, 0o755 if file.is_dir() else 0o644)
        os.chmod(staging, 0o755)
        mark_model_folder(staging)
        _replace_folder(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _cast_state_dict(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in module.state_dict().items():
        if key.endswith("position_ids"):
            continue  # a buffer transformers rebuilds; not saved by transformers itself
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses shared memory
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[key] = tensor
    return out


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """transformers records the weights' dtype in config.json ("dtype"); say what was written."""
    data = json.loads(config_file.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in data:
            data[key] = name
    data.setdefault("dtype", name)
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _replace_folder(new: Path, path: Path) -> None:
    """Put folder `new` at `path` (trainer/io.py: only over a model folder a save made)."""
    replace_folder(new, path)
