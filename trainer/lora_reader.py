"""One job: read a kohya/LyCORIS-layout LoRA file (KOHYA_LORA / LEGACY_LORA) back into peft
adapters, the inverse of what trainer/lora_formats.py writes.

This is how a LoHa or LoKr is checked where diffusers has no loader for it (SD 1.5 / SDXL),
and what continuing the training of a saved file needs: the adapters are built on the base
model with the same settings (`lora.add_lora`: peft type, rank, layers), then each file layer
is mapped back onto its peft layer's parameters.

The file holds what a loader (ComfyUI, A1111/Forge) applies, so each tensor is turned back
into peft's terms (trainer/lora.py's module note says what each loader computes):
- the file's scale (alpha / rank; a LoKr with both factors whole: 1, alpha ignored) differs
  from peft's (the config's alpha / r) when the file was written with another alpha, or is a
  whole-factor LoKr whose alpha / r Atelier folded into w1. The ratio goes into one factor (LoRA:
  up; LoHa: w1_a; LoKr: w1 or w1_a), which gives the same weight delta;
- DoRA's `dora_scale` is m * ||W|| / ||W + dW|| per output row, so peft's magnitude is
  m = dora_scale * ||W + dW|| / ||W|| with W the base weight the adapters sit on.
A file that does not fit the adapters built (another type, rank, layer set or DoRA setting)
is refused with the layer and the reason, never loaded in part.

The UNet's layers may be named either way kohya-layout files name them: by the diffusers UNet
(`lora_unet_down_blocks_1_…`: SD 1.5, and SDXL's LEGACY_LORA) or by the original LDM/SGM UNet
(`lora_unet_input_blocks_4_1_…`: SDXL's KOHYA_LORA, kohya's sd-scripts). The file's own names
decide, so a file of either layout resumes, continues and reloads the same.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer import lora
from trainer.errors import ConfigError
from trainer.lora_formats import kohya_layer_names

# Keys of a LoRA file that are not adapter layers: the textual-inversion embeddings A1111/Forge
# read from a LoRA file (`bundle_emb.<placeholder>.…`), loaded by the embedding code, not here.
NOT_ADAPTERS = ("bundle_emb.",)
# peft's tensor name -> its suffix in the kohya layout (the LyCORIS names are peft's own)
KOHYA_SUFFIX = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale"}
KIND_OF_FILE_LAYER = (("hada_w1_a", "loha"), ("lokr_", "lokr"), ("lora_down.weight", "lora"))


def load_lora_file(path: str | Path, models: dict[str, torch.nn.Module],
                   prefixes: dict[str, str], flow_model_type: str = "") -> None:
    """Load the file at `path` into the adapters of `models` (part -> module, each given its
    adapters by `lora.add_lora` with the config that trained the file); `prefixes` are the
    family's kohya prefixes ('lora_unet_', 'lora_te_', ...). `flow_model_type`: the model type
    of a flow-matching transformer, whose layers the file names by the original fused layers
    (trainer/flow_lora_names.py)."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise ConfigError(f"'{path.name}' is not a readable .safetensors file ({error}).") \
            from None
    try:
        if flow_model_type and "transformer" in models:
            from trainer.flow_lora_names import COMFY_PREFIX, KOHYA_PREFIX
            mine = {k: v for k, v in tensors.items()
                    if k.startswith((KOHYA_PREFIX, COMFY_PREFIX))}
            tensors = {k: v for k, v in tensors.items() if k not in mine}
            load_flow_transformer(mine, models["transformer"], flow_model_type)
            models = {p: m for p, m in models.items() if p != "transformer"}
        load_kohya_tensors(tensors, models, prefixes)
    except ConfigError as error:
        raise ConfigError(f"'{path.name}': {error}") from None


@torch.no_grad()
def load_kohya_tensors(tensors: dict[str, torch.Tensor], models: dict[str, torch.nn.Module],
                       prefixes: dict[str, str]) -> None:
    """The work of load_lora_file on tensors already read. Every adapter of `models` must be
    in the file and every file layer of those parts must have an adapter; all values are
    checked before any is copied."""
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key.startswith(NOT_ADAPTERS):
            continue
        layer, _, suffix = key.partition(".")
        by_layer.setdefault(layer, {})[suffix] = tensor
    foreign = [k for k in by_layer if not k.startswith(tuple(prefixes.values()))]
    if foreign:
        raise ConfigError(f"{foreign[0]!r} is not a kohya-layout layer name (lora_unet_…, "
                          "lora_te…); only KOHYA_LORA / LEGACY_LORA files are read back.")
    copies: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    for part, model in models.items():
        adapters = lora.trained_adapters(model, part)
        names = file_layer_names(model, part, list(adapters), prefixes[part], set(by_layer))
        for module, adapter in adapters.items():
            name = names[module]
            if name not in by_layer:
                raise ConfigError(f"the file has no layer {name}: it was trained on other "
                                  "layers (lora_layer_preset / layer_filter) or parts.")
            values = peft_values(adapter, by_layer.pop(name), name)
            copies += [(_parameter(adapter.layer, n), v) for n, v in values.items()]
    loaded = tuple(prefixes[p] for p in models)
    left = [k for k in by_layer if k.startswith(loaded)]
    if left:
        raise ConfigError(f"the file's layer {left[0]} has no adapter here: it was trained "
                          "on other layers (lora_layer_preset / layer_filter).")
    for parameter, value in copies:
        parameter.copy_(value.to(parameter.device, parameter.dtype))


@torch.no_grad()
def load_flow_transformer(tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                          model_type: str) -> None:
    """A flow transformer's LoRA layers (KOHYA_LORA or COMFY_LORA names of the original fused
    layers) into its peft LoRA adapters: each module gets back its own down and up, with the
    file's scale turned into peft's (alpha / r) in up. Every adapter must be in the file."""
    from trainer.flow_lora_names import read_flow_lora
    from trainer.models.transformer_layouts import module_shapes
    adapters = lora.trained_adapters(model, "transformer")
    if any(a.kind != "lora" for a in adapters.values()):
        raise ConfigError("only plain LoRA files of this model type are read back.")
    loras = read_flow_lora(model_type, module_shapes(model), tensors,
                           ranks={m: a.rank for m, a in adapters.items()})
    missing = [m for m in adapters if m not in loras]
    if missing:
        raise ConfigError(f"the file has no layer for {missing[0]}: it was trained on other "
                          "layers (lora_layer_preset / layer_filter).")
    extra = [m for m in loras if m not in adapters and bool(loras[m].up.any())]
    if extra:
        raise ConfigError(f"the file's layer for {extra[0]} has no adapter here: it was "
                          "trained on other layers (lora_layer_preset / layer_filter).")
    copies = []
    for module, adapter in adapters.items():
        weights = loras[module]
        if weights.down.shape != adapter.tensors["lora_A"].shape:
            raise ConfigError(f"{module} has rank {weights.rank} in the file, "
                              f"{adapter.rank} here (another lora_rank?).")
        up = weights.up.float() * (weights.scale / adapter.scaling)
        copies += [(_parameter(adapter.layer, "lora_A"), weights.down),
                   (_parameter(adapter.layer, "lora_B"), up)]
    for parameter, value in copies:
        parameter.copy_(value.to(parameter.device, parameter.dtype))


def file_layer_names(model: torch.nn.Module, part: str, modules: list[str], prefix: str,
                     in_file: set[str]) -> dict[str, str]:
    """Each adapted module's layer name as the file spells it: a UNet's by the original
    (LDM/SGM) UNet when the file uses any such name, else by the diffusers UNet."""
    plain = kohya_layer_names(model, part, modules, prefix, sgm=False)
    if part != "unet":
        return plain
    original = kohya_layer_names(model, part, modules, prefix, sgm=True)
    return original if in_file & set(original.values()) else plain


def peft_values(adapter: lora.Adapter, file: dict[str, torch.Tensor],
                name: str) -> dict[str, torch.Tensor]:
    """One file layer's tensors (by suffix) as the values of the peft layer's parameters."""
    file = {k: v.float() for k, v in file.items()}
    kind = next((k for marker, k in KIND_OF_FILE_LAYER if any(s.startswith(marker) for s in file)),
                None)
    if kind != adapter.kind:
        raise ConfigError(f"{name} is a {kind or 'unknown'} layer in the file, but the config "
                          f"builds {adapter.kind} adapters (peft_type).")
    wanted = {KOHYA_SUFFIX.get(n, n) for n in adapter.tensors}
    present = set(file) - {"alpha"}
    if wanted != present:
        raise ConfigError(f"{name} holds {', '.join(sorted(present))} in the file, the "
                          f"adapters built here {', '.join(sorted(wanted))} (another rank "
                          "split, Tucker factors or DoRA setting: lora_rank, lora_decompose).")
    values = {n: file[KOHYA_SUFFIX.get(n, n)] for n in adapter.tensors}
    for n, value in values.items():
        if n != "lora_magnitude_vector" and value.shape != adapter.tensors[n].shape:
            raise ConfigError(f"{name}.{KOHYA_SUFFIX.get(n, n)} has shape {tuple(value.shape)} "
                              f"in the file, {tuple(adapter.tensors[n].shape)} here (another "
                              "lora_rank?).")
    ratio = file_scale(kind, file) / adapter.scaling
    scaled = {"lora": "lora_B", "loha": "hada_w1_a",
              "lokr": "lokr_w1" if "lokr_w1" in values else "lokr_w1_a"}[kind]
    values[scaled] = values[scaled] * ratio
    if "lora_magnitude_vector" in values:
        values["lora_magnitude_vector"] = magnitude(adapter, values)
    return values


def file_scale(kind: str, file: dict[str, torch.Tensor]) -> float:
    """The factor a loader multiplies the layer's product by (ComfyUI's and A1111's rule): alpha
    / rank, where a file without alpha means alpha = rank (kohya's default), and a LoKr whose
    factors are both whole gets 1 whatever alpha says."""
    if kind == "lora":
        rank = file["lora_down.weight"].shape[0]
    elif kind == "loha":
        rank = file["hada_w1_b"].shape[0]
    else:
        factored = [f for f in ("lokr_w2_b", "lokr_w1_b") if f in file]
        if not factored:
            return 1.0
        rank = file[factored[0]].shape[0]  # w2's rank when w2 is split (as ComfyUI reads it)
    alpha = file["alpha"].item() if "alpha" in file else float(rank)
    return alpha / rank


def magnitude(adapter: lora.Adapter, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """peft's DoRA magnitude from the file's dora_scale: m = dora_scale * ||W + dW|| / ||W||
    (rows), dW from the up/down values already in peft's scale."""
    base = adapter.layer.get_base_layer().weight.detach().float()
    scale = values["lora_magnitude_vector"].to(base.device)
    if scale.shape[0] != base.shape[0] or scale.numel() != base.shape[0]:
        raise ConfigError(f"dora_scale of shape {tuple(scale.shape)} is input-axis DoRA "
                          f"(LyCORIS without wd_on_output); peft learns one magnitude per "
                          f"output channel ({base.shape[0]}).")
    delta = adapter.scaling * (values["lora_B"].flatten(1) @ values["lora_A"].flatten(1))
    merged = base + delta.to(base.device).reshape(base.shape)

    def rows(weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1).norm(dim=1)

    return (scale.flatten() * rows(merged) / rows(base)).reshape(
        adapter.tensors["lora_magnitude_vector"].shape)


def _parameter(layer: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """peft's parameter for a tensor name: LoRA's A/B and DoRA's magnitude are small modules
    per adapter (their `.weight`), LoHa's and LoKr's factors plain parameters."""
    holder = getattr(layer, name)["default"]
    return holder.weight if isinstance(holder, torch.nn.Module) else holder
