"""`lora extract`: a LoRA from the difference between a fine-tuned model and its base, by rank
or by the share of each layer's energy to keep.

Every linear and conv layer of every part (text encoders included) whose weight changed gets
a layer: the truncated SVD of W_tuned - W_base (svd.py; a conv's [out, in, k, k] delta as
down [r, in, k, k] and up [out, r, 1, 1]). A layer counts as changed when its delta's norm is
above CHANGED of the base weight's: a fine-tune saved in float16 moves every weight by its
rounding (~5e-4 relative), far less than training does, and those layers are left out.

SD 1.5 and SDXL are written in the kohya layout (SDXL's UNet by its original SGM names, as
Atelier's KOHYA_LORA and kohya's sd-scripts name them); the flow families (Flux.1, Chroma, SD 3)
in the diffusers layout, the one that needs no fused-layer names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer.errors import ConfigError
from trainer.io import atomic_save_safetensors
from trainer.lora_formats import kohya_layer_names
from trainer.lora_tools import svd, targets
from trainer.lora_tools.layers import plain_layer_tensors, tool_metadata

Progress = Callable[[int, int, str], None]
CHANGED = 1e-3  # relative norm of a delta below which a layer is unchanged (see above)


@dataclass
class ExtractResult:
    output: Path
    model_type: str
    layers: list[dict]           # name, part, rank, kept_energy, error
    unchanged: int               # layers left out
    overall_error: float

    def to_dict(self) -> dict:
        return {"output": str(self.output), "model_type": self.model_type,
                "unchanged_layers": self.unchanged, "overall_error": self.overall_error,
                "ranks": sorted({l["rank"] for l in self.layers}), "layers": self.layers}

    def text(self) -> str:
        parts = sorted({l["part"] for l in self.layers})
        return (f"Wrote {self.output.name}: {len(self.layers)} changed layers ({', '.join(parts)})"
                f", error {self.overall_error:.3%} overall; {self.unchanged} unchanged layers "
                "left out.")


def extract(base: str, tuned: str, out: str | Path, *, rank: int | None = None,
            energy: float | None = None, model_type: str | None = None,
            on_progress: Progress | None = None) -> ExtractResult:
    svd.check_target(rank, energy)
    model_type = model_type or targets.guess_model_type(base)
    base_family = targets.load_base(base, model_type, "--base")
    tuned_family = targets.load_base(tuned, model_type, "--tuned")
    flow = base_family.facts.flow_matching
    tensors, reports, lows, unchanged = {}, [], [], 0
    work = [(part, name) for part, model in base_family.parts.items()
            for name, m in model.named_modules() if isinstance(m, targets.ADAPTABLE)]
    names = {part: _layer_names(base_family, part, [n for p, n in work if p == part], flow)
             for part in base_family.parts}
    with torch.no_grad():
        for i, (part, module) in enumerate(work):
            w_base = base_family.parts[part].get_submodule(module).weight.float()
            try:
                w_tuned = tuned_family.parts[part].get_submodule(module).weight.float()
            except AttributeError:
                raise ConfigError(f"--tuned: it has no layer {module} in its {part} (another "
                                  "architecture than --base?).") from None
            if w_tuned.shape != w_base.shape:
                raise ConfigError(f"--tuned: its {part} layer {module} has the shape "
                                  f"{tuple(w_tuned.shape)}, --base's {tuple(w_base.shape)} "
                                  "(not a fine-tune of this base model).")
            delta = w_tuned - w_base
            svd.require_finite(delta, module)
            if delta.norm() <= CHANGED * w_base.norm():
                unchanged += 1
            else:
                low = svd.low_rank_of_delta(delta, rank=rank, energy=energy)
                name = names[part][module]
                lows.append(low)
                reports.append({"name": name, "part": part, "rank": low.rank,
                                "kept_energy": low.kept_energy, "error": low.error})
                tensors.update(plain_layer_tensors(name, low.down, low.up, low.alpha,
                                                   "diffusers" if flow else "kohya",
                                                   torch.float32))
            if on_progress:
                on_progress(i + 1, len(work), module)
    if not reports:
        raise ConfigError("--tuned: no layer differs from --base (the same model?); nothing to "
                          "extract.")
    ranks = sorted({r["rank"] for r in reports})
    result = ExtractResult(Path(out), model_type, reports, unchanged, svd.overall_error(lows))
    metadata = tool_metadata("extract", {
        "base_model": str(base), "tuned_model": str(tuned), "model_type": model_type,
        "target": {"rank": rank} if rank is not None else {"energy": energy},
        "ranks": ranks, "overall_error": result.overall_error})
    dim = str(ranks[0]) if len(ranks) == 1 else "dynamic"
    metadata.update({"ss_network_module": "networks.lora", "ss_network_dim": dim,
                     "ss_network_alpha": dim,
                     "ss_base_model_version": base_family.base_model_version,
                     "ss_sd_model_name": str(base),
                     "modelspec.sai_model_spec": "1.0.0",
                     "modelspec.architecture": base_family.lora_architecture,
                     "modelspec.title": Path(out).stem})
    atomic_save_safetensors(tensors, out, metadata)
    return result


def _layer_names(family, part: str, modules: list[str], flow: bool) -> dict[str, str]:
    """Each module's layer name in the file (see the module note)."""
    model = family.parts[part]
    # transformers >= 5.6 flattened CLIPTextModel; files spell CLIP's 'text_model.' out
    flattened = "CLIP" in type(model).__name__ and not hasattr(model, "text_model")
    spelled = {m: ("text_model." + m if flattened else m) for m in modules}
    if flow:
        return {m: f"{part}.{s}" for m, s in spelled.items()}
    prefix = family.kohya_prefixes[part]
    if part == "unet":
        sdxl = "XL" in family.facts.model_type
        return kohya_layer_names(model, part, modules, prefix, sgm=sdxl)
    return {m: prefix + s.replace(".", "_") for m, s in spelled.items()}
