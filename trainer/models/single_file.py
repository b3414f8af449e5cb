"""Diffusers -> original LDM/SGM layout: the single-file SD 1.5 and SDXL checkpoints ComfyUI
and A1111 load.

diffusers reads these files (`from_single_file`) but cannot write them. The mapping below is
the inverse of diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` /
`convert_ldm_clip_checkpoint`, derived from the model's own block layout rather than from
SD 1.5's fixed block numbers, so it works for any block count and depth (the tiny demo model
included). Every tensor must be mapped: an unknown key raises instead of being dropped,
because a silently incomplete checkpoint only fails later, in someone else's program.
"""
from __future__ import annotations

import json
import os
import pathlib
import re

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
# SDXL (Stability's SGM layout): TE1 is CLIP ViT-L as in SD 1.5, under another prefix; TE2 is
# OpenCLIP ViT-bigG in OpenCLIP's own layout.
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

_UNET_FIXED = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
    # SDXL's size/crop conditioning ("text_time" addition embedding); SD 1.5 has none.
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
_UNET_RESNET_PARTS = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_ATTENTION_PARTS = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


class UnmappedKeyError(ValueError):
    """A weight of the model has no place in the LDM layout (e.g. unmerged LoRA layers)."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps the module; its state_dict keys gain an "_orig_mod." prefix.
    return getattr(model, "_orig_mod", model)


def _rename_part(rest: str, table: dict[str, str], key: str) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise UnmappedKeyError(f"no LDM name for weight '{key}'")


def _count(keys, pattern: str) -> int:
    """How many distinct indices the regex's first group takes among the keys."""
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


# --- UNet ------------------------------------------------------------------------------------

def _unet_block_maps(keys: list[str]) -> dict[str, str]:
    """Diffusers block prefix -> LDM block prefix, from the blocks the model really has.

    LDM numbers the UNet as one flat list: input_blocks.0 is conv_in, then each down block's
    layers (resnet [+ attention]) and, between blocks, one downsampler entry; output_blocks
    list each up block's layers, the upsampler sharing the last layer's entry.
    """
    maps: dict[str, str] = {}
    n_down = _count(keys, r"down_blocks\.(\d+)\.")
    index = 1
    for b in range(n_down):
        for layer in range(_count(keys, rf"down_blocks\.{b}\.resnets\.(\d+)\.")):
            maps[f"down_blocks.{b}.resnets.{layer}."] = f"input_blocks.{index}.0."
            maps[f"down_blocks.{b}.attentions.{layer}."] = f"input_blocks.{index}.1."
            index += 1
        if any(k.startswith(f"down_blocks.{b}.downsamplers.0.") for k in keys):
            maps[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{index}.0.op."
            index += 1

    n_mid_resnets = _count(keys, r"mid_block\.resnets\.(\d+)\.")
    for i in range(n_mid_resnets):
        maps[f"mid_block.resnets.{i}."] = f"middle_block.{2 * i}."
        maps[f"mid_block.attentions.{i}."] = f"middle_block.{2 * i + 1}."

    n_up = _count(keys, r"up_blocks\.(\d+)\.")
    index = 0
    for b in range(n_up):
        n_layers = _count(keys, rf"up_blocks\.{b}\.resnets\.(\d+)\.")
        for layer in range(n_layers):
            maps[f"up_blocks.{b}.resnets.{layer}."] = f"output_blocks.{index}.0."
            has_attention = any(k.startswith(f"up_blocks.{b}.attentions.{layer}.") for k in keys)
            maps[f"up_blocks.{b}.attentions.{layer}."] = f"output_blocks.{index}.1."
            if layer == n_layers - 1:
                slot = 2 if has_attention else 1
                maps[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{index}.{slot}.conv."
            index += 1
    return maps


def unet_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = list(state_dict)
    block_maps = _unet_block_maps(keys)
    out = {}
    for key, tensor in state_dict.items():
        out[UNET_PREFIX + _unet_key_to_ldm(key, block_maps)] = tensor
    return out


def _unet_key_to_ldm(key: str, block_maps: dict[str, str]) -> str:
    for old, new in _UNET_FIXED.items():
        if key.startswith(old):
            return new + key[len(old):]
    for old, new in block_maps.items():
        if key.startswith(old):
            rest = key[len(old):]
            if ".resnets." in old:
                return new + _rename_part(rest, _UNET_RESNET_PARTS, key)
            # Attention (Transformer2DModel) internals keep their names in LDM; samplers are
            # already mapped down to their ".conv."/".op." weight.
            return new + rest
    raise UnmappedKeyError(f"no LDM name for UNet weight '{key}'")


# --- VAE -------------------------------------------------------------------------------------

def vae_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n_up = _count(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, tensor in state_dict.items():
        ldm_key = _vae_key_to_ldm(key, n_up)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            # The original VAE's attention uses 1x1 convolutions, diffusers uses linears.
            tensor = tensor[:, :, None, None]
        out[VAE_PREFIX + ldm_key] = tensor
    return out


def _vae_resnet_part(rest: str) -> str:
    # VAE resnets keep diffusers' names (norm1, conv1, ...) except the 1x1 shortcut.
    return "nin_shortcut." + rest[len("conv_shortcut."):] if rest.startswith("conv_shortcut.") else rest


def _vae_key_to_ldm(key: str, n_up: int) -> str:
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    half, _, rest = key.partition(".")  # "encoder" / "decoder"
    if half not in ("encoder", "decoder"):
        raise UnmappedKeyError(f"no LDM name for VAE weight '{key}'")
    for old, new in (("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("conv_norm_out.", "norm_out.")):
        if rest.startswith(old):
            return f"{half}.{new}{rest[len(old):]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{half}.mid.block_{int(m.group(1)) + 1}.{_vae_resnet_part(m.group(2))}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        return f"{half}.mid.attn_1.{_rename_part(m.group(1), _VAE_ATTENTION_PARTS, key)}"
    # LDM numbers decoder blocks from the lowest resolution up: diffusers' up_blocks reversed.
    blocks = r"down_blocks" if half == "encoder" else r"up_blocks"
    if m := re.match(rf"{blocks}\.(\d+)\.(.*)", rest):
        block = int(m.group(1)) if half == "encoder" else n_up - 1 - int(m.group(1))
        ldm_block = f"{half}.{'down' if half == 'encoder' else 'up'}.{block}."
        inner = m.group(2)
        if r := re.match(r"resnets\.(\d+)\.(.*)", inner):
            return f"{ldm_block}block.{r.group(1)}.{_vae_resnet_part(r.group(2))}"
        for sampler, name in (("downsamplers.0.", "downsample."), ("upsamplers.0.", "upsample.")):
            if inner.startswith(sampler):
                return ldm_block + name + inner[len(sampler):]
    raise UnmappedKeyError(f"no LDM name for VAE weight '{key}'")


# --- Text encoders ---------------------------------------------------------------------------

def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor],
                        prefix: str = TEXT_ENCODER_PREFIX) -> dict[str, torch.Tensor]:
    """CLIP ViT-L (SD 1.5's text encoder, SDXL's TE1): transformers' names under `prefix`."""
    # transformers >= 5.6 flattened CLIPTextModel (no "text_model." prefix); the LDM layout
    # keeps it: cond_stage_model.transformer.text_model.*
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue  # a buffer, not a weight; newer transformers no longer save it
        if key.startswith("text_projection."):
            raise UnmappedKeyError(f"CLIP ViT-L text encoders have no projection here ('{key}')")
        name = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + name] = tensor
    return out


_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}


def open_clip_to_sgm(state_dict: dict[str, torch.Tensor],
                     prefix: str = SDXL_TEXT_ENCODER_2_PREFIX) -> dict[str, torch.Tensor]:
    """SDXL's TE2 (transformers CLIPTextModelWithProjection) -> OpenCLIP's layout: one fused
    `in_proj` for q/k/v per layer (q, k, v stacked in that order), `positional_embedding`
    without `.weight`, and `text_projection` as a matrix applied from the right (transposed)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.t()
            continue
        rest = key.removeprefix("text_model.")
        if rest == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = tensor
        elif rest == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = tensor
        elif rest.startswith("final_layer_norm."):
            out[prefix + "ln_final." + rest[len("final_layer_norm."):]] = tensor
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)", rest):
            block = f"{prefix}transformer.resblocks.{m.group(1)}."
            inner = m.group(2)
            if q := re.match(r"self_attn\.([qkv])_proj\.(weight|bias)$", inner):
                qkv.setdefault((block, q.group(2)), {})[q.group(1)] = tensor
            else:
                out[block + _rename_part(inner, _OPEN_CLIP_LAYER_PARTS, key)] = tensor
        else:
            raise UnmappedKeyError(f"no OpenCLIP name for text encoder 2 weight '{key}'")
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise UnmappedKeyError(f"{block}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


# --- Whole checkpoint ------------------------------------------------------------------------

def _collect(parts, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """(converter, model) pairs -> one CPU state dict in `dtype` (floating tensors only)."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for convert, model in parts:
        state = _unwrap(model).state_dict()
        for key, tensor in convert(state).items():
            tensor = tensor.detach().to("cpu")
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensor = tensor.contiguous()
            # safetensors refuses tensors that share memory (tied weights): give each its own.
            if tensor.data_ptr() in seen_storage:
                tensor = tensor.clone()
            seen_storage.add(tensor.data_ptr())
            out[key] = tensor
    return out


def sd15_ldm_state_dict(components, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in LDM layout; `components` is anything with .unet, .vae and
    .text_encoder (SD15Components or a StableDiffusionPipeline)."""
    return _collect((
        (unet_to_ldm, components.unet),
        (vae_to_ldm, components.vae),
        (text_encoder_to_ldm, components.text_encoder),
    ), dtype)


def _sdxl_text_encoder_to_sgm(state_dict):
    return text_encoder_to_ldm(state_dict, SDXL_TEXT_ENCODER_PREFIX)


def sdxl_sgm_state_dict(components, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in SGM layout (sd_xl_base_1.0.safetensors' names);
    `components` is anything with .unet, .vae, .text_encoder and .text_encoder_2."""
    return _collect((
        (unet_to_ldm, components.unet),
        (vae_to_ldm, components.vae),
        (_sdxl_text_encoder_to_sgm, components.text_encoder),
        (open_clip_to_sgm, components.text_encoder_2),
    ), dtype)


def _string_metadata(metadata: dict | None) -> dict[str, str]:
    # The safetensors header holds strings only; anything else is stored as JSON.
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}


def save_sd15_single_file(
    components_or_pipeline,
    path,
    dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
) -> pathlib.Path:
    """Write an SD 1.5 single-file `.safetensors` in the original LDM layout."""
    return _save(sd15_ldm_state_dict(components_or_pipeline, dtype), path, metadata)


def save_sdxl_single_file(
    components_or_pipeline,
    path,
    dtype: torch.dtype = torch.float32,
    metadata: dict | None = None,
) -> pathlib.Path:
    """Write an SDXL single-file `.safetensors` in the original SGM layout."""
    return _save(sdxl_sgm_state_dict(components_or_pipeline, dtype), path, metadata)


def _save(tensors: dict[str, torch.Tensor], path, metadata: dict | None) -> pathlib.Path:
    """Written to `path + ".tmp"` and renamed into place, so a full disk or a crash never
    leaves a truncated checkpoint under the real name."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=_string_metadata(metadata))
        # safetensors creates the file owner-only (0600); other programs (a ComfyUI running as
        # another user) must be able to read the checkpoint.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
