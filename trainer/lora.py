"""LoRA: which layers get adapters, the trained adapters read back, and the kohya-layout file
that ComfyUI, A1111/Forge and diffusers all load (the other layouts: trainer/lora_formats.py).

Adapters come from peft (`add_adapter` on the diffusers UNet and the transformers text
encoder). The file is written from peft's own state dict, not through
`diffusers.utils.convert_state_dict_to_kohya`, because that function writes alpha = rank
whatever alpha was trained with (DESIGN.md); here `.alpha` holds the configured alpha.
"""
from __future__ import annotations

import datetime
import re
from typing import NamedTuple

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from trainer.config import LoraLayerPreset, TrainConfig
from trainer.errors import ConfigError

# OneTrainer's layer presets: parts of UNet layer names (BaseStableDiffusion(XL)Setup's
# LAYER_PRESETS; docs/notes/onetrainer-configs.md). "attentions" is every layer of the
# transformer blocks, "attn" only their attention projections, no pattern every layer.
LAYER_PRESETS = {
    LoraLayerPreset.ATTN_ONLY: ["attn"],
    LoraLayerPreset.ATTN_MLP: ["attentions"],
    LoraLayerPreset.FULL: [],
}
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def layer_patterns(config: TrainConfig) -> tuple[list[str], bool]:
    """(the UNet layer-name patterns, whether they are regular expressions)."""
    if config.lora_layer_preset == LoraLayerPreset.CUSTOM:
        return [p.strip() for p in config.layer_filter.split(",")], config.layer_filter_regex
    return LAYER_PRESETS[config.lora_layer_preset], False


def _matcher(pattern: str, regex: bool):
    if not pattern:
        return lambda name: True  # OneTrainer: an empty entry matches every layer
    if not pattern.isprintable():
        raise ConfigError(f"layer_filter: {pattern!r} has characters that cannot be part of a "
                          "layer name.")
    if not regex:
        return lambda name: pattern in name
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ConfigError(f"layer_filter: {pattern!r} is not a valid regular expression "
                          f"({error}).") from None
    return lambda name: compiled.search(name) is not None


def unet_targets(unet: torch.nn.Module, config: TrainConfig) -> list[str]:
    """The UNet layers that get adapters: its linear and conv layers whose name contains (or,
    as regular expressions, has a match for) any pattern, as OneTrainer's ModuleFilter picks
    them. A pattern that matches no layer is refused (a typo would silently train less)."""
    patterns, regex = layer_patterns(config)
    matchers = [(p, _matcher(p, regex)) for p in patterns]
    used: set[str] = set()
    targets = []
    for name, module in unet.named_modules():
        if not isinstance(module, ADAPTABLE):
            continue
        hits = [p for p, matches in matchers if matches(name)]
        used.update(hits)
        if hits or not matchers:
            targets.append(name)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(
            "layer_filter: " + ", ".join(repr(p) for p in unused) + " matched no UNet layer "
            "(names look like down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q).")
    return targets


def text_encoder_targets(encoder: torch.nn.Module) -> list[str]:
    """Every linear layer of a text encoder (OneTrainer filters only the UNet's)."""
    return [name for name, module in encoder.named_modules()
            if isinstance(module, torch.nn.Linear)]


def lora_config(config: TrainConfig, targets: list[str]) -> LoraConfig:
    # Gaussian A / zero B: the adapter starts with exactly zero effect (the base model).
    return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets,
                      init_lora_weights="gaussian")


def add_lora(model: torch.nn.Module, config: TrainConfig, part: str) -> list[torch.nn.Parameter]:
    """Attach an adapter to `model` and return its trainable parameters (kept in float32)."""
    targets = unet_targets(model, config) if part == "unet" else text_encoder_targets(model)
    model.add_adapter(lora_config(config, targets))
    params = lora_parameters_of(model)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


class Adapter(NamedTuple):
    """One trained LoRA layer: W' = W + (alpha / rank) * up @ down."""
    down: torch.Tensor   # peft's lora_A: (rank, in) or a conv (rank, in, k, k)
    up: torch.Tensor     # peft's lora_B: (out, rank) or a conv (out, rank, 1, 1)


def trained_adapters(model: torch.nn.Module, part: str) -> dict[str, Adapter]:
    """The adapters of one part by module name ('down_blocks.0....to_q'; a text encoder's as
    'text_model.encoder.layers.0.self_attn.q_proj'), read through peft's own state dict."""
    # transformers >= 5.6 flattened CLIPTextModel (no 'text_model.' prefix); the files people
    # share always spell it out, so A1111/ComfyUI/diffusers expect it. CLIPTextModelWithProjection
    # kept it, and its `text_projection` sits beside `text_model`, not inside it.
    flattened = part != "unet" and not hasattr(model, "text_model")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items():
        module, kind = key.split(".lora_", 1)
        module = module.removeprefix("base_model.model.")
        if flattened:
            module = "text_model." + module
        halves.setdefault(module, {})["down" if kind.startswith("A") else "up"] = tensor.detach()
    return {module: Adapter(**pair) for module, pair in halves.items()}


def kohya_state_dict(models: dict[str, torch.nn.Module], prefixes: dict[str, str], alpha: float,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft adapters of each part -> {'lora_unet_..._to_q.lora_down.weight': ..., '.alpha': ...}."""
    out: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        for module, adapter in trained_adapters(model, part).items():
            name = prefixes[part] + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = adapter.down.to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = adapter.up.to("cpu", dtype).contiguous()
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


def lora_parameters_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]
