"""`lora resize`: a LoRA to a lower rank by SVD, by a fixed rank or by the share of each layer's
energy to keep (a dynamic rank per layer, like kohya's resize_lora's `sv_fro`, here on squared
singular values), with the error per layer and overall.

Each layer's delta (alpha/rank included) is replaced by its best approximation of the chosen
rank (svd.py), written as a plain LoRA with alpha = its rank (scale 1) under the layer's own
name, in the file's own layout; a layer is never given more rank than it had. LoHa and LoKr
layers become plain LoRA layers (their delta's SVD). A DoRA layer keeps its dora_scale /
magnitude as it is (exact at full rank; a lower rank changes dW under the same scale).
Bundled embeddings are carried over unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from trainer.io import atomic_save_safetensors
from trainer.lora_tools import svd
from trainer.lora_tools.layers import (Layer, dora_of, embedding_tensors, layout_of,
                                       plain_layer_tensors, read_lora, source_record,
                                       tool_metadata)

Progress = Callable[[int, int, str], None]


@dataclass
class LayerReport:
    name: str
    rank_before: int
    rank: int
    kept_energy: float
    error: float       # relative Frobenius error of the layer's delta

    def to_dict(self) -> dict:
        return {"name": self.name, "rank_before": self.rank_before, "rank": self.rank,
                "kept_energy": self.kept_energy, "error": self.error}


@dataclass
class ResizeResult:
    output: Path
    layers: list[LayerReport]
    overall_error: float

    def to_dict(self) -> dict:
        return {"output": str(self.output), "overall_error": self.overall_error,
                "ranks": sorted({l.rank for l in self.layers}),
                "layers": [l.to_dict() for l in self.layers]}

    def text(self) -> str:
        ranks = sorted({l.rank for l in self.layers})
        worst = max(self.layers, key=lambda l: l.error)
        shown = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"
        return (f"Wrote {self.output.name}: {len(self.layers)} layers at {shown}; error "
                f"{self.overall_error:.3%} overall, worst {worst.error:.3%} ({worst.name}).")


def low_rank_of_layer(layer: Layer, rank: int | None, energy: float | None,
                      max_rank: int | None = None) -> svd.LowRank:
    """A layer's delta at the chosen rank (the QR route for plain LoRA factors)."""
    if layer.kind == "lora":
        up = layer.tensors["up"] * layer.scale
        return svd.low_rank_of_factors(up, layer.tensors["down"], layer.delta_shape, rank=rank,
                                       energy=energy, max_rank=max_rank or layer.rank)
    delta = layer.delta()
    svd.require_finite(delta, layer.name)
    return svd.low_rank_of_delta(delta, rank=rank, energy=energy, max_rank=max_rank)


def resize(path: str | Path, out: str | Path, *, rank: int | None = None,
           energy: float | None = None, on_progress: Progress | None = None,
           field_name: str = "FILE") -> ResizeResult:
    svd.check_target(rank, energy)
    contents = read_lora(path, field_name)
    tensors, reports, parts = {}, [], []
    names = list(contents.layers)
    for i, name in enumerate(names):
        layer = contents.layers[name]
        for factor in layer.tensors.values():
            svd.require_finite(factor, name)
        cap = layer.rank if layer.kind == "lora" else None
        low = low_rank_of_layer(layer, rank, energy, cap)
        parts.append(low)
        reports.append(LayerReport(name, layer.rank, low.rank, low.kept_energy, low.error))
        tensors.update(plain_layer_tensors(name, low.down, low.up, low.alpha, layout_of(name),
                                           layer.dtype, dora_of(layer)))
        if on_progress:
            on_progress(i + 1, len(names), name)
    tensors.update(embedding_tensors(contents))
    result = ResizeResult(Path(out), reports, svd.overall_error(parts))
    ranks = sorted({r.rank for r in reports})
    metadata = tool_metadata("resize", {
        "sources": [source_record(contents)],
        "target": {"rank": rank} if rank is not None else {"energy": energy},
        "ranks": ranks, "overall_error": result.overall_error}, contents.metadata)
    metadata["ss_network_dim"] = str(ranks[0]) if len(ranks) == 1 else "dynamic"
    metadata["ss_network_alpha"] = metadata["ss_network_dim"]
    if any(contents.layers[n].kind != "lora" for n in names):
        metadata["ss_network_module"] = "networks.lora"
        metadata.pop("ss_network_args", None)
    atomic_save_safetensors(tensors, out, metadata)
    return result

