"""LoRA: which layers get adapters, and the kohya-layout file that ComfyUI, A1111/Forge and
diffusers all load.

Adapters come from peft (`add_adapter` on the diffusers UNet and the transformers text
encoder). The file is written from peft's own state dict, not through
`diffusers.utils.convert_state_dict_to_kohya`, because that function writes alpha = rank
whatever alpha was trained with (DESIGN.md); here `.alpha` holds the configured alpha.
"""
from __future__ import annotations

import datetime
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from trainer.config import LoraLayerPreset, TrainConfig
from trainer.io import atomic_save_safetensors

# Module-name suffixes per layer preset (peft matches a target by the end of a module name).
UNET_TARGETS = {
    LoraLayerPreset.ATTN_ONLY: ["to_q", "to_k", "to_v", "to_out.0"],
    LoraLayerPreset.ATTN_MLP: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    LoraLayerPreset.FULL: ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                           "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut",
                           "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"],
}
TEXT_ENCODER_TARGETS = {
    LoraLayerPreset.ATTN_ONLY: ["q_proj", "k_proj", "v_proj", "out_proj"],
    LoraLayerPreset.ATTN_MLP: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    LoraLayerPreset.FULL: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

def lora_config(config: TrainConfig, targets: list[str]) -> LoraConfig:
    # Gaussian A / zero B: the adapter starts with exactly zero effect (the base model).
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets,
                      init_lora_weights="gaussian")


def add_lora(model: torch.nn.Module, config: TrainConfig, part: str) -> list[torch.nn.Parameter]:
    """Attach an adapter to `model` and return its trainable parameters (kept in float32)."""
    targets = (UNET_TARGETS if part == "unet" else TEXT_ENCODER_TARGETS)[config.lora_layer_preset]
    model.add_adapter(lora_config(config, targets))
    params = lora_parameters_of(model)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def _module_path(peft_key: str, part: str) -> tuple[str, str]:
    """'down_blocks.0....to_q.lora_A.weight' -> ('down_blocks.0....to_q', 'lora_down.weight')."""
    module, kind = peft_key.split(".lora_", 1)
    module = module.removeprefix("base_model.model.")
    if part != "unet":
        # transformers >= 5.6 flattened CLIPTextModel (no 'text_model.' prefix); the files
        # people share always spell it out, so A1111/ComfyUI expect it.
        if not module.startswith("text_model."):
            module = "text_model." + module
    suffix = "lora_down.weight" if kind.startswith("A") else "lora_up.weight"
    return module, suffix


def kohya_state_dict(models: dict[str, torch.nn.Module], prefixes: dict[str, str], alpha: float,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft adapters of each part -> {'lora_unet_..._to_q.lora_down.weight': ..., '.alpha': ...}."""
    out: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        for key, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items():
            module, suffix = _module_path(key, part)
            name = prefixes[part] + module.replace(".", "_")
            out[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def kohya_metadata(config: TrainConfig, family, *, steps: int, epochs: int,
                   title: str) -> dict[str, str]:
    """`ss_*` (kohya) and `modelspec.*` (Stability's model spec) header fields, plus the exact
    config that produced the file."""
    now = datetime.datetime.now(datetime.timezone.utc)
    config_json = config.to_json()
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.lora_rank),
        "ss_network_alpha": str(config.lora_alpha),
        "ss_base_model_version": family.base_model_version,
        "ss_sd_model_name": config.base_model_name,
        "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(config.part_learning_rate("unet")),
        "ss_text_encoder_lr": str(config.part_learning_rate("text_encoder")),
        "ss_num_epochs": str(epochs),
        "ss_steps": str(steps),
        "ss_resolution": config.resolution,
        "ss_seed": str(config.seed),
        "ss_output_name": title,
        "ss_training_comment": "trained with Atelier",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.lora_architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.date": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": config.resolution,
        "atelier_config": config_json,
    }


def save_kohya_lora(path: str, family, parts: list[str], config: TrainConfig, *,
                    dtype: torch.dtype, steps: int, epochs: int, title: str) -> None:
    """Write the LoRA file of the trained `parts` atomically."""
    models = {p: family.parts[p] for p in parts}
    tensors = kohya_state_dict(models, family.kohya_prefixes, config.lora_alpha, dtype)
    atomic_save_safetensors(tensors, path, kohya_metadata(config, family, steps=steps,
                                                          epochs=epochs, title=title))


def lora_parameters_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]
