"""One job: the base model a tool works on — which model type it is, loading it with the
engine's own loader (trainer.models.family.load_family), and which of its weights each LoRA
layer name changes.

A layer name is matched against every spelling the loaders accept for a module: kohya's
flattened names (SD 1.5's diffusers UNet names; SDXL's original SGM UNet names, which kohya's
sd-scripts and Atelier's KOHYA_LORA use; LEGACY_LORA's diffusers names), ComfyUI's
(`diffusion_model.<SGM name>`, `text_encoders.clip_l.transformer.<CLIP name>`) and diffusers'
(`unet.<module>`, `text_encoder.<module>`, with or without CLIP's `text_model.`). A flow
transformer's kohya / ComfyUI layers name the original fused layers; those are split onto the
diffusers modules by trainer/flow_lora_names.py's reader.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer.errors import AtelierError, ConfigError
from trainer.lora_formats import COMFY_TEXT_ENCODERS, COMFY_UNET_PREFIX, ldm_unet_names
from trainer.models import registry

ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)
# model_index.json's pipeline class -> model type (the base model of a tool)
PIPELINES = (("StableDiffusionXL", "STABLE_DIFFUSION_XL_10_BASE"),
             ("StableDiffusion3", "STABLE_DIFFUSION_3"), ("Flux", "FLUX_DEV_1"),
             ("Chroma", "CHROMA_1"), ("StableDiffusion", "STABLE_DIFFUSION_15"))
# single-file checkpoint keys -> model type
CHECKPOINT_KEYS = (("conditioner.embedders.", "STABLE_DIFFUSION_XL_10_BASE"),
                   ("double_blocks.", "FLUX_DEV_1"), ("joint_blocks.", "STABLE_DIFFUSION_3"),
                   ("model.diffusion_model.input_blocks.", "STABLE_DIFFUSION_15"))


def guess_model_type(base: str, lora_metadata: list[dict[str, str]] = ()) -> str:
    """The model type of `base` (a diffusers folder or a single file), else what the LoRA
    files' headers name, else SD 1.5. Inpainting UNets (9 input channels) get the inpainting
    type, so that the family's loader accepts them."""
    path = Path(base).expanduser()
    found = ""
    if (path / "model_index.json").is_file():
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except ValueError:
            index = {}
        name = str(index.get("_class_name", ""))
        found = next((t for marker, t in PIPELINES if marker in name), "")
        if found == "STABLE_DIFFUSION_3" and _sd35(path):
            found = "STABLE_DIFFUSION_35"
        if found and _inpainting_folder(path):
            found += "_INPAINTING"
    elif path.is_file():
        found = _checkpoint_type(path)
    if not found:
        found = next((t for t in map(named_model_type, lora_metadata) if t), "")
    return found or "STABLE_DIFFUSION_15"


def _sd35(path: Path) -> bool:
    try:
        config = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("qk_norm") or config.get("dual_attention_layers"))


def _inpainting_folder(path: Path) -> bool:
    try:
        config = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("in_channels") == 9


def _checkpoint_type(path: Path) -> str:
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as file:
            keys = list(file.keys())
    except Exception:  # the loader names an unreadable file itself
        return ""
    for marker, model_type in CHECKPOINT_KEYS:
        if any(marker in k for k in keys):
            if model_type.startswith("STABLE_DIFFUSION_") and any(
                    k == "model.diffusion_model.input_blocks.0.0.weight" for k in keys):
                with safe_open(str(path), "pt") as file:
                    shape = file.get_slice("model.diffusion_model.input_blocks.0.0.weight")\
                        .get_shape()
                if shape[1] == 9:
                    return model_type + "_INPAINTING"
            return model_type
    return ""


def named_model_type(metadata: dict[str, str]) -> str:
    from trainer.try_lora import ARCHITECTURES, BASE_MODEL_VERSIONS
    try:
        config = json.loads(metadata.get("atelier_config") or "{}")
    except ValueError:
        config = {}
    if config.get("model_type") in registry.FAMILIES:
        return config["model_type"]
    version = metadata.get("ss_base_model_version", "")
    if version in BASE_MODEL_VERSIONS:
        return BASE_MODEL_VERSIONS[version]
    if version.startswith("sd_v1"):  # kohya's SD 1.x (sd_v2 is SD 2, not a family here)
        return "STABLE_DIFFUSION_15"
    architecture = metadata.get("modelspec.architecture", "")
    return next((t for prefix, t in ARCHITECTURES if architecture.startswith(prefix)), "")


def load_base(base: str, model_type: str, field_name: str = "--base"):
    """The model at `base` loaded by its family (float32, on the CPU: a merge is exact there
    and needs no GPU). Errors name `field_name`."""
    from trainer.config import config_from_dict
    from trainer.models.family import load_family
    if model_type not in registry.FAMILIES:
        raise ConfigError(f"--model-type {model_type}: not a model type (choose one of "
                          f"{', '.join(registry.FAMILIES)}).")
    config = config_from_dict({"base_model_name": str(base), "model_type": model_type})
    try:
        family = load_family(config)
    except AtelierError as error:  # ModelLoadError, ConfigError: named by the config's field
        raise ConfigError(f"{field_name}: {str(error).removeprefix('base_model_name: ')}") \
            from None
    for module in family.parts.values():
        module.to(torch.float32).requires_grad_(False)
    return family


def weight_targets(family) -> dict[str, tuple[str, str]]:
    """{layer name in any layout: (part, module name)} of every linear and conv layer of the
    family's parts (the flow transformer's kohya / ComfyUI names excepted: see
    `flow_denoiser`)."""
    targets: dict[str, tuple[str, str]] = {}
    flow = family.facts.flow_matching
    for part, model in family.parts.items():
        modules = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
        prefix = family.kohya_prefixes.get(part, "")
        if part == "unet":
            sgm = ldm_unet_names(model, modules)
            for m in modules:
                for name in (prefix + m.replace(".", "_"), prefix + sgm[m].replace(".", "_"),
                             COMFY_UNET_PREFIX + sgm[m], f"unet.{m}"):
                    targets[name] = (part, m)
        elif part == "transformer":
            for m in modules:
                targets[f"transformer.{m}"] = (part, m)
                if not flow:
                    targets[prefix + m.replace(".", "_")] = (part, m)
        else:
            # transformers >= 5.6 flattened CLIPTextModel (no 'text_model.'); files spell it
            flattened = not hasattr(model, "text_model") and hasattr(model, "encoder")
            comfy = COMFY_TEXT_ENCODERS.get(part, "")
            for m in modules:
                spelled = [m, "text_model." + m] if flattened else [m]
                for s in spelled:
                    if prefix:
                        targets[prefix + s.replace(".", "_")] = (part, m)
                    if comfy:
                        targets[comfy + s] = (part, m)
                    targets[f"{part}.{s}"] = (part, m)
    return targets


def is_flow_original_name(family, name: str) -> bool:
    """A flow transformer's layer named by the original fused layers (kohya / ComfyUI)."""
    from trainer.flow_lora_names import COMFY_PREFIX, KOHYA_PREFIX
    return family.facts.flow_matching and name.startswith((KOHYA_PREFIX, COMFY_PREFIX))


def flow_denoiser_deltas(family, layers) -> dict[str, torch.Tensor]:
    """{transformer module: dW} of a flow family's kohya / ComfyUI transformer layers (plain
    LoRA only: the format holds only those for these families)."""
    from trainer.flow_lora_names import read_flow_lora
    from trainer.models.transformer_layouts import module_shapes
    tensors = {}
    for layer in layers:
        if layer.kind != "lora" or layer.dora:
            raise ConfigError(f"layer {layer.name} is a {layer.kind}{' DoRA' * bool(layer.dora)}"
                              f" layer; {family.facts.label}'s original layer names hold only "
                              "plain LoRA layers here.")
        # the reader takes kohya's suffixes for both layouts' names
        tensors[f"{layer.name}.lora_down.weight"] = layer.tensors["down"]
        tensors[f"{layer.name}.lora_up.weight"] = layer.tensors["up"]
        if layer.alpha is not None:
            tensors[f"{layer.name}.alpha"] = torch.tensor(layer.alpha)
    transformer = family.parts["transformer"]
    loras = read_flow_lora(family.facts.model_type, module_shapes(transformer), tensors)
    return {module: weights.delta() for module, weights in loras.items()}
