"""One job: the flow-matching transformers' weight names in their original single-file layouts
and in diffusers', both ways.

The original layouts are the ones people download and that ComfyUI / Forge load as a diffusion
model: Black Forest Labs' for Flux.1 dev / schnell and Chroma (`double_blocks.N.img_attn.qkv`,
`single_blocks.N.linear1`, `img_in`, `final_layer`, ...; Chroma adds `distilled_guidance_layer`
and drops the per-block modulation), and Stability AI's MMDiT for SD 3 / 3.5
(`joint_blocks.N.x_block.attn.qkv`, `context_block`, `x_embedder`, `t_embedder`, ...; 3.5 adds
the q/k RMS norms `ln_q`/`ln_k` and, in 3.5 Medium, a second attention `attn2`), and BFL's for
Flux.2 (global modulations `double_stream_modulation_img.lin`, ..., no biases). Loading a Flux.2
file is trainer/models/flux2.py's (diffusers' converter, called with the file as it is).

- original -> diffusers (`to_diffusers`, `load_original_transformer`): diffusers' own converters
  from `diffusers.loaders.single_file_utils`, called, not re-implemented.
- diffusers -> original (`to_original`): the reverse, from one table of layers per layout (below).
  Where diffusers splits one original layer (the fused q/k/v, and a single block's
  q/k/v/MLP-in `linear1`), the parts are concatenated back along the output rows. Where
  diffusers orders an adaLN projection's outputs (scale, shift) and the original (shift, scale)
  - the final norm, and SD 3's last context block, which has no MLP - the two halves are swapped
  back. The same table names the layers of LoRA files (trainer/flow_lora_names.py).
- `original_layout_family(keys)` tells the layouts apart by their keys, so a file for another
  model type is refused with a sentence that names it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import ModelLoadError

# Families as this module names them. The detector also tells Flux.1 dev from schnell (dev has
# a guidance embedding) and SD 3 from 3.5; their weight layouts are the same tables.
FLUX, CHROMA, SD3 = "flux", "chroma", "sd3"
FLUX2 = "flux2"  # Flux.2 (klein): BFL's layout with global modulation, no biases
FLUX_DEV, FLUX_SCHNELL, SD35 = "flux-dev", "flux-schnell", "sd35"
_FAMILY_OF = {FLUX: FLUX, FLUX_DEV: FLUX, FLUX_SCHNELL: FLUX, CHROMA: CHROMA, SD3: SD3, SD35: SD3,
              # OneTrainer's model_type values (trainer/models/registry.py)
              "FLUX_DEV_1": FLUX, "CHROMA_1": CHROMA, "STABLE_DIFFUSION_3": SD3,
              "STABLE_DIFFUSION_35": SD3, FLUX2: FLUX2, "FLUX_2": FLUX2}
# What each detected layout is called in messages, and the model_type that loads it.
LAYOUT_LABELS = {FLUX_DEV: "Flux.1 dev (with a guidance embedding)",
                 FLUX_SCHNELL: "Flux.1 schnell (no guidance embedding)",
                 CHROMA: "Chroma", SD3: "Stable Diffusion 3", SD35: "Stable Diffusion 3.5"}
MODEL_TYPE_OF_LAYOUT = {FLUX_DEV: "FLUX_DEV_1", FLUX_SCHNELL: "FLUX_DEV_1", CHROMA: "CHROMA_1",
                        SD3: "STABLE_DIFFUSION_3", SD35: "STABLE_DIFFUSION_35"}
MODEL_CLASS_OF_FAMILY = {FLUX: "FluxTransformer2DModel", CHROMA: "ChromaTransformer2DModel",
                         SD3: "SD3Transformer2DModel"}
# Checkpoints that hold the whole model (SD 3.5's all-in-one file, ComfyUI's saves) put the
# transformer under this prefix; diffusers' converters strip it themselves.
CHECKPOINT_PREFIX = "model.diffusion_model."


def family_of(name: str) -> str:
    """'flux' | 'chroma' | 'sd3' for a family, a detected layout or a model_type value."""
    try:
        return _FAMILY_OF[str(getattr(name, "value", name))]
    except KeyError:
        raise ValueError(f"'{name}' is not a flow-matching transformer family this module "
                         f"knows (one of {', '.join(_FAMILY_OF)})") from None


# --- the layer tables -------------------------------------------------------------------------

WEIGHT_BIAS = (("weight", "weight"), ("bias", "bias"))  # (original parameter, diffusers')
BFL_NORM = (("scale", "weight"),)  # BFL's RMSNorm keeps its gain as `scale`
SAI_NORM = (("weight", "weight"),)


@dataclass(frozen=True)
class Layer:
    """One layer of the original layout and the diffusers modules it holds.

    `parts` are stacked along the output rows in this order (q, k, v[, MLP in]); a layer with
    one part is a plain rename. `swap_halves`: the output rows' two halves trade places (adaLN
    shift/scale order)."""
    original: str
    parts: tuple[str, ...]
    params: tuple[tuple[str, str], ...] = WEIGHT_BIAS
    swap_halves: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    @property
    def takes_lora(self) -> bool:
        """A linear (or conv) layer, with weight and bias; not a norm's gain or a table."""
        return self.params == WEIGHT_BIAS


def _key(module: str, param: str) -> str:
    return f"{module}.{param}" if param else module


def _rows(original: str, parts, params=WEIGHT_BIAS, swap: bool = False):
    return (original, tuple(parts), params, swap)


# Flux.1 and Chroma (Black Forest Labs' layout). Chroma has no time/vector/guidance inputs, no
# per-block modulation and no final adaLN (its `distilled_guidance_layer` makes them all), so its
# weights are a subset plus the approximator: the layers present in a model are the ones used.
BFL_GLOBAL = (
    _rows("img_in", ["x_embedder"]),
    _rows("txt_in", ["context_embedder"]),
    _rows("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"]),
    _rows("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"]),
    _rows("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"]),
    _rows("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"]),
    _rows("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"]),
    _rows("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"]),
    _rows("distilled_guidance_layer.in_proj", ["distilled_guidance_layer.in_proj"]),
    _rows("distilled_guidance_layer.out_proj", ["distilled_guidance_layer.out_proj"]),
    _rows("final_layer.linear", ["proj_out"]),
    _rows("final_layer.adaLN_modulation.1", ["norm_out.linear"], swap=True),
)
BFL_APPROXIMATOR = (  # distilled_guidance_layer.layers.N / .norms.N (Chroma)
    _rows("layers.{n}.in_layer", ["layers.{n}.linear_1"]),
    _rows("layers.{n}.out_layer", ["layers.{n}.linear_2"]),
    _rows("norms.{n}", ["norms.{n}"], BFL_NORM),
)
# A double block's attention, the same in Flux.1 / Chroma and Flux.2.
BFL_DOUBLE_ATTENTION = (
    _rows("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    _rows("txt_attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    _rows("img_attn.norm.query_norm", ["attn.norm_q"], BFL_NORM),
    _rows("img_attn.norm.key_norm", ["attn.norm_k"], BFL_NORM),
    _rows("txt_attn.norm.query_norm", ["attn.norm_added_q"], BFL_NORM),
    _rows("txt_attn.norm.key_norm", ["attn.norm_added_k"], BFL_NORM),
    _rows("img_attn.proj", ["attn.to_out.0"]),
    _rows("txt_attn.proj", ["attn.to_add_out"]),
)
BFL_DOUBLE = (  # double_blocks.N <- transformer_blocks.N
    _rows("img_mod.lin", ["norm1.linear"]),
    _rows("txt_mod.lin", ["norm1_context.linear"]),
    *BFL_DOUBLE_ATTENTION,
    _rows("img_mlp.0", ["ff.net.0.proj"]),
    _rows("img_mlp.2", ["ff.net.2"]),
    _rows("txt_mlp.0", ["ff_context.net.0.proj"]),
    _rows("txt_mlp.2", ["ff_context.net.2"]),
)
BFL_SINGLE = (  # single_blocks.N <- single_transformer_blocks.N
    _rows("modulation.lin", ["norm.linear"]),
    _rows("linear1", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
    _rows("norm.query_norm", ["attn.norm_q"], BFL_NORM),
    _rows("norm.key_norm", ["attn.norm_k"], BFL_NORM),
    _rows("linear2", ["proj_out"]),
)

# Flux.2 (Black Forest Labs' layout, as diffusers' convert_flux2_transformer_checkpoint_to_diffusers
# reads it): one modulation per stream for all blocks, a single block's q/k/v/MLP-in already one
# layer in diffusers too (to_qkv_mlp_proj), and no biases.
FLUX2_GLOBAL = (
    _rows("img_in", ["x_embedder"]),
    _rows("txt_in", ["context_embedder"]),
    _rows("time_in.in_layer", ["time_guidance_embed.timestep_embedder.linear_1"]),
    _rows("time_in.out_layer", ["time_guidance_embed.timestep_embedder.linear_2"]),
    _rows("guidance_in.in_layer", ["time_guidance_embed.guidance_embedder.linear_1"]),
    _rows("guidance_in.out_layer", ["time_guidance_embed.guidance_embedder.linear_2"]),
    _rows("double_stream_modulation_img.lin", ["double_stream_modulation_img.linear"]),
    _rows("double_stream_modulation_txt.lin", ["double_stream_modulation_txt.linear"]),
    _rows("single_stream_modulation.lin", ["single_stream_modulation.linear"]),
    _rows("final_layer.linear", ["proj_out"]),
    _rows("final_layer.adaLN_modulation.1", ["norm_out.linear"], swap=True),
)
FLUX2_DOUBLE = (  # double_blocks.N <- transformer_blocks.N
    *BFL_DOUBLE_ATTENTION,
    _rows("img_mlp.0", ["ff.linear_in"]),
    _rows("img_mlp.2", ["ff.linear_out"]),
    _rows("txt_mlp.0", ["ff_context.linear_in"]),
    _rows("txt_mlp.2", ["ff_context.linear_out"]),
)
FLUX2_SINGLE = (  # single_blocks.N <- single_transformer_blocks.N
    _rows("linear1", ["attn.to_qkv_mlp_proj"]),
    _rows("linear2", ["attn.to_out"]),
    _rows("norm.query_norm", ["attn.norm_q"], BFL_NORM),
    _rows("norm.key_norm", ["attn.norm_k"], BFL_NORM),
)

# Black Forest Labs' layouts: (global, double block, single block) rows.
_BFL = (BFL_GLOBAL, BFL_DOUBLE, BFL_SINGLE)
BFL_TABLES = {FLUX: _BFL, CHROMA: _BFL,
              FLUX2: (FLUX2_GLOBAL, FLUX2_DOUBLE, FLUX2_SINGLE)}

# SD 3 / 3.5 (Stability AI's MMDiT layout).
SAI_GLOBAL = (
    _rows("pos_embed", ["pos_embed"], (("", "pos_embed"),)),  # a table, not a layer
    _rows("x_embedder.proj", ["pos_embed.proj"]),
    _rows("t_embedder.mlp.0", ["time_text_embed.timestep_embedder.linear_1"]),
    _rows("t_embedder.mlp.2", ["time_text_embed.timestep_embedder.linear_2"]),
    _rows("y_embedder.mlp.0", ["time_text_embed.text_embedder.linear_1"]),
    _rows("y_embedder.mlp.2", ["time_text_embed.text_embedder.linear_2"]),
    _rows("context_embedder", ["context_embedder"]),
    _rows("final_layer.linear", ["proj_out"]),
    _rows("final_layer.adaLN_modulation.1", ["norm_out.linear"], swap=True),
)
SAI_JOINT = (  # joint_blocks.N <- transformer_blocks.N
    _rows("x_block.adaLN_modulation.1", ["norm1.linear"]),
    # the last block's context half computes only keys/values (no proj, no MLP) and its adaLN
    # is diffusers' AdaLayerNormContinuous, (scale, shift): swapped in that block only
    _rows("context_block.adaLN_modulation.1", ["norm1_context.linear"]),
    _rows("x_block.attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    _rows("context_block.attn.qkv", ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    _rows("x_block.attn.ln_q", ["attn.norm_q"], SAI_NORM),
    _rows("x_block.attn.ln_k", ["attn.norm_k"], SAI_NORM),
    _rows("context_block.attn.ln_q", ["attn.norm_added_q"], SAI_NORM),
    _rows("context_block.attn.ln_k", ["attn.norm_added_k"], SAI_NORM),
    _rows("x_block.attn.proj", ["attn.to_out.0"]),
    _rows("context_block.attn.proj", ["attn.to_add_out"]),
    _rows("x_block.attn2.qkv", ["attn2.to_q", "attn2.to_k", "attn2.to_v"]),
    _rows("x_block.attn2.ln_q", ["attn2.norm_q"], SAI_NORM),
    _rows("x_block.attn2.ln_k", ["attn2.norm_k"], SAI_NORM),
    _rows("x_block.attn2.proj", ["attn2.to_out.0"]),
    _rows("x_block.mlp.fc1", ["ff.net.0.proj"]),
    _rows("x_block.mlp.fc2", ["ff.net.2"]),
    _rows("context_block.mlp.fc1", ["ff_context.net.0.proj"]),
    _rows("context_block.mlp.fc2", ["ff_context.net.2"]),
)


def _block_count(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _expand(rows, original_prefix: str, diffusers_prefix: str, n: str = "",
            swap_originals: tuple[str, ...] = ()) -> list[Layer]:
    out = []
    for original, parts, params, swap in rows:
        original = original.format(n=n)
        out.append(Layer(original_prefix + original,
                         tuple(diffusers_prefix + p.format(n=n) for p in parts), params,
                         swap or original in swap_originals))
    return out


def layers(family: str, diffusers_keys: Iterable[str]) -> list[Layer]:
    """The original layout's layers for a diffusers transformer with these state-dict keys
    (block counts, guidance, q/k norms and attn2 read from them); only layers the model has."""
    keys = set(diffusers_keys)
    family = family_of(family)
    if family in BFL_TABLES:
        global_rows, double_rows, single_rows = BFL_TABLES[family]
        table = _expand(global_rows, "", "")
        for n in range(_block_count(keys, "distilled_guidance_layer.layers")):  # Chroma's
            table += _expand(BFL_APPROXIMATOR, "distilled_guidance_layer.",
                             "distilled_guidance_layer.", str(n))
        for n in range(_block_count(keys, "transformer_blocks")):
            table += _expand(double_rows, f"double_blocks.{n}.", f"transformer_blocks.{n}.")
        for n in range(_block_count(keys, "single_transformer_blocks")):
            table += _expand(single_rows, f"single_blocks.{n}.", f"single_transformer_blocks.{n}.")
    else:
        table = _expand(SAI_GLOBAL, "", "")
        count = _block_count(keys, "transformer_blocks")
        for n in range(count):
            last = ("context_block.adaLN_modulation.1",) if n == count - 1 else ()
            table += _expand(SAI_JOINT, f"joint_blocks.{n}.", f"transformer_blocks.{n}.",
                             swap_originals=last)
    return [layer for layer in table
            if any(_key(p, d) in keys for p in layer.parts for _, d in layer.params)]


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) along the output rows; its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# --- diffusers -> original --------------------------------------------------------------------

def to_original(family: str, diffusers_state_dict: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """The transformer's weights under their original names (no prefix), every tensor placed:
    a weight the layout has no place for is an error, never silently dropped."""
    state = diffusers_state_dict
    out: dict[str, torch.Tensor] = {}
    placed: set[str] = set()
    for layer in layers(family, state):
        for original_param, diffusers_param in layer.params:
            keys = [_key(part, diffusers_param) for part in layer.parts]
            found = [k in state for k in keys]
            if not any(found):
                continue  # e.g. a layer without bias
            if not all(found):
                missing = [k for k, f in zip(keys, found) if not f]
                raise ValueError(f"{layer.original}: the weights {', '.join(missing)} are "
                                 f"missing, so the fused original layer cannot be written")
            tensor = torch.cat([state[k] for k in keys]) if layer.fused else state[keys[0]]
            out[_key(layer.original, original_param)] = (
                swap_halves(tensor) if layer.swap_halves else tensor)
            placed.update(keys)
    left = sorted(set(state) - placed)
    if left:
        raise ValueError(f"{len(left)} weights have no place in the original "
                         f"{family_of(family)} layout: {', '.join(left[:5])}")
    return out


# --- original -> diffusers --------------------------------------------------------------------

# diffusers' Flux.1 / Chroma converters split a single block's `linear1` at Flux.1's own sizes
# (hidden 3072: q, k, v 3072 rows each, MLP-in 12288), whatever the checkpoint's width.
DIFFUSERS_SPLIT = (3072, 3072, 3072, 12288)


def to_diffusers(family: str, original_state_dict: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """The weights under diffusers' names, by diffusers' own converter for the family. The
    caller's dict is left as it was (the converters pop from theirs)."""
    from diffusers.loaders import single_file_utils as sfu

    family = family_of(family)
    checkpoint = {k.removeprefix(CHECKPOINT_PREFIX): v for k, v in original_state_dict.items()}
    if family == SD3:
        return sfu.convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    convert = (sfu.convert_flux_transformer_checkpoint_to_diffusers if family == FLUX
               else sfu.convert_chroma_transformer_checkpoint_to_diffusers)
    widths = _single_block_widths(checkpoint)
    if widths is None or widths == DIFFUSERS_SPLIT:
        return convert(checkpoint)
    # Another width (the tiny test models; every released Flux.1 and Chroma is 3072 wide): lay
    # each linear1 out at diffusers' sizes with zero rows between the pieces, let diffusers'
    # converter split it, and cut the pieces back to their widths. Only copies: exact.
    for name in [k for k in checkpoint if re.fullmatch(r"single_blocks\.\d+\.linear1\.\w+", k)]:
        checkpoint[name] = _spread(checkpoint[name], widths, DIFFUSERS_SPLIT)
    converted = convert(checkpoint)
    for name in list(converted):
        match = re.fullmatch(r"(single_transformer_blocks\.\d+\.)(.+)\.(weight|bias)", name)
        piece = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}.get(
            match.group(2)) if match else None
        if piece is not None:
            converted[name] = converted[name][:widths[piece]].clone()
    return converted


def _single_block_widths(checkpoint) -> tuple[int, ...] | None:
    """(q, k, v, MLP-in) rows of the single blocks' linear1, or None without single blocks."""
    if "single_blocks.0.linear1.weight" not in checkpoint:
        return None
    hidden = checkpoint["single_blocks.0.linear2.weight"].shape[0]
    mlp = checkpoint["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    widths = (hidden, hidden, hidden, mlp)
    if any(w > d for w, d in zip(widths, DIFFUSERS_SPLIT)):
        raise ModelLoadError(f"a single block {hidden} wide with an MLP of {mlp} is not a "
                             f"Flux.1 / Chroma transformer diffusers can read")
    return widths


def _spread(tensor: torch.Tensor, widths, slots) -> torch.Tensor:
    out = tensor.new_zeros((sum(slots), *tensor.shape[1:]))
    source = target = 0
    for width, slot in zip(widths, slots):
        out[target:target + width] = tensor[source:source + width]
        source, target = source + width, target + slot
    return out


# --- telling the layouts apart ----------------------------------------------------------------

def original_layout_family(keys: Iterable[str]) -> str | None:
    """'flux-dev' | 'flux-schnell' | 'chroma' | 'sd3' | 'sd35' for the keys of a transformer in
    an original layout (bare or under 'model.diffusion_model.'), None for anything else
    (a diffusers-layout file, a UNet, Flux.2, an older Chroma layout diffusers cannot read)."""
    names = {k.removeprefix(CHECKPOINT_PREFIX) for k in keys}
    if "joint_blocks.0.context_block.attn.qkv.weight" in names:
        # 3.5 Large and Medium normalise q and k (ln_q / ln_k); Medium also has attn2
        return SD35 if any(".ln_q." in k or ".attn2." in k for k in names) else SD3
    if not {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
            "img_in.weight"} <= names:
        return None
    if "distilled_guidance_layer.in_proj.weight" in names:
        return CHROMA
    if {"double_blocks.0.img_mod.lin.weight", "vector_in.in_layer.weight"} <= names:
        return FLUX_DEV if "guidance_in.in_layer.weight" in names else FLUX_SCHNELL
    return None  # Flux.2 (global modulation) and other relatives


def check_original_layout(model_type: str, keys: Iterable[str], file_name: str) -> str:
    """The layout of a transformer file chosen for `model_type`, or one sentence saying what
    the file is and which model type loads it."""
    model_type = str(getattr(model_type, "value", model_type))
    found = original_layout_family(keys)
    if found is None:
        raise ModelLoadError(
            f"'{file_name}' holds no transformer in the original Flux.1, Chroma or SD 3 / 3.5 "
            f"layout (choose a diffusers folder, or the model's own .safetensors file).")
    if MODEL_TYPE_OF_LAYOUT[found] != model_type:
        raise ModelLoadError(
            f"'{file_name}' holds a {LAYOUT_LABELS[found]} transformer, not a model of type "
            f"{model_type}: choose model type {MODEL_TYPE_OF_LAYOUT[found]} for it.")
    return found


# --- loading ----------------------------------------------------------------------------------

def load_original_transformer(model_class, source: str | Path | Mapping[str, torch.Tensor], *,
                              config: str | Path, subfolder: str | None = "transformer",
                              torch_dtype: torch.dtype | None = None, name: str | None = None,
                              quantization_config=None):
    """`model_class` (FluxTransformer2DModel, ChromaTransformer2DModel, SD3Transformer2DModel)
    from an original-layout file or state dict, offline: `config` is a local diffusers folder
    (configs only) and `subfolder` the transformer's folder in it.

    The weights are converted here (`to_diffusers`) and handed to diffusers' `from_single_file`
    already in its layout, which it then loads as they are: that way a checkpoint of any width
    loads, where `from_single_file` given the file itself splits Flux.1's linear1 at 3072.
    `name`: the file a state dict was read from, for messages; `quantization_config`: diffusers'
    (a GGUF file's tensors: `to_diffusers` moves and splits their packed rows whole)."""
    if isinstance(source, Mapping):
        state, name = dict(source), name or "the state dict"
    else:
        path = Path(source)
        state, name = _read_transformer_tensors(path), path.name
    found = original_layout_family(state)
    family = family_of(found) if found else None
    if family is None or MODEL_CLASS_OF_FAMILY[family] != model_class.__name__:
        what = f"a {LAYOUT_LABELS[found]} transformer" if found else \
            "no transformer in the original Flux.1, Chroma or SD 3 / 3.5 layout"
        raise ModelLoadError(f"'{name}' holds {what}; {model_class.__name__} cannot load it.")
    quantized = {"quantization_config": quantization_config} if quantization_config else {}
    return model_class.from_single_file(to_diffusers(family, state), config=str(config),
                                        subfolder=subfolder, torch_dtype=torch_dtype,
                                        local_files_only=True, **quantized)


def _read_transformer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The transformer's tensors of a .safetensors file: all of them, or in a whole-model
    checkpoint (SD 3.5's all-in-one file) only those under 'model.diffusion_model.', so its
    text encoders and VAE are never read into memory."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelLoadError(f"'{path}' does not exist.")
    try:
        with safe_open(str(path), framework="pt") as file:
            keys = list(file.keys())
            if any(k.startswith(CHECKPOINT_PREFIX) for k in keys):
                keys = [k for k in keys if k.startswith(CHECKPOINT_PREFIX)]
            return {k: file.get_tensor(k) for k in keys}
    except Exception as error:  # safetensors raises its own types for a broken file
        raise ModelLoadError(f"'{path.name}' is not a readable .safetensors file "
                             f"({error}).") from None


def module_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """{state-dict key: shape} of a diffusers transformer as it is without adapters (peft's
    `base_layer` wrappers and `lora_*` tensors left out), for `layers` and the LoRA names."""
    shapes = {}
    for key, tensor in model.state_dict().items():
        if ".lora_" in key or "lora_magnitude_vector" in key:
            continue
        shapes[key.replace(".base_layer.", ".")] = tensor.shape
    # A layer whose weight is stored packed (a GGUF file's blocks) has its logical shape in
    # its features, not in the tensor's
    from trainer.quantization import is_gguf_layer
    for name, layer in model.named_modules():
        if is_gguf_layer(layer) and ".lora_" not in name:
            key = f"{name}.weight".replace(".base_layer.", ".")
            shapes[key] = torch.Size((layer.out_features, layer.in_features))
    return shapes
