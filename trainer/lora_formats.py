"""One job: write the trained LoRA adapters in the file layout an output format names.

- KOHYA_LORA: kohya's flat names (`lora_unet_…`, `lora_te_`/`lora_te1_`/`lora_te2_`,
  `lora_down`/`lora_up`, `.alpha`), the layer names flattened with `_`. The UNet's layers are
  named as kohya's sd-scripts and OneTrainer's KOHYA_LORA name them: SD 1.5 by the diffusers
  UNet (`lora_unet_down_blocks_0_attentions_0_…`, kohya trains SD 1.5 on that UNet), SDXL by the
  original SGM UNet (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, kohya trains
  SDXL on its own SGM UNet). The SGM names come from the single-file writer's key map
  (`ldm_unet_names`), not from a list.
- LEGACY_LORA: OneTrainer's older layout, the same but with diffusers UNet names for SDXL too
  (`lora_unet_down_blocks_1_attentions_0_…`); for SD 1.5 it is the same bytes as KOHYA_LORA.
  A1111/Forge, ComfyUI and diffusers read both layouts; trainer/lora_reader.py too.
- COMFY_LORA: ComfyUI's "generic" names, the keys of its own model with `lora_A`/`lora_B`
  and `.alpha`: `diffusion_model.<original LDM/SGM UNet name>` and
  `text_encoders.clip_l.transformer.<CLIP name>` (SDXL's second encoder: `clip_g`). ComfyUI's
  `model_lora_keys_unet`/`model_lora_keys_clip` map exactly these onto its weights.
- DIFFUSERS_LORA: peft's keys under diffusers' component prefixes (`unet.`, `text_encoder.`,
  `text_encoder_2.`), packed by diffusers' own `pack_weights`. The file has no alpha: diffusers
  then scales by 1 (alpha = rank), so alpha / rank is folded into `lora_B`. DoRA keeps peft's
  own `lora_magnitude_vector` (diffusers turns DoRA on when it sees it); LoHa and LoKr have no
  diffusers layout for SD 1.5 / SDXL and are refused by check_supported (trainer/config.py).

LoHa, LoKr and DoRA use the same names with LyCORIS's suffixes (`hada_w1_a`, `lokr_w1`,
`dora_scale`, ...; trainer/lora.py says what each holds) in the kohya and ComfyUI layouts:
ComfyUI finds every adapter type under the names its key map gives a layer.

Every file carries the same `ss_*`/`modelspec.*`/`atelier_config` header and is written
atomically.
"""
from __future__ import annotations

import torch

from trainer import lora
from trainer.config import ModelFormat, TrainConfig
from trainer.io import atomic_save_safetensors

KOHYA_FORMATS = (ModelFormat.KOHYA_LORA, ModelFormat.LEGACY_LORA)
# ComfyUI names its CLIP models by size: SD 1.5's and SDXL's first encoder are CLIP ViT-L,
# SDXL's second is OpenCLIP ViT-bigG (which ComfyUI holds in the transformers layout).
COMFY_TEXT_ENCODERS = {"text_encoder": "text_encoders.clip_l.transformer.",
                       "text_encoder_2": "text_encoders.clip_g.transformer."}
COMFY_UNET_PREFIX = "diffusion_model."


def lora_state_dict(output_format: ModelFormat, models: dict[str, torch.nn.Module],
                    family, alpha: float, dtype: torch.dtype, *,
                    sdxl: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors for the trained adapters of `models` (part name -> module)."""
    transformer = models.get("transformer")
    if transformer is not None and output_format in (*KOHYA_FORMATS, ModelFormat.COMFY_LORA):
        # A flow transformer's layers under their original (fused) names; its text encoders
        # as the SD families name theirs.
        others = {p: m for p, m in models.items() if p != "transformer"}
        tensors = lora_state_dict(output_format, others, family, alpha, dtype)
        tensors.update(flow_transformer_tensors(output_format, transformer, family, alpha,
                                                dtype))
        return tensors
    if output_format in KOHYA_FORMATS:
        return kohya_state_dict(models, family.kohya_prefixes, alpha, dtype,
                                sgm_unet=sgm_unet_names(output_format, sdxl))
    if output_format == ModelFormat.COMFY_LORA:
        return comfy_state_dict(models, alpha, dtype)
    if output_format == ModelFormat.DIFFUSERS_LORA:
        return diffusers_state_dict(models, alpha, dtype)
    raise ValueError(f"output_model_format {output_format.value} is not a LoRA format")


def flow_transformer_tensors(output_format: ModelFormat, transformer: torch.nn.Module, family,
                             alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """KOHYA_LORA / COMFY_LORA tensors of a flow-matching transformer's LoRA: diffusers' separate
    q/k/v written exactly on the original fused layers (trainer/flow_lora_names.py says how)."""
    from trainer import flow_lora_names
    from trainer.models.transformer_layouts import module_shapes
    loras = {}
    for module, adapter in lora.trained_adapters(transformer, "transformer").items():
        if adapter.kind != "lora" or "lora_magnitude_vector" in adapter.tensors:
            # check_supported refuses it before training
            raise ValueError(f"{output_format.value} holds only plain LoRA layers for "
                             f"{family.facts.label}, not {adapter.kind}")
        loras[module] = flow_lora_names.LoraWeights(adapter.tensors["lora_A"].float(),
                                                    adapter.tensors["lora_B"].float(), alpha)
    write = (flow_lora_names.comfy_lora if output_format == ModelFormat.COMFY_LORA
             else flow_lora_names.kohya_lora)
    tensors = write(family.facts.model_type, module_shapes(transformer), loras)
    return {k: _cpu(v, dtype) for k, v in tensors.items()}


def sgm_unet_names(output_format: ModelFormat, sdxl: bool) -> bool:
    """Whether a kohya-layout file names the UNet's layers by the original SGM UNet: SDXL's
    KOHYA_LORA only (LEGACY_LORA and SD 1.5 keep the diffusers names)."""
    return sdxl and output_format == ModelFormat.KOHYA_LORA


def save_lora(path: str, family, parts: list[str], config: TrainConfig, *,
              dtype: torch.dtype, steps: int, epochs: int, title: str,
              extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write the LoRA file of the trained `parts` in `config.output_model_format`, with the
    `extra` tensors beside the adapters' (bundled embeddings: trainer/embeddings.py)."""
    models = {p: family.parts[p] for p in parts}
    tensors = lora_state_dict(config.output_model_format, models, family, config.lora_alpha,
                              dtype, sdxl=config.model_type.is_sdxl)
    tensors.update(extra or {})
    metadata = lora.kohya_metadata(config, family, steps=steps, epochs=epochs, title=title)
    atomic_save_safetensors(tensors, path, metadata)


def _cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to("cpu", dtype).contiguous()


# --- kohya ---------------------------------------------------------------------------------

def kohya_state_dict(models: dict[str, torch.nn.Module], prefixes: dict[str, str], alpha: float,
                     dtype: torch.dtype, *, sgm_unet: bool) -> dict[str, torch.Tensor]:
    """{'lora_unet_..._to_q.lora_down.weight': ..., '.alpha': ...} (LoHa: '.hada_w1_a', ...;
    LoKr: '.lokr_w1', ...; DoRA also '.dora_scale'), the UNet's layers under their SGM names
    when `sgm_unet`."""
    out: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        adapters = lora.trained_adapters(model, part)
        names = kohya_layer_names(model, part, list(adapters), prefixes[part],
                                  sgm=sgm_unet and part == "unet")
        for module, adapter in adapters.items():
            for suffix, tensor in lora.kohya_layer(adapter, alpha).items():
                out[f"{names[module]}.{suffix}"] = _cpu(tensor, dtype)
    return out


def kohya_layer_names(model: torch.nn.Module, part: str, modules: list[str], prefix: str, *,
                      sgm: bool) -> dict[str, str]:
    """Adapted module name -> its flat kohya layer name ('lora_unet_down_blocks_1_…' or, with
    `sgm`, the UNet's original name 'lora_unet_input_blocks_4_1_…')."""
    original = ldm_unet_names(model, modules) if sgm else {m: m for m in modules}
    return {m: prefix + original[m].replace(".", "_") for m in modules}


# --- ComfyUI --------------------------------------------------------------------------------

def comfy_state_dict(models: dict[str, torch.nn.Module], alpha: float,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        adapters = lora.trained_adapters(model, part)
        if part == "unet":
            names = ldm_unet_names(model, list(adapters))
            prefixed = {COMFY_UNET_PREFIX + names[m]: a for m, a in adapters.items()}
        else:
            prefixed = {COMFY_TEXT_ENCODERS[part] + m: a for m, a in adapters.items()}
        for name, adapter in prefixed.items():
            layer = lora.kohya_layer(adapter, alpha, down="lora_A.weight", up="lora_B.weight")
            for suffix, tensor in layer.items():
                out[f"{name}.{suffix}"] = _cpu(tensor, dtype)
    return out


def ldm_unet_names(unet: torch.nn.Module, modules: list[str]) -> dict[str, str]:
    """diffusers UNet module names -> their names in the original LDM/SGM UNet
    ('down_blocks.1.attentions.0.…to_q' -> 'input_blocks.4.1.…to_q').

    The single-file writer's own key conversion does it: it numbers LDM blocks from the keys
    the UNet really has, so it is given all of them plus one '<module>.weight' per adapted
    module (modules with adapters have only `base_layer.weight` in the state dict)."""
    from trainer.models.single_file import UNET_PREFIX, unet_to_ldm
    keys = list(unet.state_dict()) + [f"{m}.weight" for m in modules]
    ldm_by_diffusers = {d: ldm for ldm, d in unet_to_ldm({k: k for k in keys}).items()}
    return {m: ldm_by_diffusers[f"{m}.weight"].removeprefix(UNET_PREFIX).removesuffix(".weight")
            for m in modules}


# --- diffusers ------------------------------------------------------------------------------

def diffusers_state_dict(models: dict[str, torch.nn.Module], alpha: float,
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_base import LoraBaseMixin
    out: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        peft_keys: dict[str, torch.Tensor] = {}
        for module, adapter in lora.trained_adapters(model, part).items():
            if adapter.kind != "lora":  # check_supported refuses it before training
                raise ValueError(f"DIFFUSERS_LORA cannot hold a {adapter.kind} adapter")
            down, up = adapter.tensors["lora_A"], adapter.tensors["lora_B"]
            rank = down.shape[0]
            peft_keys[f"{module}.lora_A.weight"] = _cpu(down, dtype)
            # float32 for the product, so folding adds no rounding of its own
            peft_keys[f"{module}.lora_B.weight"] = _cpu(up.float() * (alpha / rank), dtype)
            if "lora_magnitude_vector" in adapter.tensors:
                # DoRA's W' = m (W + dW) / ||W + dW||: the same with alpha / rank inside B.
                # '.weight' (the parameter's own name): transformers' adapter loading (text
                # encoders) finds the magnitude only so; the UNet's peft loader takes both.
                peft_keys[f"{module}.lora_magnitude_vector.weight"] = _cpu(
                    adapter.tensors["lora_magnitude_vector"], dtype)
        out.update(LoraBaseMixin.pack_weights(peft_keys, part))  # 'unet.', 'text_encoder.', ...
    return out
