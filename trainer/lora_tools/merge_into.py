"""`lora merge-into`: LoRAs baked into their base model, each at its strength, written as the
family's single file or a diffusers folder — by the same code a fine-tune's save uses
(`family.save_single_file`, `finetune.save_diffusers_folder`), so the checkpoint loads
wherever a fine-tune's does.

Each file layer is applied to the weight it names (targets.py finds it in any layout) as its
loaders apply it (layers.py: LoRA, LoHa, LoKr, DoRA); several files are applied one after the
other. Every file's layers are matched to the model before any weight changes, so a LoRA of
another model is refused by name. The base is loaded in float32 on the CPU; the output is
written in `dtype` (float32 by default: nothing is rounded unless asked).

For Flux.1, Chroma and SD 3/3.5 the single file holds the transformer alone (the families'
ORIGINAL_SINGLE_FILE); a LoRA's text-encoder layers then reach only the diffusers folder, and
the result says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainer.errors import ConfigError
from trainer.lora_tools import targets
from trainer.lora_tools.layers import read_lora, source_record, tool_metadata

Progress = Callable[[int, int, str], None]
FORMATS = ("ORIGINAL_SINGLE_FILE", "DIFFUSERS")
DTYPES = {"FLOAT_32": torch.float32, "FLOAT_16": torch.float16, "BFLOAT_16": torch.bfloat16}


@dataclass
class MergeIntoResult:
    output: Path
    model_type: str
    output_format: str
    layers: dict[str, int]          # file name -> layers applied
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"output": str(self.output), "model_type": self.model_type,
                "format": self.output_format, "layers": self.layers, "notes": self.notes}

    def text(self) -> str:
        applied = ", ".join(f"{name} ({n} layers)" for name, n in self.layers.items())
        return " ".join([f"Wrote {self.output.name} ({self.output_format}): {applied} merged "
                         "into the base model.", *self.notes])


def output_path(out: str | Path, output_format: str) -> Path:
    path = Path(out)
    if output_format == "DIFFUSERS":
        return path.with_suffix("") if path.suffix == ".safetensors" else path
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


def merge_into(base: str, sources: list[tuple[str | Path, float]], out: str | Path, *,
               output_format: str = "ORIGINAL_SINGLE_FILE", model_type: str | None = None,
               dtype: str = "FLOAT_32", on_progress: Progress | None = None) -> MergeIntoResult:
    if output_format not in FORMATS:
        raise ConfigError(f"--format {output_format}: choose {' or '.join(FORMATS)}.")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}.")
    if not sources:
        raise ConfigError("--lora: name at least one LoRA file to merge into the model.")
    files = [(read_lora(path, "--lora"), float(strength)) for path, strength in sources]
    model_type = model_type or targets.guess_model_type(base, [c.metadata for c, _ in files])
    family = targets.load_base(base, model_type)
    plan = _plan(family, files)
    total = sum(len(p[1]) + len(p[2]) for p in plan)
    done = 0
    with torch.no_grad():
        for contents, plain, flow, strength in plan:
            for part, module, layer in plain:
                weight = family.parts[part].get_submodule(module).weight
                weight.copy_(layer.applied(weight, strength).to(weight.dtype))
                done += 1
                if on_progress:
                    on_progress(done, total, layer.name)
            if flow:
                transformer = family.parts["transformer"]
                for module, delta in targets.flow_denoiser_deltas(family, flow).items():
                    weight = transformer.get_submodule(module).weight
                    weight.add_(strength * delta.reshape(weight.shape).to(weight.dtype))
                done += len(flow)
                if on_progress:
                    on_progress(done, total, f"{contents.path.name}: transformer layers")
    path = output_path(out, output_format)
    metadata = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.checkpoint_architecture,
        "modelspec.implementation": family.implementation,
        "modelspec.title": path.stem,
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": str(base),
        **tool_metadata("merge-into", {
            "base_model": str(base), "model_type": model_type,
            "sources": [source_record(c, s) for c, s in files]}),
    }
    if on_progress:
        on_progress(total, total, f"writing {path.name}")
    if output_format == "DIFFUSERS":
        from trainer.finetune import save_diffusers_folder
        save_diffusers_folder(family, path, DTYPES[dtype], metadata)
    else:
        family.save_single_file(path, DTYPES[dtype], metadata)
    notes = []
    if output_format == "ORIGINAL_SINGLE_FILE" and family.facts.flow_matching and any(
            part != "transformer" for _, plain, _, _ in plan for part, _, _ in plain):
        notes.append(f"{family.facts.label}'s single file holds the transformer alone: the "
                     "text-encoder layers are in a DIFFUSERS export only.")
    return MergeIntoResult(path, model_type, output_format,
                           {c.path.name: len(p) + len(f) for c, p, f, _ in plan}, notes)


def _plan(family, files):
    """[(contents, [(part, module, layer)], [flow transformer layers], strength)] with every
    layer of every file matched to the model (ConfigError naming the file and layer else)."""
    table = targets.weight_targets(family)
    label = family.facts.label
    plan = []
    for contents, strength in files:
        plain, flow = [], []
        for name, layer in contents.layers.items():
            if targets.is_flow_original_name(family, name):
                flow.append(layer)
            elif name in table:
                plain.append((*table[name], layer))
            else:
                raise ConfigError(f"--lora '{contents.path.name}': its layer {name} is not a "
                                  f"layer of this {label} model (a LoRA for another model "
                                  "type? give --model-type).")
        plan.append((contents, plain, flow, strength))
    return plan
