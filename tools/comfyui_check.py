"""What ComfyUI loads of an Atelier output, shown by ComfyUI's own code.

    python tools/comfyui_check.py --comfyui DIR --base MODEL_FILE --lora FILE [--json]
    python tools/comfyui_check.py --comfyui DIR --checkpoint FILE [--json]

The first form loads the base model with ComfyUI's own loaders (load_checkpoint_guess_config for
a checkpoint with its text encoders -- not its VAE, which no LoRA touches --, load_diffusion_model
for a transformer-only file such as Flux's original layout, and --text-encoder files beside it) and the LoRA with load_lora_for_models, the loader of its LoraLoader
node, on the CPU, without a server. It reports the model type ComfyUI detects, how many of the
file's keys ComfyUI's LoRA loader used and which it left, and for every layer ComfyUI patched the
change it applied against the change the file's adapters make. That expected change is computed
here from the adapter tensors themselves (LoRA, DoRA, LoHa, LoKr formulas), not through Atelier's
LoRA reader, so an error in either shows. The second form reports what ComfyUI detects in a
single-file checkpoint and how many of its keys the loaded model holds.

ComfyUI detects a model type from tensor shapes; Atelier's tiny test models have shapes no real
model has, so detection fails for them. `--family` then names the model class ComfyUI would pick
for the real model (supported_models.SD15, SDXL, Flux, Chroma, SD3, ZImage, QwenImage, Flux2)
and the check builds
that class on the shapes ComfyUI read from the file (its own detect_unet_config); for tiny text
encoders, ComfyUI's CLIP config files are read with the sizes in the file (layer count, widths).
Neither touches key matching nor weight math: both are ComfyUI's code as it runs for a real model.

Everything above the ComfyUI section is plain torch and is unit-tested without ComfyUI
(tests/test_comfyui_check.py).

Setting up and regenerating docs/comfyui_results.md (how it was made):
  - ComfyUI: the search tool's fetch of hiddenswitch/pip-and-uv-installable-ComfyUI, its HEAD
    tree written out to a folder (git cat-file; a few large blobs are absent and unused here).
  - A venv on Atelier's: `python -m venv --system-site-packages comfy-venv`, then pip-install
    what ComfyUI's modules import and Atelier lacks: einops configargparse frozendict aiohttp
    aio-pika comfy-aimdo humanize natsort torchvision gguf sentencepiece av and the
    opentelemetry-{sdk, exporter-otlp-proto-http, instrumentation(-aio-pika, -requests,
    -aiohttp-server, -aiohttp-client, -urllib3), processor-baggage, semantic-conventions}
    packages its tracer imports (torchvision brings its own torch into that venv).
  - Per family: `python -m trainer make-tiny-model <kind> DIR` (SD 1.5 with UNet widths
    (32, 64), SD 3 / 3.5 with two 64-wide heads, Z-Image at width 1152, Flux.2 with 256
    timestep channels: ComfyUI cannot hold the tiny defaults, see docs/comfyui_results.md and
    tools/comfyui_runs/); the base as one file with
    `family.save_single_file`; Flux / SD 3 CLIP encoders as files (`text_model.` keys); a LoRA
    per format and adapter with `python -m trainer train --config` (64 px, rank 4, one epoch).
  - `comfy-venv/bin/python tools/comfyui_check.py --comfyui DIR --base BASE.safetensors
    --lora OUT.safetensors --family sd15 --fp32-text-enc --json` (Flux / SD 3 also
    `--text-encoder clip_l=FILE [--text-encoder clip_g=FILE]`), `--checkpoint FILE` for a
    single file, `--embedding FILE` for a LoRA's bundled or a standalone embedding.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# The adapters' own change, from their tensors (no ComfyUI, no Atelier reader)
# ---------------------------------------------------------------------------------------------

# The tensor names each adapter layout stores under a module's prefix. Kohya / LyCORIS names
# (A1111, Forge, ComfyUI) and peft's (diffusers): the longest suffixes first so that
# "lora_up.weight" is not taken for a module called "...lora_up".
ADAPTER_SUFFIXES = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.weight", "lora_B.weight",
    "lora.down.weight", "lora.up.weight", "lora_magnitude_vector.weight",
    "lora_magnitude_vector", "dora_scale", "alpha",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
)
# Keys that are not a layer's adapter: embeddings bundled in a LoRA file (OneTrainer's keys).
EMBEDDING_PREFIX = "bundle_emb."


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """(module prefix, adapter tensor name) of one file key, or None when it is no adapter's."""
    for suffix in sorted(ADAPTER_SUFFIXES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


def group_modules(keys) -> dict[str, dict[str, str]]:
    """Every adapted module of a LoRA file: prefix -> {adapter tensor name: file key}."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        if key.startswith(EMBEDDING_PREFIX):
            continue
        split = split_adapter_key(key)
        if split is not None:
            modules.setdefault(split[0], {})[split[1]] = key
    return modules


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float().flatten(1) if tensor.dim() > 1 else tensor.float().reshape(-1, 1)


def _scale(alpha, rank: int | None) -> float:
    # Kohya / LyCORIS: the stored alpha scales by alpha / rank; without alpha (peft's files,
    # alpha folded in) the product is the change itself.
    if alpha is None or rank is None:
        return 1.0
    return float(alpha) / rank


def lora_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """up @ down * alpha / rank (kohya names or peft's lora_A / lora_B), as a matrix."""
    down = t.get("lora_down.weight", t.get("lora_A.weight", t.get("lora.down.weight")))
    up = t.get("lora_up.weight", t.get("lora_B.weight", t.get("lora.up.weight")))
    if "lora_mid.weight" in t:
        raise ValueError("a Tucker LoRA (lora_mid) is not a layout Atelier writes")
    return _matrix(up) @ _matrix(down) * _scale(t.get("alpha"), down.shape[0])


def loha_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank, as a matrix."""
    if "hada_t1" in t or "hada_t2" in t:
        raise ValueError("a Tucker LoHa (hada_t1/t2) is not a layout Atelier writes")
    w1 = _matrix(t["hada_w1_a"]) @ _matrix(t["hada_w1_b"])
    w2 = _matrix(t["hada_w2_a"]) @ _matrix(t["hada_w2_b"])
    return w1 * w2 * _scale(t.get("alpha"), t["hada_w1_b"].shape[0])


def lokr_delta(t: dict[str, torch.Tensor], weight_shape) -> torch.Tensor:
    """LoKr: kron(w1, w2), each factor whole or a low-rank product; alpha / rank applies only
    when a factor is low-rank (LyCORIS' rule). Returned in the weight's shape."""
    rank = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"].float()
    else:
        w1 = t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
        rank = t["lokr_w1_b"].shape[0]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    elif "lokr_t2" in t:
        raise ValueError("a Tucker LoKr (lokr_t2) is not a layout Atelier writes")
    else:
        w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float().flatten(1)
        rank = t["lokr_w2_b"].shape[0]
        if len(weight_shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *weight_shape[2:])
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2).reshape(weight_shape) * _scale(t.get("alpha"), rank)


def apply_dora(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *,
               file_scale: bool) -> torch.Tensor:
    """DoRA's weight from the base, the low-rank change and the stored magnitude.

    peft's `lora_magnitude_vector` m (file_scale False): m * (W0 + dW) / ||W0 + dW||, per output
    row. A kohya-layout `dora_scale` (file_scale True) on the output axis ((out, 1, ...)) is read
    against the base weight's row norms: dora_scale * (W0 + dW) / ||W0|| -- the reading of the
    tools that load these files, for which Atelier stores m * ||W0|| / ||W0 + dW||
    (trainer/lora.py dora_scale), so both give peft's trained weight. On the input axis
    ((1, in)) a dora_scale is the magnitude per input column of W0 + dW."""
    merged = (base.float() + delta).flatten(1)
    values = magnitude.float().reshape(-1)
    per_column = magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.numel() > 1
    if not per_column and values.numel() == merged.shape[0]:
        rows = (base.float().flatten(1) if file_scale else merged).norm(dim=1, keepdim=True)
        result = merged / rows * values.reshape(-1, 1)
    elif values.numel() == merged.shape[1]:
        result = merged / merged.norm(dim=0, keepdim=True) * values.reshape(1, -1)
    else:
        raise ValueError(f"a DoRA magnitude of shape {tuple(magnitude.shape)} fits neither side "
                         f"of a {tuple(base.shape)} weight")
    return result.reshape(base.shape)


def adapter_delta(t: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """The change one module's adapter tensors make to its weight `base` (strength 1)."""
    shape = base.shape
    if any(name.startswith("hada_") for name in t):
        delta = loha_delta(t).reshape(shape)
    elif any(name.startswith("lokr_") for name in t):
        delta = lokr_delta(t, shape)
    else:
        delta = lora_delta(t).reshape(shape)
    if "dora_scale" in t:
        return apply_dora(base, delta, t["dora_scale"], file_scale=True) - base.float()
    magnitude = t.get("lora_magnitude_vector", t.get("lora_magnitude_vector.weight"))
    if magnitude is not None:
        return apply_dora(base, delta, magnitude, file_scale=False) - base.float()
    return delta


# A change below this fraction of the weight is float32 rounding, not training: a layer that got
# no gradient (SDXL's last CLIP-L layer, past the penultimate one it reads) keeps a zero change,
# and DoRA's rescaling of W0 by m / |W0| rounds it by a few 1e-7 of the weight. Such a layer's
# error is measured against the weight instead (it has no change to be relative to).
UNCHANGED = 1e-5


def is_unchanged(expected: torch.Tensor, weight: torch.Tensor) -> bool:
    """The adapters leave this weight as it was (to float32 rounding)."""
    return expected.abs().max().item() <= UNCHANGED * weight.float().abs().max().item()


def relative_error(applied: torch.Tensor, expected: torch.Tensor,
                   weight: torch.Tensor | None = None) -> float:
    """max |applied - expected| over max |expected|, or over max |weight| for a layer the
    adapters leave unchanged (is_unchanged); 0 when both are zero."""
    applied, expected = applied.float(), expected.float()
    if applied.shape != expected.shape:
        return math.inf
    scale = expected.abs().max().item()
    if weight is not None and is_unchanged(expected, weight):
        scale = weight.float().abs().max().item()
    error = (applied - expected).abs().max().item()
    if scale == 0:
        return 0.0 if error == 0 else math.inf
    return error / scale


@dataclass
class KeyReport:
    """How many of a LoRA file's keys a loader used, and which it left."""
    total: int
    loaded: int
    not_loaded: list[str] = field(default_factory=list)
    embeddings_not_loaded: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.loaded == self.total


def key_report(file_keys, loaded_keys) -> KeyReport:
    """Compare the file's keys with those ComfyUI's loader consumed."""
    file_keys, loaded = list(file_keys), set(loaded_keys)
    missing = sorted(k for k in file_keys if k not in loaded)
    return KeyReport(total=len(file_keys), loaded=len(file_keys) - len(missing),
                     not_loaded=[k for k in missing if not k.startswith(EMBEDDING_PREFIX)],
                     embeddings_not_loaded=[k for k in missing if k.startswith(EMBEDDING_PREFIX)])


@dataclass
class LayerResult:
    module: str          # the file's module prefix
    target: str          # the weight ComfyUI patched (with its slice for fused weights)
    relative_error: float  # of the change; of the weight where `unchanged`
    unchanged: bool = False  # the adapters leave this layer as it was (it got no gradient)


def compare_layers(file_tensors: dict[str, torch.Tensor], targets: dict[str, tuple],
                   originals: dict[str, torch.Tensor], patched: dict[str, torch.Tensor]
                   ) -> list[LayerResult]:
    """Per module: ComfyUI's applied change (patched - original weight, its slice for a fused
    weight) against the change the module's own tensors make.

    targets: module prefix -> (weight key, slice[, conversion]) where slice is None or
    (dim, start, length), as ComfyUI's loader aimed it; a conversion (ComfyUI's key maps give
    one where the two layouts order a weight's rows differently, as Flux's final modulation's
    scale and shift) is applied to the change before it is added, so to the expected one too."""
    modules = group_modules(file_tensors)
    results = []
    for module, (key, part, *conversion) in sorted(targets.items()):
        original, after = originals[key].float(), patched[key].float()
        if part is not None:
            dim, start, length = part
            original = original.narrow(dim, start, length)
            after = after.narrow(dim, start, length)
        tensors = {name: file_tensors[k] for name, k in modules[module].items()}
        try:
            if conversion and conversion[0] is not None:
                # the file's layer holds the rows in its own order: its change is computed
                # there (on the weight in that order: DoRA reads it) and then converted
                unconvert = conversion[0]  # an involution (a swap of two halves)
                expected = conversion[0](adapter_delta(tensors, unconvert(original)))
            else:
                expected = adapter_delta(tensors, original)
        except (RuntimeError, ValueError):
            results.append(LayerResult(module, _target_name(key, part), math.inf))
            continue
        results.append(LayerResult(module, _target_name(key, part),
                                   relative_error(after - original, expected, original),
                                   is_unchanged(expected, original)))
    return results


def _target_name(key: str, part) -> str:
    return key if part is None else f"{key}[{part[0]}:{part[1]}+{part[2]}]"


# ---------------------------------------------------------------------------------------------
# ComfyUI: import it as a library and run its loaders
# ---------------------------------------------------------------------------------------------

# The model classes ComfyUI picks for each family Atelier trains (comfy/supported_models.py).
FAMILY_CLASSES = {"sd15": "SD15", "sd15-inpaint": "SD15", "sdxl": "SDXL", "sdxl-inpaint": "SDXL",
                  "flux": "Flux",
                  "chroma": "Chroma", "sd35": "SD3", "sd3": "SD3",  # SD 3.5 is its SD3 class
                  "z-image": "ZImage", "qwen": "QwenImage", "flux2": "Flux2"}


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def import_comfyui(comfy_dir: str, fp32_text_encoder: bool):
    """Import ComfyUI's modules as its own main would, CPU only, no server."""
    argv = ["main.py", "--cpu"] + (["--fp32-text-enc"] if fp32_text_encoder else [])
    saved, sys.argv = sys.argv, argv
    sys.path.insert(0, os.path.abspath(comfy_dir))
    try:
        import comfy.sd  # noqa: F401
        import comfy.utils  # noqa: F401
        import comfy.lora  # noqa: F401
        import comfy.lora_convert  # noqa: F401
        import comfy.model_detection  # noqa: F401
        import comfy.supported_models  # noqa: F401
    finally:
        sys.argv = saved
    return sys.modules["comfy"]


def _hf_clip_sizes(state_dict, prefix: str) -> dict | None:
    """CLIP config values (ComfyUI's json names) read off a transformers-layout text encoder
    under `prefix`. Heads only need to divide the width: they change no weight's shape."""
    emb = state_dict.get(prefix + "embeddings.token_embedding.weight")
    if emb is None:
        return None
    layers = {int(m.group(1)) for k in state_dict
              if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k))}
    projection = state_dict.get(prefix.replace("text_model.", "") + "text_projection.weight")
    return {"hidden_size": emb.shape[1], "vocab_size": emb.shape[0],
            "num_hidden_layers": len(layers),
            "intermediate_size": state_dict[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_attention_heads": _heads(emb.shape[1]),
            "max_position_embeddings": state_dict[
                prefix + "embeddings.position_embedding.weight"].shape[0],
            "projection_dim": (projection.shape[0] if projection is not None else emb.shape[1])}


def _tiny_clip_configs(state_dict: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Sizes for ComfyUI's CLIP config files, read off a checkpoint's text encoders:
    'sd1_clip_config.json' (CLIP-L) and 'clip_config_bigg.json' (OpenCLIP bigG, SGM layout)."""
    configs = {}
    for prefix in ("cond_stage_model.transformer.text_model.",
                   "conditioner.embedders.0.transformer.text_model."):
        sizes = _hf_clip_sizes(state_dict, prefix)
        if sizes:
            configs["sd1_clip_config.json"] = sizes
    prefix = "conditioner.embedders.1.model."
    emb = state_dict.get(prefix + "token_embedding.weight")
    if emb is not None:
        layers = {int(m.group(1)) for k in state_dict
                  if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
        fc = state_dict[prefix + "transformer.resblocks.0.mlp.c_fc.weight"]
        configs["clip_config_bigg.json"] = {
            "hidden_size": emb.shape[1], "vocab_size": emb.shape[0],
            "num_hidden_layers": len(layers), "intermediate_size": fc.shape[0],
            "num_attention_heads": _heads(emb.shape[1]),
            "max_position_embeddings": state_dict[prefix + "positional_embedding"].shape[0],
            "projection_dim": emb.shape[1]}
    return configs


def size_clip_configs(sizes: dict[str, dict]) -> None:
    """Let ComfyUI's CLIP classes read their config files with these sizes (tiny models)."""
    import comfy.sd1_clip as sd1_clip
    import comfy.sdxl_clip as sdxl_clip
    for module in (sd1_clip, sdxl_clip):
        read = getattr(module, "_atelier_read", module.get_path_as_dict)
        module._atelier_read = read

        def sized(config, default_path, *args, _read=read, **kwargs):
            values = _read(config, default_path, *args, **kwargs)
            name = os.path.basename(str(default_path))
            if config is None and name in sizes:
                values = {**values, **sizes[name]}
            return values

        module.get_path_as_dict = sized


def _other_side(projection: torch.Tensor, width: int) -> int:
    # SGM files store the projection either way round; its side that is not the width
    return projection.shape[1] if projection.shape[0] == width else projection.shape[0]


def _heads(width: int) -> int:
    return next(h for h in (8, 4, 2, 1) if width % h == 0)


# The model kinds whose constants the tiny-shape shim read off the file (for the report).
RESIZED_CONSTANTS: set[str] = set()


def _flux_sizes_from_file(config: dict, sd, prefix: str) -> None:
    """detect_unet_config sets Flux's, Chroma's and Flux.2's head layout, output channels and
    Chroma's guidance network as the real models' constants; read them off the tiny file's
    tensors (rotary axes, which have no weights, split the head as the real ones do)."""
    hidden = config["hidden_size"]
    head_dim = sd[f"{prefix}double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    config["num_heads"] = hidden // head_dim
    mlp_in = sd[f"{prefix}double_blocks.0.img_mlp.0.weight"].shape[0]
    final = sd[f"{prefix}final_layer.linear.weight"].shape[0]
    if config["image_model"] == "flux2":
        config["axes_dim"] = [head_dim // 4] * 4
        # its gated MLP's first layer is twice the hidden width (comfy/ldm/flux/layers.py)
        config["mlp_ratio"] = mlp_in / 2 / hidden
        config["out_channels"] = final // (config["patch_size"] ** 2)
        return
    config["axes_dim"] = [head_dim // 4, head_dim // 4, head_dim - 2 * (head_dim // 4)]
    config["mlp_ratio"] = mlp_in / hidden
    if config["image_model"] == "flux":
        config["out_channels"] = final // (config["patch_size"] ** 2)
        return
    config["in_channels"] = sd[f"{prefix}img_in.weight"].shape[1]
    config["out_channels"] = final
    guidance = f"{prefix}distilled_guidance_layer."
    config["in_dim"] = sd[guidance + "in_proj.weight"].shape[1]
    config["hidden_dim"] = sd[guidance + "in_proj.weight"].shape[0]
    config["out_dim"] = sd[guidance + "out_proj.weight"].shape[0]
    config["n_layers"] = len({k[len(guidance):].split(".")[1] for k in sd
                              if k.startswith(guidance + "layers.")})


def _z_image_config(detect, sd, prefix: str, config: dict) -> dict:
    """ComfyUI recognises Z-Image by its width (3840) and then sets its constants (heads,
    rotary axes, theta, feed-forward ratio, its modulation). Run its own detection as if the
    file were that wide (only the shape of cap_embedder.1.weight is read for it), then put back
    the sizes read off the file: width, heads (from the head norm), input channels, refiners."""
    key = f"{prefix}cap_embedder.1.weight"
    real_width = dict(sd)
    real_width[key] = torch.empty(3840, sd[key].shape[1], device="meta")
    z_image = detect(real_width, prefix)
    if not z_image or not z_image.get("z_image_modulation"):
        return config  # this ComfyUI knows no Z-Image constants: leave its config as it is
    dim = config["dim"]
    head_dim = sd[f"{prefix}layers.0.attention.q_norm.weight"].shape[0]
    qkv = sd[f"{prefix}layers.0.attention.qkv.weight"].shape[0]
    patch = z_image["patch_size"]
    z_image.update(dim=dim, n_heads=dim // head_dim, n_kv_heads=(qkv - dim) // (2 * head_dim),
                   in_channels=sd[f"{prefix}x_embedder.weight"].shape[1] // (patch * patch),
                   n_refiner_layers=len({k[len(prefix):].split(".")[1] for k in sd
                                         if k.startswith(f"{prefix}noise_refiner.")}))
    return z_image


def _qwen_image_sizes_from_file(config: dict, sd, prefix: str) -> None:
    """detect_unet_config reads Qwen-Image's input channels and depth; its model class takes
    the other sizes as defaults of the real model (24 heads of 128, text width 3584, 16
    output channels). Read them off the file. The rotary axes (no weights) split the head."""
    head_dim = sd[f"{prefix}transformer_blocks.0.attn.norm_q.weight"].shape[0]
    inner = sd[f"{prefix}img_in.weight"].shape[0]
    patch = config.get("patch_size", 2)
    config.update(attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
                  joint_attention_dim=sd[f"{prefix}txt_norm.weight"].shape[0],
                  out_channels=sd[f"{prefix}proj_out.weight"].shape[0] // (patch * patch),
                  axes_dims_rope=(head_dim // 8, head_dim * 7 // 16,
                                  head_dim - head_dim // 8 - head_dim * 7 // 16))


def use_family_class_for_tiny_shapes(comfy, family: str, state_dict) -> None:
    """When ComfyUI finds no model class for the file's shapes (a tiny test model), let its
    loader use the class it picks for the real model, built on the shapes it detected, and
    read its CLIP configs with the file's sizes. Only sizes change; keys and math are ComfyUI's."""
    detection = comfy.model_detection
    original = detection.model_config_from_unet
    cls = getattr(comfy.supported_models, FAMILY_CLASSES[family])

    def model_config_from_unet(sd, prefix, *args, **kwargs):
        found = original(sd, prefix, *args, **kwargs)
        # a narrow Z-Image matches ComfyUI's Lumina2 (ZImage asks for width 3840): build the
        # family's class on the same detected config instead
        if found is not None and isinstance(found, cls):
            return found
        unet_config = detection.detect_unet_config(sd, prefix)
        if unet_config is None:
            return None
        config = cls(unet_config)
        config.atelier_assumed = True
        return config

    detection.model_config_from_unet = model_config_from_unet
    detect = detection.detect_unet_config

    def detect_unet_config(sd, prefix, *args, **kwargs):
        config = detect(sd, prefix, *args, **kwargs)
        model = config.get("image_model") if config is not None else None
        if model in ("flux", "chroma", "flux2"):
            head_dim = sd[f"{prefix}double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
            if head_dim != sum(config["axes_dim"]):
                _flux_sizes_from_file(config, sd, prefix)
                RESIZED_CONSTANTS.add(model)
        elif model == "lumina2" and family == "z-image" and not config.get("z_image_modulation"):
            config = _z_image_config(detect, sd, prefix, config)
            RESIZED_CONSTANTS.add("z-image")
        elif model == "qwen_image" and family == "qwen":
            _qwen_image_sizes_from_file(config, sd, prefix)
            RESIZED_CONSTANTS.add(model)
        return config

    detection.detect_unet_config = detect_unet_config
    sizes = _tiny_clip_configs(state_dict)
    if sizes:
        size_clip_configs(sizes)


def _unet_prefix(state_dict) -> str:
    return "model.diffusion_model." if any(k.startswith("model.diffusion_model.")
                                           for k in state_dict) else ""


def _square_projection(state_dict, key="conditioner.embedders.1.model.text_projection",
                       comfy_key="clip_g.transformer.text_projection.weight") -> set[str]:
    """ComfyUI's CLIP text model holds a square text_projection (real CLIP-G: 1280 x 1280); the
    tiny SDXL's projects 64 -> 32. Pad it with zeros to square: it shapes only the pooled
    output, and no LoRA layer touches it."""
    projection = state_dict.get(key)
    if projection is not None and projection.shape[0] != projection.shape[1]:
        side = max(projection.shape)
        square = projection.new_zeros(side, side)
        square[:projection.shape[0], :projection.shape[1]] = projection
        state_dict[key] = square
        return {comfy_key}
    return set()


# The clip type of ComfyUI's DualCLIPLoader / TripleCLIPLoader for each model class.
CLIP_TYPES = {"Flux": "FLUX", "Chroma": "CHROMA", "SD3": "SD3"}


def load_text_encoders(comfy, files: dict[str, str], family: str | None, model_class: str):
    """The CLIP object ComfyUI's CLIP loader nodes build from separate text encoder files
    (name -> file: clip_l, clip_g). Real files go through load_clip. Tiny ones: its text
    encoder detection counts layers (CLIP-G has 32), so the check builds the classes load_clip
    picks for the family, without the T5 (Atelier never trains it; a LoRA has no T5 key), and
    loads each file with that encoder's own load_sd. Returns (clip, resized weights)."""
    if not files:
        return None, set()
    if not family:
        clip_type = getattr(comfy.sd.CLIPType, CLIP_TYPES.get(model_class, "STABLE_DIFFUSION"))
        return comfy.sd.load_clip(list(files.values()), clip_type=clip_type), set()
    import comfy.sd1_clip as sd1_clip
    from comfy.supported_models_base import ClipTarget
    from comfy.text_encoders import sd3_clip
    sds = {name: comfy.utils.load_torch_file(path) for name, path in files.items()}
    sizes = {}
    if "clip_l" in sds:
        sizes["sd1_clip_config.json"] = _hf_clip_sizes(sds["clip_l"], "text_model.")
    resized = set()
    if "clip_g" in sds:
        sizes["clip_config_bigg.json"] = _hf_clip_sizes(sds["clip_g"], "text_model.")
        sizes["clip_config_bigg.json"]["projection_dim"] = sizes[
            "clip_config_bigg.json"]["hidden_size"]
        resized = _square_projection(sds["clip_g"], "text_projection.weight")
    size_clip_configs(sizes)
    if family in ("sd35", "sd3"):
        target = ClipTarget(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(
            clip_l="clip_l" in sds, clip_g="clip_g" in sds, t5=False))
    else:
        # Flux's DualCLIPLoader pairs CLIP-L with the T5; its clip_l part is this same class
        # under the same name, so the LoRA key map for clip_l is the same.
        target = ClipTarget(sd1_clip.SD1Tokenizer, sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, parameters=sum(
        t.numel() for sd in sds.values() for t in sd.values()))
    for name, sd in sds.items():
        getattr(clip.cond_stage_model, name).load_sd(sd)
    return clip, resized


def load_base(comfy, path: str, family: str | None, text_encoders: dict | None = None):
    """(model patcher, clip or None, detected class name, whether assumed, the ComfyUI weights
    the tiny-shape shim resized) as ComfyUI loads
    `path`: a checkpoint with its text encoders (load_checkpoint_guess_config; no VAE, which a
    LoRA never touches and whose config ComfyUI does not size from the file), or a
    diffusion-model-only file (load_diffusion_model, as its UNETLoader node)."""
    state_dict, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    embeddings = os.path.dirname(os.path.abspath(path))
    resized = set()
    if family:
        use_family_class_for_tiny_shapes(comfy, family, state_dict)
        resized = _square_projection(state_dict)
    if not _unet_prefix(state_dict):
        model = comfy.sd.load_diffusion_model(path)
        clip, more = load_text_encoders(comfy, text_encoders or {}, family,
                                        type(model.model.model_config).__name__)
        resized |= more
    elif family:
        # load_checkpoint_guess_config's own body, on the state dict read above
        model, clip, _vae, _ = comfy.sd.load_state_dict_guess_config(
            state_dict, output_vae=False, output_clip=True, embedding_directory=embeddings,
            metadata=metadata, ckpt_path=path)
    else:
        model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=False, output_clip=True, embedding_directory=embeddings)
    config = model.model.model_config
    return (model, clip, type(config).__name__, config.__dict__.get("atelier_assumed", False),
            resized)


def _lora_targets(comfy, model, clip, lora: dict) -> tuple[dict, set, dict]:
    """ComfyUI's key map and loader, as load_lora_for_models calls them: module prefix ->
    (weight key, slice) it patches, the keys it consumed, and the state dict it read
    (convert_lora renames only a few foreign layouts; Atelier's files pass through as they are)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    converted = comfy.lora_convert.convert_lora(dict(lora))
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    consumed = set()
    for adapter in patches.values():
        consumed |= set(getattr(adapter, "loaded_keys", ()) or ())
    targets = {}
    modules = group_modules(converted)
    for prefix, target in key_map.items():
        if prefix in modules and (target in patches):
            # a key map's target: a weight key, (key, slice) or (key, slice, conversion)
            key, part, *conversion = target if isinstance(target, tuple) else (target, None)
            targets[prefix] = (key, tuple(part) if part is not None else None, *conversion)
    return targets, consumed, converted


def _weights(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def check_lora(comfy, base: str, lora_path: str, family: str | None,
               text_encoders: dict | None = None) -> dict:
    """The LoraLoader node's work on `lora_path` over `base`, and how it compares."""
    capture = _LogCapture()
    logging.getLogger().addHandler(capture)
    model, clip, detected, assumed, resized = load_base(comfy, base, family, text_encoders)
    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    targets, consumed, converted = _lora_targets(comfy, model, clip, lora)

    # What the LoraLoader node does, then the weights its patched model and clip hold.
    originals = {"model": _weights(model)}
    if clip is not None:
        originals["clip"] = _weights(clip.patcher)
    new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0,
                                                        lora_name=os.path.basename(lora_path))
    # Load each patched model as ComfyUI does before it samples or encodes a prompt (this
    # applies the patches to the weights), and read the weights right then.
    comfy.model_management.load_models_gpu([new_model], force_full_load=True)
    patched = {"model": _weights(new_model)}
    if new_clip is not None:
        comfy.model_management.load_models_gpu([new_clip.patcher], force_full_load=True)
        patched["clip"] = _weights(new_clip.patcher)
    logging.getLogger().removeHandler(capture)

    # A patch's key names the model's or the clip's weight; look it up in the one that has it.
    merged_originals = {**originals.get("clip", {}), **originals["model"]}
    merged_patched = {**patched.get("clip", {}), **patched["model"]}
    shimmed = sorted(m for m, (key, *_) in targets.items() if key in resized)
    targets = {m: t for m, t in targets.items() if m not in shimmed}
    layers = compare_layers(converted, targets, merged_originals, merged_patched)
    report = key_report(converted.keys(), consumed)
    return {
        "base": base, "lora": lora_path, "detected": detected, "detection_assumed": assumed,
        "constants_read_from_file": sorted(RESIZED_CONSTANTS),
        "keys_total": report.total, "keys_loaded": report.loaded,
        "not_loaded": report.not_loaded, "embeddings_not_loaded": report.embeddings_not_loaded,
        "layers_compared": len(layers),
        "layers_not_comparable_tiny_shape": shimmed,
        "modules_in_file": len(group_modules(lora)),
        "max_relative_error": max((r.relative_error for r in layers if not r.unchanged),
                                  default=None),
        "unchanged_layers": sum(r.unchanged for r in layers),
        "unchanged_max_error_of_weight": max((r.relative_error for r in layers if r.unchanged),
                                             default=None),
        "worst_layers": [vars(r) for r in sorted(layers, key=lambda r: (r.unchanged,
                                                                        -r.relative_error))[:5]],
        "comfyui_warnings": [line for line in capture.lines if "not loaded" in line][:5],
    }


def check_checkpoint(comfy, path: str, family: str | None) -> dict:
    """What ComfyUI detects in a single file (before any tiny-shape help) and what it loads."""
    state_dict = comfy.utils.load_torch_file(path)
    detection = comfy.model_detection
    prefix = detection.unet_prefix_from_state_dict(state_dict) if _unet_prefix(state_dict) else ""
    native = detection.model_config_from_unet(state_dict, prefix)
    model, clip, detected, assumed, _ = load_base(comfy, path, family)
    held = {k[len("diffusion_model."):] for k in model.model.state_dict()
            if k.startswith("diffusion_model.")}
    unet = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
    return {"checkpoint": path, "detected": detected, "detection_assumed": assumed,
            # the diffusion model's tensors the file has and ComfyUI's model does not hold,
            # and the other way round (each its own model's names)
            "diffusion_keys_not_held": sorted(unet - held)[:10],
            "diffusion_keys_not_in_file": sorted(held - unet)[:10],
            "constants_read_from_file": sorted(RESIZED_CONSTANTS),
            "detected_natively": type(native).__name__ if native is not None else None,
            "file_keys": len(state_dict), "text_encoders_loaded": clip is not None,
            # 9 = an inpainting UNet (image + mask + masked image), which ComfyUI conditions so
            "in_channels": model.model.model_config.unet_config.get("in_channels"),
            "model_keys": len(model.model.state_dict())}


def expected_embedding(stored: dict[str, torch.Tensor], encoder: str) -> torch.Tensor | None:
    """The vectors an embedding file holds for one text encoder (clip_l / clip_g): its own key,
    A1111's emb_params (SD 1.5's one encoder), or every bundled placeholder's in file order."""
    if encoder in stored:
        return stored[encoder]
    if "emb_params" in stored and encoder == "clip_l":
        return stored["emb_params"]
    bundled = [t for k, t in stored.items() if k.startswith(EMBEDDING_PREFIX)
               and (k.endswith("." + encoder) or ".string_to_param." in k)]
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in bundled]) if bundled else None


def check_embedding(comfy, path: str) -> dict:
    """ComfyUI's own embedding reader (sd1_clip.load_embed, what `embedding:<file name>` in a
    prompt calls, per text encoder) on a file in an embeddings folder, against the vectors the
    file holds."""
    import comfy.sd1_clip as sd1_clip
    from safetensors.torch import load_file
    folder, name = os.path.split(os.path.abspath(path))
    stored = load_file(path)
    encoders = {}
    for encoder in ("clip_l", "clip_g"):
        expected = expected_embedding(stored, encoder)
        if expected is None:
            continue
        read = sd1_clip.load_embed(os.path.splitext(name)[0], folder, expected.shape[-1], encoder)
        encoders[encoder] = {
            "read": read is not None, "vectors": list(read.shape) if read is not None else None,
            "exact": read is not None and read.shape == expected.shape
            and torch.equal(read.float(), expected.float())}
    return {"embedding": path, "prompt": f"embedding:{os.path.splitext(name)[0]}",
            "encoders": encoders,
            "embedding_keys": sorted(k for k in stored if not split_adapter_key(k))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    parser.add_argument("--base", help="the base model file a LoRA is checked against")
    parser.add_argument("--lora", help="the LoRA file to check")
    parser.add_argument("--checkpoint", help="a single-file checkpoint to check")
    parser.add_argument("--embedding", help="an embedding file for ComfyUI's embedding reader")
    parser.add_argument("--family", choices=sorted(FAMILY_CLASSES),
                        help="the family whose model class to assume when the shapes match none "
                             "(tiny test models)")
    parser.add_argument("--text-encoder", action="append", default=[], metavar="NAME=FILE",
                        help="with a diffusion-model-only base: clip_l=FILE or clip_g=FILE, "
                             "the files ComfyUI's CLIP loader nodes read")
    parser.add_argument("--fp32-text-enc", action="store_true",
                        help="ComfyUI's own flag: text encoders in float32 (default fp16 on CPU)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not (args.lora and args.base) and not args.checkpoint and not args.embedding:
        parser.error("give --base and --lora, --checkpoint, or --embedding")
    comfy = import_comfyui(args.comfyui, args.fp32_text_enc)
    if args.checkpoint:
        report = check_checkpoint(comfy, args.checkpoint, args.family)
    elif args.embedding:
        report = check_embedding(comfy, args.embedding)
    else:
        encoders = dict(item.split("=", 1) for item in args.text_encoder)
        report = check_lora(comfy, args.base, args.lora, args.family, encoders)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
