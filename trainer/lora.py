"""LoRA and its variants: which layers get adapters, the trained adapters read back, and the
kohya/LyCORIS-layout file that ComfyUI, A1111/Forge (and, for plain LoRA, diffusers) load (the
other layouts: trainer/lora_formats.py).

Adapters come from peft (`add_adapter` on the diffusers UNet and the transformers text
encoder): `LoraConfig` (with `use_dora` for DoRA), `LoHaConfig`, `LoKrConfig`, on the same
layers whatever the type. The file is written from peft's own state dict, not through
`diffusers.utils.convert_state_dict_to_kohya`, because that function writes alpha = rank
whatever alpha was trained with (DESIGN.md); here `.alpha` holds the configured alpha.

What each loader computes from the file, and so what is written (ComfyUI's
comfy/weight_adapter/{lora,loha,lokr,base}.py; A1111/Forge's network_*.py do the same):
- LoRA: dW = (alpha / rank) * up @ down, rank = down.shape[0]. peft's lora_A/lora_B as they are.
- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, rank = w1_b.shape[0]: peft's own
  tensors and layout (conv layers flattened to (out, in*k*k), which the loaders reshape), and
  peft's scale is alpha / r with the same r.
- LoKr: dW = kron(w1, w2) * scale, where a factor stored as w*_a @ w*_b gives rank =
  w*_b.shape[0] and scale = alpha / rank, but with both factors stored whole the scale is 1
  (alpha ignored). peft always scales by alpha / r, so in that case alpha / r is folded into
  w1 and `.alpha` is written as r (LyCORIS's own convention for it: scale 1).
- DoRA (peft's use_dora): peft learns a magnitude m per OUTPUT channel, W' = m * (W + dW) /
  ||W + dW|| (norm of each output row). ComfyUI and Forge read a `dora_scale` whose first
  dimension is the output size as that output-axis DoRA, but divide by the norm of the base
  weight, ||W||, not of W + dW. So the file's dora_scale is m * ||W|| / ||W + dW||, shaped
  (out, 1) (conv: (out, 1, 1, 1)): ComfyUI and Forge then rebuild exactly peft's W'. A1111
  (not Forge) knows only input-axis DoRA and cannot apply it.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict

from trainer.config import LoraLayerPreset, PeftType, TrainConfig, TrainingMethod
from trainer.errors import ConfigError
from trainer.models import registry

ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def layer_patterns(config: TrainConfig) -> tuple[list[str], bool]:
    """(the denoiser's layer-name patterns, whether they are regular expressions): the
    family's OneTrainer preset (its LAYER_PRESETS; docs/notes/onetrainer-configs.md), or the
    config's own filter."""
    if config.lora_layer_preset == LoraLayerPreset.CUSTOM:
        return [p.strip() for p in config.layer_filter.split(",")], config.layer_filter_regex
    family = registry.family_class(config.model_type)
    presets = family.LAYER_PRESETS
    preset = config.lora_layer_preset.value
    if preset not in presets:
        raise ConfigError(f"lora_layer_preset: {preset} is not a preset of "
                          f"{registry.facts(config.model_type).label}; choose one of "
                          f"{', '.join(presets)} or custom.")
    return presets[preset], preset in family.REGEX_PRESETS


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


def denoiser_targets(denoiser: torch.nn.Module, config: TrainConfig) -> list[str]:
    """The UNet's (transformer's) layers that get adapters: its linear and conv layers whose
    name contains (or,
    as regular expressions, has a match for) any pattern, as OneTrainer's ModuleFilter picks
    them. A pattern that matches no layer is refused (a typo would silently train less)."""
    patterns, regex = layer_patterns(config)
    matchers = [(p, _matcher(p, regex)) for p in patterns]
    used: set[str] = set()
    targets = []
    for name, module in denoiser.named_modules():
        if not isinstance(module, ADAPTABLE):
            continue
        hits = [p for p, matches in matchers if matches(name)]
        used.update(hits)
        if hits or not matchers:
            targets.append(name)
    unused = [p for p in patterns if p not in used]
    if unused:
        denoiser = {"unet": "UNet"}.get(registry.facts(config.model_type).denoiser,
                                        "transformer")
        example = registry.family_class(config.model_type).LAYER_NAME_EXAMPLE
        raise ConfigError(
            "layer_filter: " + ", ".join(repr(p) for p in unused) + f" matched no {denoiser} "
            f"layer (names look like {example}).")
    return targets


def text_encoder_targets(encoder: torch.nn.Module) -> list[str]:
    """Every linear layer of a text encoder (OneTrainer filters only the UNet's)."""
    return [name for name, module in encoder.named_modules()
            if isinstance(module, torch.nn.Linear)]


def exactly(targets: list[str]) -> str:
    """peft's `target_modules` for exactly these module names. A list would be matched as name
    suffixes: Flux's top-level `proj_out` would also pick every single block's `proj_out`,
    which OneTrainer's filter does not; a string is matched whole (re.fullmatch)."""
    return "^(?:" + "|".join(re.escape(t) for t in targets) + ")$"


def adapter_config(config: TrainConfig, targets: list[str]) -> PeftConfig:
    """peft's config for the chosen adapter type; each starts with exactly zero effect (the
    base model): LoRA/DoRA a Gaussian A with a zero B, LoHa a zero w2_b, LoKr a zero w1."""
    targets = exactly(targets)
    if config.peft_type == PeftType.LORA:
        return LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, target_modules=targets,
                          init_lora_weights="gaussian", use_dora=config.lora_decompose)
    # LoHa and LoKr have no dropout on the adapter's input, which is what lora_dropout means
    # for a LoRA. The nearest is rank dropout: each step drops whole output rows of the weight
    # delta with that probability and rescales the rest (LoHa always rescales; LoKr with
    # rank_dropout_scale), so lora_dropout maps to rank_dropout. module_dropout (skip the
    # whole adapter at random) stays 0: nothing in the config asks for it. Conv layers keep
    # peft's flattened (out, in*k*k) factors, the layout LyCORIS itself writes without Tucker.
    if config.peft_type == PeftType.LOHA:
        return LoHaConfig(r=config.lora_rank, alpha=config.lora_alpha,
                          rank_dropout=config.lora_dropout, module_dropout=0.0,
                          target_modules=targets, init_weights=True)
    return LoKrConfig(r=config.lora_rank, alpha=config.lora_alpha,
                      rank_dropout=config.lora_dropout, rank_dropout_scale=True,
                      module_dropout=0.0, target_modules=targets, init_weights=True,
                      decompose_factor=config.lokr_decompose_factor)


@contextlib.contextmanager
def lyc_factor_order():
    """LoKr splits each size n into (a, b), a * b = n. With a decompose factor f that divides n,
    peft returns (f, n / f) as it is, while LyCORIS and OneTrainer (whose LoKr files people
    load and continue) order the pair smaller first: a layer of 32 inputs with f = 8 is
    (4, 8) there, (8, 4) in peft, and the Kronecker factors get other shapes. peft's own
    search (f = -1) already orders it; this orders the f branch too, while adapters are built."""
    from peft.tuners.lokr import layer as lokr_layer
    original = lokr_layer.factorization

    def ordered(dimension: int, factor: int = -1) -> tuple[int, int]:
        m, n = original(dimension, factor)
        return (m, n) if m <= n else (n, m)
    lokr_layer.factorization = ordered
    try:
        yield
    finally:
        lokr_layer.factorization = original


def add_lora(model: torch.nn.Module, config: TrainConfig, part: str) -> list[torch.nn.Parameter]:
    """Attach an adapter to `model` and return its trainable parameters (kept in float32)."""
    denoiser = part == registry.facts(config.model_type).denoiser
    targets = denoiser_targets(model, config) if denoiser else text_encoder_targets(model)
    with lyc_factor_order():
        model.add_adapter(adapter_config(config, targets))
    params = lora_parameters_of(model)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


class Adapter(NamedTuple):
    """One trained adapter layer as peft holds it."""
    tensors: dict[str, torch.Tensor]  # peft's names: lora_A, lora_B, lora_magnitude_vector,
    #                                   hada_w1_a ..., lokr_w1 / lokr_w1_a ...
    layer: torch.nn.Module            # the peft layer (its base weight, rank and scaling)

    @property
    def kind(self) -> str:
        first = next(iter(self.tensors))
        return {"hada_": "loha", "lokr_": "lokr"}.get(first[:5], "lora")

    @property
    def rank(self) -> int:
        return self.layer.r["default"]

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling["default"])

    def lora_delta(self) -> torch.Tensor:
        """A LoRA's dW = scaling * B @ A in the base weight's shape, float32."""
        a, b = self.tensors["lora_A"].float(), self.tensors["lora_B"].float()
        base = self.layer.get_base_layer().weight
        return (self.scaling * (b.flatten(1) @ a.flatten(1))).reshape(base.shape)


# peft's state-dict keys: '<module>.lora_A.weight', '<module>.lora_magnitude_vector',
# '<module>.hada_w1_a', '<module>.lokr_w2_b', ...
ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<name>lora_A|lora_B|lora_magnitude_vector|"
                         r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)"
                         r"(?:\.weight)?$")


def trained_adapters(model: torch.nn.Module, part: str) -> dict[str, Adapter]:
    """The adapters of one part by module name ('down_blocks.0....to_q'; a text encoder's as
    'text_model.encoder.layers.0.self_attn.q_proj'), read through peft's own state dict."""
    # transformers >= 5.6 flattened CLIPTextModel (no 'text_model.' prefix); the files people
    # share always spell it out, so A1111/ComfyUI/diffusers expect it. CLIPTextModelWithProjection
    # kept it, and its `text_projection` sits beside `text_model`, not inside it.
    flattened = part.startswith("text_encoder") and not hasattr(model, "text_model")
    found: dict[str, Adapter] = {}
    for key, tensor in get_peft_model_state_dict(model, save_embedding_layers=False).items():
        match = ADAPTER_KEY.match(key)
        if match is None:
            raise ValueError(f"unexpected adapter tensor {key!r} in the trained {part}")
        module = match["module"].removeprefix("base_model.model.")
        if module not in found:
            found[module] = Adapter({}, model.get_submodule(module))
        found[module].tensors[match["name"]] = tensor.detach()
    return {("text_model." + m if flattened else m): a for m, a in found.items()}


def lycoris_tensors(adapter: Adapter, alpha: float) -> dict[str, torch.Tensor]:
    """A LoHa's or LoKr's tensors under their LyCORIS names (the same as peft's), with alpha
    such that ComfyUI / A1111 / Forge rebuild peft's weight delta (see the module note)."""
    tensors = {name: t.float() for name, t in adapter.tensors.items()}
    if adapter.kind == "lokr" and "lokr_w1_b" not in tensors and "lokr_w2_b" not in tensors:
        # both factors whole: loaders apply no alpha, so peft's alpha / r goes into w1
        tensors["lokr_w1"] = tensors["lokr_w1"] * adapter.scaling
        alpha = float(adapter.rank)
    tensors["alpha"] = torch.tensor(float(alpha))
    return tensors


def dora_scale(adapter: Adapter) -> torch.Tensor:
    """peft's DoRA magnitude m as the `dora_scale` ComfyUI/Forge apply on the output axis:
    m * ||W|| / ||W + dW|| per output channel, shaped (out, 1, ...) like the weight's rank."""
    def row_norms(weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1).norm(dim=1)

    base = adapter.layer.get_base_layer().weight.detach().float()
    merged = base + adapter.lora_delta().to(base.device)
    magnitude = adapter.tensors["lora_magnitude_vector"].float().flatten().to(base.device)
    scale = magnitude * row_norms(base) / row_norms(merged)
    return scale.reshape(base.shape[0], *[1] * (base.dim() - 1))


def kohya_state_dict(models: dict[str, torch.nn.Module], prefixes: dict[str, str], alpha: float,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft adapters of each part -> {'lora_unet_..._to_q.lora_down.weight': ..., '.alpha': ...}
    (LoHa: '.hada_w1_a', ...; LoKr: '.lokr_w1', ...; DoRA also '.dora_scale')."""
    out: dict[str, torch.Tensor] = {}
    for part, model in models.items():
        for module, adapter in trained_adapters(model, part).items():
            name = prefixes[part] + module.replace(".", "_")
            for suffix, tensor in kohya_layer(adapter, alpha).items():
                out[f"{name}.{suffix}"] = tensor.to("cpu", dtype).contiguous()
    return out


def kohya_layer(adapter: Adapter, alpha: float, *, down: str = "lora_down.weight",
                up: str = "lora_up.weight") -> dict[str, torch.Tensor]:
    """One layer's tensors by key suffix, in float32. ComfyUI's own names differ only in the
    LoRA matrices' (`down`/`up` = 'lora_A.weight'/'lora_B.weight')."""
    if adapter.kind != "lora":
        return lycoris_tensors(adapter, alpha)
    out = {down: adapter.tensors["lora_A"].float(), up: adapter.tensors["lora_B"].float(),
           "alpha": torch.tensor(float(alpha))}
    if "lora_magnitude_vector" in adapter.tensors:
        out["dora_scale"] = dora_scale(adapter)
    return out


def network_args(config: TrainConfig) -> dict[str, str]:
    """kohya's `ss_network_module` and `ss_network_args` for the adapter type, as kohya's
    scripts and LyCORIS write them (strings inside the JSON)."""
    if config.peft_type == PeftType.LOHA:
        return {"ss_network_module": "lycoris.kohya",
                "ss_network_args": json.dumps({"algo": "loha"})}
    if config.peft_type == PeftType.LOKR:
        return {"ss_network_module": "lycoris.kohya",
                "ss_network_args": json.dumps({"algo": "lokr",
                                               "factor": str(config.lokr_decompose_factor)})}
    if config.lora_decompose:
        # LyCORIS's names for DoRA and for its output-axis variant (peft's)
        return {"ss_network_module": "networks.lora",
                "ss_network_args": json.dumps({"dora_wd": "True", "wd_on_output": "True"})}
    return {"ss_network_module": "networks.lora"}


def kohya_metadata(config: TrainConfig, family, *, steps: int, epochs: int,
                   title: str) -> dict[str, str]:
    """`ss_*` (kohya) and `modelspec.*` (Stability's model spec) header fields, plus the exact
    config that produced the file."""
    now = datetime.datetime.now(datetime.timezone.utc)
    config_json = config.to_json()
    return {
        **network_args(config),
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


def continue_from_file(config: TrainConfig, family, parts: list[str]) -> None:
    """OneTrainer's `lora_model_name`: the new adapters start from a saved LoRA's weights
    (built with the same type, rank and layers; trainer/lora_reader.py maps the file back and
    refuses one that does not fit, naming the layer). A file with layers of a part that is not
    trained here is refused: its adapters would be left out of the new file."""
    name = config.lora_model_name
    if config.training_method != TrainingMethod.LORA or not name:
        return
    from safetensors import safe_open

    from trainer.lora_reader import load_lora_file
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"lora_model_name: '{name}' does not exist (the LoRA file to continue "
                          "training from).")
    try:
        with safe_open(str(path), "pt") as file:
            names = list(file.keys())
    except Exception as error:  # safetensors raises its own error types for a bad file
        raise ConfigError(f"lora_model_name: '{path.name}' is not a readable .safetensors "
                          f"file ({error}).") from None
    for part, prefix in family.kohya_prefixes.items():
        if part not in parts and any(n.startswith(prefix) for n in names):
            raise ConfigError(f"lora_model_name: '{path.name}' holds {part} layers, but "
                              f"{part}.train is off here; switch it on to continue them too, "
                              "or start from a file without them.")
    try:
        flow = family.facts.model_type if family.facts.flow_matching else ""
        load_lora_file(path, {p: family.parts[p] for p in parts}, family.kohya_prefixes, flow)
    except ConfigError as error:
        raise ConfigError(f"lora_model_name: {error}") from None


# peft's parameter names of each adapter type (DoRA's magnitude is 'lora_magnitude_vector')
ADAPTER_MARKERS = ("lora_", "hada_", "lokr_")


def lora_parameters_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if any(m in n for m in ADAPTER_MARKERS)]
