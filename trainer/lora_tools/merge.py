"""`lora merge`: several LoRAs into one LoRA file, each at its strength.

Without a target rank the layers are concatenated along the rank: for a layer in files i,
down = [down_i] stacked, up = [strength_i * alpha_i/rank_i * up_i] side by side, alpha = the
summed rank (scale 1), so the merged delta is exactly sum_i strength_i * dW_i. With --rank or
--energy the summed delta is cut by SVD (svd.py) and the kept energy reported per layer.

Layers are matched by their names as the files spell them; a layer only one file has is
carried with its strength. Files of different layouts (kohya and diffusers names for the same
weight) are merged layer by layer under their own names: loaders add both, so the sum holds.
Concatenation needs plain LoRA layers; LoHa and LoKr layers are merged through their deltas
with --rank. DoRA layers are refused: their per-channel magnitudes do not add.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from trainer.errors import ConfigError
from trainer.io import atomic_save_safetensors
from trainer.lora_tools import svd
from trainer.lora_tools.layers import (Layer, LoraContents, embedding_tensors, layout_of,
                                       plain_layer_tensors, read_lora, source_record,
                                       tool_metadata)

Progress = Callable[[int, int, str], None]
# header fields of the first file that still describe the merged one
KEPT_FIELDS = ("ss_base_model_version", "ss_sd_model_name", "modelspec.architecture",
               "modelspec.sai_model_spec", "modelspec.implementation", "modelspec.resolution",
               "ss_resolution")


@dataclass
class MergeResult:
    output: Path
    layers: list[dict]       # name, rank, and with a target: kept_energy, error
    overall_error: float     # 0 for a concatenation (exact)

    def to_dict(self) -> dict:
        return {"output": str(self.output), "overall_error": self.overall_error,
                "ranks": sorted({l["rank"] for l in self.layers}), "layers": self.layers}

    def text(self) -> str:
        ranks = sorted({l["rank"] for l in self.layers})
        shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"
        how = ("concatenated, exact" if self.overall_error == 0 and
               "kept_energy" not in self.layers[0] else f"error {self.overall_error:.3%} overall")
        return f"Wrote {self.output.name}: {len(self.layers)} layers at {shown} ({how})."


def merge(sources: list[tuple[str | Path, float]], out: str | Path, *, rank: int | None = None,
          energy: float | None = None, on_progress: Progress | None = None) -> MergeResult:
    """Merge `sources` ((file, strength), …) into `out`."""
    if not sources:
        raise ConfigError("FILE: name at least one LoRA file to merge.")
    if rank is not None or energy is not None:
        svd.check_target(rank, energy)  # one of them, in range
    files = [(read_lora(path, "FILE"), float(strength)) for path, strength in sources]
    by_name: dict[str, list[tuple[Layer, float, LoraContents]]] = {}
    for contents, strength in files:
        for name, layer in contents.layers.items():
            by_name.setdefault(name, []).append((layer, strength, contents))
    target = rank is not None or energy is not None
    for name, found in by_name.items():
        for layer, _, contents in found:
            if layer.dora:
                raise ConfigError(f"'{contents.path.name}': layer {name} is a DoRA layer; its "
                                  "magnitude cannot be merged with other layers (bake it into "
                                  "the model with merge-into instead).")
            if layer.kind != "lora" and not target:
                raise ConfigError(f"'{contents.path.name}': layer {name} is a {layer.kind} "
                                  "layer; concatenation needs plain LoRA layers. Give --rank R "
                                  "to merge it through its delta by SVD.")
    tensors, reports, parts = {}, [], []
    for i, (name, found) in enumerate(by_name.items()):
        dtype = found[0][0].dtype
        if target:
            low = _cut(name, found, rank, energy)
            parts.append(low)
            reports.append({"name": name, "rank": low.rank, "kept_energy": low.kept_energy,
                            "error": low.error})
            down, up, alpha = low.down, low.up, low.alpha
        else:
            down, up = _concatenated(name, found)
            alpha = float(down.shape[0])
            reports.append({"name": name, "rank": down.shape[0]})
        tensors.update(plain_layer_tensors(name, down, up, alpha, layout_of(name), dtype))
        if on_progress:
            on_progress(i + 1, len(by_name), name)
    for contents, _ in files:
        for key, value in embedding_tensors(contents).items():
            tensors.setdefault(key, value)
    first = files[0][0].metadata
    base = {k: first[k] for k in KEPT_FIELDS if k in first}
    ranks = sorted({r["rank"] for r in reports})
    result = MergeResult(Path(out), reports, svd.overall_error(parts) if target else 0.0)
    metadata = tool_metadata("merge", {
        "sources": [source_record(c, s) for c, s in files],
        "method": "svd" if target else "concatenate",
        **({"target": {"rank": rank} if rank is not None else {"energy": energy}}
           if target else {}),
        "ranks": ranks, "overall_error": result.overall_error}, base)
    metadata.update({"ss_network_module": "networks.lora",
                     "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic"})
    metadata["ss_network_alpha"] = metadata["ss_network_dim"]
    atomic_save_safetensors(tensors, out, metadata)
    return result


def _concatenated(name: str, found) -> tuple[torch.Tensor, torch.Tensor]:
    downs, ups = [], []
    for layer, strength, contents in found:
        down, up = layer.tensors["down"], layer.tensors["up"]
        if downs and (down.shape[1:] != downs[0].shape[1:] or up.shape[0] != ups[0].shape[0]
                      or up.dim() != ups[0].dim()):
            raise ConfigError(f"'{contents.path.name}': layer {name} has the shape "
                              f"{tuple(up.shape[:1])}x{tuple(down.shape[1:])}, another file "
                              f"{tuple(ups[0].shape[:1])}x{tuple(downs[0].shape[1:])} (LoRAs "
                              "of different models?).")
        downs.append(down)
        ups.append(up * (strength * layer.scale))
    return torch.cat(downs, 0), torch.cat(ups, 1)


def _cut(name: str, found, rank, energy) -> svd.LowRank:
    if all(layer.kind == "lora" for layer, _, _ in found):
        down, up = _concatenated(name, found)
        return svd.low_rank_of_factors(up, down, found[0][0].delta_shape, rank=rank,
                                       energy=energy)
    total = None
    for layer, strength, contents in found:
        delta = strength * layer.delta()
        if total is not None and delta.numel() != total.numel():
            raise ConfigError(f"'{contents.path.name}': layer {name} changes a weight of "
                              f"another size than the other files' (LoRAs of different "
                              "models?).")
        total = delta if total is None else total + delta.reshape(total.shape)
    svd.require_finite(total, name)
    return svd.low_rank_of_delta(total, rank=rank, energy=energy)
