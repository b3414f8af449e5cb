"""One job: name a flow-matching transformer's LoRA layers as other programs expect them, and
read such a file back into per-module LoRAs.

Atelier trains LoRAs on diffusers' modules (`transformer_blocks.0.attn.to_q`, ...). The files
people load elsewhere name the original model's layers (trainer/models/transformer_layouts.py
holds the table), where diffusers' separate q, k, v (and a Flux single block's q, k, v and
MLP-in) are one fused layer (`img_attn.qkv`, `linear1`):

- KOHYA_LORA: `lora_unet_<original layer, '.' -> '_'>.lora_down.weight` / `.lora_up.weight` /
  `.alpha` - what kohya's sd-scripts writes for Flux.1 and Chroma (networks/lora_flux.py) and
  SD 3 (networks/lora_sd3.py), and the `lora_unet_` names ComfyUI derives from its own model.
- COMFY_LORA: `diffusion_model.<original layer>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  ComfyUI's generic names (comfy/lora.py, model_lora_keys_unet). diffusers' Flux loader reads
  these too (it turns `diffusion_model.` into `lora_unet_`).

A fused layer is written exactly. With parts j = q, k, v (, mlp), each trained with down D_j
[r_j, in], up U_j [out_j, r_j] and scale s_j = alpha_j / r_j, the fused layer gets
    down = [D_q; D_k; D_v]          (rows concatenated: rank R = sum r_j)
    up   = block-diagonal(U_q, U_k, U_v)   (part j's rows x part j's rank columns; zeros elsewhere)
    alpha = s * R                    (so a loader's alpha / R is s, each part's own scale)
and then (alpha / R) * up @ down has, in part j's rows, s * U_j @ D_j + 0: each part's own delta,
nothing leaking into the others, because the off-diagonal blocks of up are zero. A part with no
LoRA has no columns and zero rows (its delta is zero); parts with unequal scales get s_j / s
folded into their up block. This is how kohya's own split-q/k/v training saves (its state_dict
merge), except that it keeps alpha, which shrinks the scale by the number of parts in every other
loader.

Plain LoRA only (down, up, alpha): LoHa, LoKr and DoRA files for these families are left to the
formats that hold them per module.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trainer.errors import ConfigError
from trainer.models.transformer_layouts import (CHROMA, FLUX, Layer, family_of, layers,
                                                 swap_halves)

KOHYA_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
DOWN, UP, ALPHA = "lora_down.weight", "lora_up.weight", "alpha"


@dataclass(frozen=True)
class LoraWeights:
    """One module's LoRA: delta W = (alpha / rank) * up @ down."""
    down: torch.Tensor  # [rank, in]  (peft's lora_A)
    up: torch.Tensor    # [out, rank] (peft's lora_B)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change, in float32 (a conv LoRA's [out, in, k, k] too)."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        delta = self.scale * (up @ down)
        return delta.reshape(self.up.shape[0], *self.down.shape[1:])


def kohya_lora(family: str, shapes: Mapping[str, tuple], loras: Mapping[str, LoraWeights]
               ) -> dict[str, torch.Tensor]:
    """KOHYA_LORA tensors for the `loras` of diffusers modules (no 'transformer.' prefix);
    `shapes` are the transformer's {state-dict key: shape} (transformer_layouts.module_shapes)."""
    return _write(family, shapes, loras, lambda original: KOHYA_PREFIX + original.replace(".", "_"))


# Families whose LoRAs ComfyUI reads under diffusers' own module names: for Z-Image (its
# Lumina2 model) comfy/lora.py maps 'diffusion_model.<diffusers layer>' onto its fused qkv
# and renamed layers itself (comfy/utils.py z_image_to_diffusers), so each module is written
# as it is, exactly. Qwen-Image's ComfyUI model (comfy/ldm/qwen_image) has diffusers' module
# names themselves, which comfy/lora.py's generic 'diffusion_model.<module>' keys reach.
COMFY_DIFFUSERS_NAMES = ("Z_IMAGE", "QWEN")


def comfy_lora(family: str, shapes: Mapping[str, tuple], loras: Mapping[str, LoraWeights]
               ) -> dict[str, torch.Tensor]:
    """COMFY_LORA tensors: the same layers under 'diffusion_model.<original name>'."""
    if family in COMFY_DIFFUSERS_NAMES:
        return _write_modules(loras, lambda module: COMFY_PREFIX + module)
    return _write(family, shapes, loras, lambda original: COMFY_PREFIX + original)


def original_lora_layers(family: str, shapes: Mapping[str, tuple],
                         loras: Mapping[str, LoraWeights]) -> dict[str, LoraWeights]:
    """{original layer name: its LoRA}: every trained module placed on its original layer,
    fused layers built as the module note says."""
    table = [layer for layer in layers(family, shapes) if layer.takes_lora]
    layer_of = {part: layer for layer in table for part in layer.parts}
    unknown = sorted(set(loras) - set(layer_of))
    if unknown:
        raise ValueError(f"the {family_of(family)} transformer has no layer for the LoRA "
                         f"modules {', '.join(unknown[:5])}")
    out = {}
    for layer in table:
        if any(part in loras for part in layer.parts):
            lora = _fuse(layer, shapes, loras) if layer.fused else loras[layer.parts[0]]
            if layer.swap_halves:
                lora = LoraWeights(lora.down, swap_halves(lora.up), lora.alpha)
            if _alpha_ignored(family, layer):
                lora = _alpha_folded(lora)
            out[layer.original] = lora
    return out


def _write(family, shapes, loras, name_of) -> dict[str, torch.Tensor]:
    out = {}
    for original, lora in original_lora_layers(family, shapes, loras).items():
        name = name_of(original)
        out[f"{name}.{DOWN}"] = lora.down.contiguous()
        out[f"{name}.{UP}"] = lora.up.contiguous()
        out[f"{name}.{ALPHA}"] = torch.tensor(float(lora.alpha))
    return out


def _write_modules(loras, name_of) -> dict[str, torch.Tensor]:
    out = {}
    for module, lora in loras.items():
        name = name_of(module)
        out[f"{name}.{DOWN}"] = lora.down.contiguous()
        out[f"{name}.{UP}"] = lora.up.contiguous()
        out[f"{name}.{ALPHA}"] = torch.tensor(float(lora.alpha))
    return out


def _fuse(layer: Layer, shapes, loras) -> LoraWeights:
    trained = [(j, loras[part]) for j, part in enumerate(layer.parts) if part in loras]
    widths = [shapes[f"{part}.weight"][0] for part in layer.parts]
    scale = trained[0][1].scale
    rank = sum(lora.rank for _, lora in trained)
    first_up = trained[0][1].up
    up = first_up.new_zeros((sum(widths), rank, *first_up.shape[2:]))
    column = 0
    for j, lora in trained:
        row = sum(widths[:j])
        block = lora.up if lora.scale == scale else (lora.up.float() * (lora.scale / scale)
                                                     ).to(first_up.dtype)
        up[row:row + widths[j], column:column + lora.rank] = block
        column += lora.rank
    down = torch.cat([lora.down for _, lora in trained])
    alpha = trained[0][1].alpha * rank / trained[0][1].rank  # scale * rank, exact in floats
    return LoraWeights(down, up, alpha)


def _alpha_ignored(family: str, layer: Layer) -> bool:
    """diffusers 0.42.1's kohya Flux reader copies `final_layer` LoRAs without their alpha
    (lora_conversion_utils: 'TODO: alphas'), so there alpha / rank is folded into up and alpha
    written as the rank: the same delta in every loader."""
    return family_of(family) in (FLUX, CHROMA) and layer.original.startswith("final_layer.")


def _alpha_folded(lora: LoraWeights) -> LoraWeights:
    if lora.alpha == lora.rank:
        return lora
    up = (lora.up.float() * lora.scale).to(lora.up.dtype)
    return LoraWeights(lora.down, up, float(lora.rank))


# --- reading back -----------------------------------------------------------------------------

def read_flow_lora(family: str, shapes: Mapping[str, tuple], tensors: Mapping[str, torch.Tensor],
                   ranks: Mapping[str, int] | None = None) -> dict[str, LoraWeights]:
    """A KOHYA_LORA or COMFY_LORA file's tensors (ours, or kohya's) back to per-module LoRAs
    {diffusers module: LoraWeights}, each with the delta the file gives that module.

    A fused layer is split by its output rows. With `ranks` ({module: rank} of the adapters to
    load into, e.g. to continue training) each trained part gets back its own rank columns - the
    block-diagonal layout `kohya_lora` writes - and a file whose up matrix is not laid out so is
    refused. Without `ranks` every part shares the whole down matrix (rank R) with its rows of
    up: exact for any fused LoRA, and zero for a part the file does not train."""
    table = [layer for layer in layers(family, shapes) if layer.takes_lora]
    layer_of_name = {}
    for layer in table:
        layer_of_name[KOHYA_PREFIX + layer.original.replace(".", "_")] = layer
        layer_of_name[COMFY_PREFIX + layer.original] = layer
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, suffix = _split_key(key)
        if name not in layer_of_name:
            raise ConfigError(f"the LoRA layer '{name}' is not a layer of the "
                              f"{family_of(family)} transformer")
        grouped.setdefault(name, {})[suffix] = tensor
    out: dict[str, LoraWeights] = {}
    for name, parts in grouped.items():
        if DOWN not in parts or UP not in parts:
            raise ConfigError(f"the LoRA layer '{name}' lacks its lora_down or lora_up weight")
        layer = layer_of_name[name]
        down, up = parts[DOWN], parts[UP]
        alpha = float(parts[ALPHA]) if ALPHA in parts else float(down.shape[0])
        if layer.swap_halves:
            up = swap_halves(up)
        if not layer.fused:
            out[layer.parts[0]] = LoraWeights(down, up, alpha)
        elif ranks is None:
            out.update(_shared_down(layer, shapes, down, up, alpha))
        else:
            out.update(_block_diagonal(layer, shapes, down, up, alpha, ranks, name))
    return out


def _split_key(key: str) -> tuple[str, str]:
    for suffix in (DOWN, UP, ALPHA):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    raise ConfigError(f"'{key}' is not a LoRA tensor (lora_down, lora_up or alpha)")


def _row_ranges(layer: Layer, shapes) -> list[slice]:
    ranges, row = [], 0
    for part in layer.parts:
        width = shapes[f"{part}.weight"][0]
        ranges.append(slice(row, row + width))
        row += width
    return ranges


def _shared_down(layer, shapes, down, up, alpha) -> dict[str, LoraWeights]:
    return {part: LoraWeights(down, up[rows].contiguous(), alpha)
            for part, rows in zip(layer.parts, _row_ranges(layer, shapes))}


def _block_diagonal(layer, shapes, down, up, alpha, ranks, name) -> dict[str, LoraWeights]:
    trained = [(part, rows) for part, rows in zip(layer.parts, _row_ranges(layer, shapes))
               if part in ranks]
    total = down.shape[0]
    if sum(ranks[part] for part, _ in trained) != total:
        raise ConfigError(f"the LoRA layer '{name}' has rank {total}, not the sum of the ranks "
                          f"of its trained parts ({', '.join(p for p, _ in trained) or 'none'})")
    expected = torch.zeros(up.shape[:2], dtype=torch.bool)  # where the layout allows values
    out, column = {}, 0
    for part, rows in trained:
        columns = slice(column, column + ranks[part])
        expected[rows, columns] = True
        out[part] = LoraWeights(down[columns].contiguous(), up[rows, columns].contiguous(),
                                alpha * ranks[part] / total)
        column += ranks[part]
    if up.reshape(*up.shape[:2], -1).ne(0).any(dim=2)[~expected].any():
        raise ConfigError(f"the LoRA layer '{name}' does not split into separate LoRAs of "
                          f"{', '.join(p for p, _ in trained)} with these ranks")
    return out
