"""How much GPU memory a config's training needs, known before Start.

    python -m trainer estimate --config my.json [--set key=value ...] [--json]

Four sums, in GB of 2^30 bytes (what GPU makers and `torch.cuda` call a GB):

- weights: every part the training step keeps on the GPU, each tensor in the dtype the part
  is stored in, counted from the model's own files (trainer/model_tensors.py reads the
  safetensors headers: names, shapes and dtypes, no tensor), plus what training adds: LoRA
  adapters (float32), a fine-tuned part's float32 master weights, an EMA copy kept on the GPU.
  A transformer read from a .gguf file (weight_dtype GGUF) is counted from that file's header,
  its tensors as the loaded transformer holds them (GGUF_CAST).
  Without the files (no base model given, a hub id not in the local cache) the family's
  standard model is counted on the meta device from the configs this project ships, and the
  estimate says so.
- optimizer: the trained parameters' gradients and optimizer state, per tensor from its shape
  (AdamW 8 bytes a parameter, 8-bit AdamW 2 for tensors of at least `min_8bit_size` elements,
  Adafactor its factored row/column statistics, Prodigy 16, Lion 4, SGD 4 with momentum).
- activations: what the denoiser's forward keeps for the backward pass at the largest
  resolution, times the batch, counted from the denoiser's own config (`_unet_units`,
  `_transformer_units`) with constants measured on this CPU on the tiny models and checked on a
  full-size SD 1.5 UNet (MEASURED below says how), and the half-precision copies autocast
  makes of float32 weights. Which figures are measured and which are not is stated beside each
  constant.
- overhead: the CUDA context and allocator slack (a constant, not measured here).

The training step is not the only phase: with latent caching on a GPU the run first fills the
caches with the VAE and the text encoders on the GPU and the denoiser not yet there
(trainer/residency.py); the estimate is the larger of the two phases.

The engine never imports gradio: the page (ui/memory_panel.py) and the CLI both call
`estimate` and say the result with `fit_sentence` / `levers`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from trainer.config import TrainConfig, TrainingMethod, parse_resolution
from trainer.errors import AtelierError, ConfigError, ModelLoadError
from trainer.model_tensors import (FLOAT_TYPES, SAFETENSORS_BYTES, ModelTensors, TensorInfo,
                                   meta_module, model_tensors, part_config)
from trainer.models import registry

GB = 2 ** 30

# --- Bytes of a stored parameter ----------------------------------------------------------------

# Plain storage types: bytes a parameter.
PLAIN_BYTES = {"FLOAT_32": 4, "TFLOAT_32": 4, "BFLOAT_16": 2, "FLOAT_16": 2}
# Quantized storage (issue 26, trainer/quantization.py): only linear layers' weights are
# quantized, the layers trainer.quantization picks; the rest of the part is stored in the train
# dtype. FLOAT_8: a float8 code a weight and a float32 scale per output row; INT_8
# (bitsandbytes' Linear8bitLt): an int8 a weight and a float32 scale per row; NFLOAT_4
# (bitsandbytes' NF4 with double quantization, blocks of 64): half a byte a weight, a uint8
# absmax per block, a float32 absmax per 256 blocks, and the small tables each layer keeps.
QUANTIZED = ("FLOAT_8", "INT_8", "NFLOAT_4")


def quantized_weight_bytes(dtype: str, shape: tuple[int, ...]) -> float:
    """Bytes a linear weight of `shape` (out, in) takes stored as `dtype`, statistics included
    (what trainer.quantization.stored_bytes counts on a quantized layer)."""
    n = math.prod(shape)
    if dtype in ("FLOAT_8", "INT_8"):
        return n + 4 * shape[0]
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * (16 + 256)




def dtype_name(value: Any) -> str:
    return str(getattr(value, "value", value))


# --- A transformer read from a GGUF file (transformer.weight_dtype GGUF) ------------------------

# What is on the GPU of a .gguf file's tensors (diffusers 0.42's load_gguf_checkpoint and
# GGUFQuantizer, as trainer/models/flow_family.py loads them): an F32 or F16 tensor becomes a
# plain tensor, which the loader casts to the torch_dtype Atelier loads the transformer in (the
# train dtype, flow_family.load_dtypes; no flow family keeps modules in float32); every other
# type (Q8_0, Q4_K, ..., and BF16) stays as the file stores it, its bytes in a GGUFParameter
# that nothing casts (trainer/placement.py leaves a quantized part's dtypes alone), except where
# no GGUF linear layer reads it: Atelier dequantizes such a tensor into the train dtype at load
# (quantization.prepare_gguf_transformer: a BF16 positional embedding, a convolution). So:
# 2-D packed tensors (the linear layers' weights) count their bytes in the file, the rest
# their elements at the train dtype's size (tests/test_gguf_estimate.py holds it to the
# loaded tiny Flux.1's parameters).
GGUF_CAST = ("F32", "F16")


def gguf_packed_bytes(tensor: TensorInfo) -> int:
    """Bytes of a GGUF tensor as the file stores it (gguf's own rule: whole blocks)."""
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[tensor.dtype]]
    return tensor.numel * size // block


def gguf_stored_bytes(tensors: list[TensorInfo], train_bytes: int) -> int:
    """The GPU bytes of a GGUF transformer's tensors (GGUF_CAST says why)."""
    return sum(t.numel * train_bytes if t.dtype in GGUF_CAST or len(t.shape) != 2
               else gguf_packed_bytes(t) for t in tensors)


# --- Activations: the formula and where its constants come from --------------------------------

# MEASURED: the peak of one LoRA training step above the loaded model, on this CPU in float32
# (torch.profiler's allocation events: the running sum of every allocation and free during the
# third step; the model, adapters and optimizer state exist before it). Tiny models of
# trainer/models/tiny.py and tiny_flow.py, rank 4, attn-mlp (SD 3.5: attn-only), batch 1 and
# 2, 128 and 256 px, text encoders frozen; tests/test_memory_estimate.py repeats the
# measurement and holds the estimate to it.
#
# UNet families: `_unet_units` counts, from the UNet's config, the float32 elements the
# forward keeps (a ResnetBlock2D 3 feature maps of its input width and 3 of its output width;
# a transformer layer 30 maps: norms, q/k/v, the fused attention's q, k, v and output, the
# GEGLU feed-forward's 8x and 4x maps; a Transformer2DModel 3 more; samplers 1). With
# checkpointing each resnet and transformer layer keeps its input, and the largest one's maps
# come back while its backward runs (counted, not bench/cases.py's CHECKPOINTED_SHARE: the share
# depends on the model). Measured / counted: 1.00-1.02 (SD 1.5), 0.95-1.02 (SDXL) without
# checkpointing; with it 1.12-1.13 (tiny SD 1.5), 0.84-1.01 (tiny SDXL) and 1.21 (the full-size
# SD 1.5 below), so the checkpointed count is scaled by 1.2 (the full-size figure; the tiny
# models' measured / estimated is then 0.94-0.95 and 0.72-0.87).
UNET_MEASURED_PER_COUNTED = 1.0
UNET_CHECKPOINTED_MEASURED_PER_COUNTED = 1.2
# Flow transformers (Flux.1, Chroma, SD 3 / 3.5): bytes a (token x hidden width x block) keeps
# without checkpointing, and with checkpointing per block (its saved input and what the
# recomputation adds), one block's full activations on top (tiny Flux.1, Chroma, SD 3.5:
# measured / estimated 0.86-1.03 without checkpointing, 0.84-1.03 with it).
TRANSFORMER_BYTES_PER_UNIT = 76.0
TRANSFORMER_CHECKPOINTED_BYTES_PER_UNIT = 15.0
# What half-precision autocast (train_dtype BFLOAT_16 / FLOAT_16) keeps of the float32 figure.
# MEASURED with the CPU's bfloat16 autocast on the tiny models at 256 px: 0.64 (SD 1.5; 0.65
# checkpointed), 0.76 (Flux.1; 0.78). CUDA's autocast runs more ops in half precision and may
# keep less (bench/cases.py assumes 0.5): not measured.
HALF_PRECISION_SHARE = {"unet": 0.65, "transformer": 0.77}
# Not measured: the CUDA context, cuBLAS workspace and the caching allocator's slack
# (bench/cases.py's figure for CUDA).
OVERHEAD_GB = 0.5
# MEASURED at full size, the same way (torch.profiler's allocations, third step, CPU, float32):
# an SD 1.5-size UNet (trainer/models/random_full.py's, random weights), LoRA r16 attn-mlp,
# AdamW, 256 px, batch 1: 456.9 MiB above the loaded model without checkpointing, 165.0 MiB
# with it (activations and the adapters' gradients). The formula says 491.5 and 158.8 MiB;
# tests/test_memory_estimate.py holds it to both. bench/cases.py's ACTIVATION_GB_256 "sd15" (1.2 GB) is the process's peak
# RSS less weights and runtime: it also counts what the allocator and the libraries keep beyond
# the live tensors, which a GPU's allocator does not (its slack is in OVERHEAD_GB).
SD15_FULL_MEASURED_MIB_256 = {"plain": 456.9, "checkpointed": 165.0}


# --- The result -------------------------------------------------------------------------------

@dataclass
class MemoryEstimate:
    weights_gb: float                 # on the GPU in the peak phase
    optimizer_gb: float               # gradients + optimizer state
    activations_gb: float
    overhead_gb: float
    total_gb: float
    device_gb: float | None           # the GPU's memory (None: no GPU here)
    parts: dict[str, float]           # each part's stored weights (GB), all parts
    part_bytes: dict[str, int]        # the same in bytes, exact
    on_gpu: list[str]                 # the parts on the GPU in the peak phase
    phase: str                        # "training" | "filling the caches"
    trained_parameters: int
    source: str                       # where the weights were counted
    notes: list[str] = field(default_factory=list)
    # Each phase's {weights_gb, optimizer_gb, activations_gb} (the peak phase's are above)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def fits(self) -> bool | None:
        return None if self.device_gb is None else self.total_gb <= self.device_gb

    def to_json(self) -> dict:
        r = lambda v: round(v, 3)  # noqa: E731
        return {"weights_gb": r(self.weights_gb), "optimizer_gb": r(self.optimizer_gb),
                "activations_gb": r(self.activations_gb), "total_gb": r(self.total_gb),
                "device_gb": None if self.device_gb is None else r(self.device_gb),
                "parts": {k: r(v) for k, v in self.parts.items()},
                "overhead_gb": r(self.overhead_gb), "fits": self.fits, "phase": self.phase,
                "on_gpu": self.on_gpu, "trained_parameters": self.trained_parameters,
                "source": self.source, "notes": self.notes,
                "phases": {name: {k: r(v) for k, v in values.items()}
                           for name, values in self.phases.items()}}


@functools.lru_cache(maxsize=1)
def device_memory_gb() -> float | None:
    """The total memory of CUDA device 0 (GB), or None without a GPU."""
    import torch
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / GB


# --- Weights -----------------------------------------------------------------------------------

def quantized_names(config: TrainConfig, part: str, tensors: list[TensorInfo],
                    module_spec: Any) -> set[str]:
    """The weights a quantized dtype stores quantized: the linear layers trainer.quantization
    picks (its own functions, on the part's module built on the meta device). A single file
    whose parts have no config here: its 2-D weights that are not embeddings."""
    from trainer import quantization
    if module_spec is None:
        return {t.name for t in tensors if len(t.shape) == 2 and t.name.endswith(".weight")
                and "embed" not in t.name}
    module = meta_module(module_spec)
    if part == registry.facts(config.model_type).denoiser:
        patterns, regex = quantization.quantization_patterns(config)
        layers = quantization.layers_to_quantize(module, patterns, regex, part=part)
    else:
        layers = quantization.layers_to_quantize(module, part=part)
    names = {f"{layer}.weight" for layer in layers}
    return {t.name for t in tensors if t.name in names}


def stored_bytes(tensors: list[TensorInfo], dtype: str, quantized: set[str] = frozenset(),
                 rest_bytes: int = 4) -> tuple[float, str | None]:
    """(bytes of `tensors` stored as `dtype`, a note for a dtype this estimate does not know).
    A quantized dtype stores the `quantized` weights so and the rest in `rest_bytes` (the train
    dtype's); non-float tensors keep their own size."""
    note = None
    if dtype not in QUANTIZED and dtype not in PLAIN_BYTES:
        note = f"weight dtype {dtype} is not known to the estimate: counted as 4 bytes a weight"
    total = 0.0
    for t in tensors:
        if t.dtype not in FLOAT_TYPES:
            total += t.numel * SAFETENSORS_BYTES.get(t.dtype, 4)
        elif dtype in QUANTIZED and t.name in quantized:
            total += quantized_weight_bytes(dtype, t.shape)
        elif dtype in QUANTIZED:
            total += t.numel * rest_bytes
        else:
            total += t.numel * PLAIN_BYTES.get(dtype, 4)
    return total, note


# --- What trains: adapters, masters, gradients, optimizer state --------------------------------

def lora_tensor_shapes(module, config: TrainConfig, part: str) -> list[tuple[int, ...]]:
    """The shapes of the adapter tensors the engine would add to `part` (trainer/lora.py picks
    the layers, the same function as training), from each layer's shape: LoRA r x in (x k x k)
    and out x r (x 1 x 1); DoRA adds a magnitude per output; LoHa and LoKr as peft builds
    them (asked of peft for each distinct layer shape, on the meta device)."""
    import torch
    from trainer import lora
    from trainer.config import PeftType
    facts = registry.facts(config.model_type)
    targets = (lora.denoiser_targets(module, config) if part == facts.denoiser
               else lora.text_encoder_targets(module))
    r = config.lora_rank
    shapes: list[tuple[int, ...]] = []
    for name in targets:
        layer = module.get_submodule(name)
        if config.peft_type != PeftType.LORA:
            shapes += _peft_shapes(config, layer)
            continue
        if isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            shapes += [(r, layer.in_channels // layer.groups, kh, kw),
                       (layer.out_channels, r, 1, 1)]
            out = layer.out_channels
        else:
            shapes += [(r, layer.in_features), (layer.out_features, r)]
            out = layer.out_features
        if config.lora_decompose:
            shapes.append((out,))
    return shapes


def _peft_shapes(config: TrainConfig, layer) -> list[tuple[int, ...]]:
    key = (type(layer).__name__, tuple(layer.weight.shape),
           getattr(layer, "kernel_size", None), getattr(layer, "groups", 1))
    return list(_peft_shapes_cached(key, config.peft_type.value, config.lora_rank,
                                    config.lokr_decompose_factor))


@functools.lru_cache(maxsize=512)
def _peft_shapes_cached(key, peft_type: str, rank: int, factor: int):
    import torch
    from peft import inject_adapter_in_model
    from trainer import lora
    from trainer.config import PeftType
    kind, weight_shape, kernel, groups = key
    with torch.device("meta"):
        if kind == "Conv2d":
            layer = torch.nn.Conv2d(weight_shape[1] * groups, weight_shape[0], kernel,
                                    groups=groups)
        else:
            layer = torch.nn.Linear(weight_shape[1], weight_shape[0])
        holder = torch.nn.Sequential()
        holder.add_module("layer", layer)
        settings = TrainConfig.model_construct(peft_type=PeftType(peft_type), lora_rank=rank,
                                               lora_alpha=1.0, lora_dropout=0.0,
                                               lokr_decompose_factor=factor,
                                               lora_decompose=False)
        with lora.lyc_factor_order():
            inject_adapter_in_model(lora.adapter_config(settings, ["layer"]), holder)
    return tuple(tuple(p.shape) for n, p in holder.named_parameters()
                 if any(s in n for s in ("lora_", "hada_", "lokr_")))


def optimizer_state_bytes(config: TrainConfig, shapes: list[tuple[int, ...]]) -> float:
    """The optimizer's state for trained tensors of these shapes (float32 moments)."""
    from trainer.config import Optimizer
    from trainer.optim.registry import resolve_parameters
    opt = config.optimizer.optimizer
    try:
        p = resolve_parameters(opt, config.optimizer.model_dump(exclude={"optimizer"}))
    except AtelierError:
        p = {}
    total = 0.0
    for shape in shapes:
        n = math.prod(shape)
        if opt == Optimizer.ADAMW:
            total += 8 * n
        elif opt == Optimizer.ADAMW_8BIT:
            # two uint8 states with a float32 absmax per block of 256 each; small tensors 32-bit
            total += (2 * n + 2 * 4 * math.ceil(n / 256)) if n >= p.get("min_8bit_size", 4096) \
                else 8 * n
        elif opt == Optimizer.PRODIGY:      # exp_avg, exp_avg_sq, s, p0 (a float32 each)
            total += 16 * n
        elif opt == Optimizer.ADAFACTOR:    # factored second moment; beta1 adds a first
            if len(shape) >= 2:
                total += 4 * (n // shape[-1] + n // shape[-2])
            else:
                total += 4 * n
            if p.get("beta1") is not None:
                total += 4 * n
        elif opt == Optimizer.LION:         # one float32 momentum
            total += 4 * n
        elif opt == Optimizer.SGD:
            total += 4 * n if p.get("momentum", 0) > 0 else 0
        else:
            total += 8 * n
    return total


# --- Activations ------------------------------------------------------------------------------

def _as_list(value, length: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * length


def _unet_units(cfg: dict, h: int, w: int) -> tuple[float, float]:
    """(elements kept without checkpointing, with checkpointing) by a UNet2DConditionModel's
    forward for one sample of h x w latents; see UNET_MEASURED_PER_COUNTED. With
    checkpointing, each resnet and transformer layer keeps its input, the rest is kept, and
    the largest unit's full maps come back while its backward runs."""
    channels = list(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(channels)
    per_block = _as_list(cfg.get("layers_per_block", 2), levels)
    layers = _as_list(cfg.get("transformer_layers_per_block", 1), levels)
    down = list(cfg.get("down_block_types", ()))
    up = list(cfg.get("up_block_types", ()))
    positions = [math.ceil(h / 2 ** i) * math.ceil(w / 2 ** i) for i in range(levels)]
    full = kept = largest = 0.0

    def resnet(c_in, c_out, n):
        nonlocal full, kept, largest
        size = n * (3 * c_in + 3 * c_out)
        full += size
        kept += n * c_in
        largest = max(largest, size)

    def attention(c, n, count):
        nonlocal full, kept, largest
        full += n * c * (3 + 30 * count)
        kept += n * c * (3 + count)
        largest = max(largest, 30 * n * c)

    def fixed(size):  # not checkpointed: samplers, the output head
        nonlocal full, kept
        full += size
        kept += size

    previous = channels[0]
    for i, kind in enumerate(down):
        for j in range(per_block[i]):
            resnet(previous if j == 0 else channels[i], channels[i], positions[i])
            if "CrossAttn" in kind:
                attention(channels[i], positions[i], layers[i])
        previous = channels[i]
        if i < levels - 1:
            fixed(channels[i] * positions[i])
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        resnet(channels[-1], channels[-1], positions[-1])
        attention(channels[-1], positions[-1], layers[-1])
        resnet(channels[-1], channels[-1], positions[-1])
    rev_channels, rev_layers = channels[::-1], layers[::-1]
    rev_blocks = per_block[::-1]
    previous = rev_channels[0]
    for i, kind in enumerate(up):
        level = levels - 1 - i
        out, skip_in = rev_channels[i], rev_channels[min(i + 1, levels - 1)]
        count = rev_blocks[i] + 1
        for j in range(count):
            skip = skip_in if j == count - 1 else out
            resnet((previous if j == 0 else out) + skip, out, positions[level])
            if "CrossAttn" in kind:
                attention(out, positions[level], rev_layers[i])
        previous = out
        if i < levels - 1:
            fixed(out * positions[level - 1])
    fixed(3 * channels[0] * positions[0])
    return full, kept + largest


def _text_tokens(config: TrainConfig, model_type: str) -> int:
    """Text tokens a flow transformer attends to beside the image's (the family's conditioning:
    Flux.1 T5's, Chroma T5's (padding cut: the configured length is the most), SD 3 CLIP's 77
    joined with T5's 77)."""
    if model_type == "FLUX_DEV_1":
        return int(config.text_encoder_2_sequence_length or 512)
    if model_type == "CHROMA_1":
        return int(config.text_encoder_sequence_length or 512)
    return 77 + 77


def _transformer_units(cfg: dict, tokens: int) -> tuple[int, int]:
    """(token x width x block units of the whole transformer, of one block): Flux.1's and
    Chroma's double and single blocks and SD 3's joint blocks each count as one."""
    width = int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128))
    blocks = int(cfg.get("num_layers", 19)) + int(cfg.get("num_single_layers", 0))
    return tokens * width * blocks, tokens * width


def _latent_scale(vae_cfg: dict) -> int:
    return 2 ** (len(vae_cfg.get("block_out_channels", (1, 2, 3, 4))) - 1)


def activation_bytes(config: TrainConfig, modules: dict[str, Any], *, checkpointing: bool,
                     part: str, height: int, width: int) -> float:
    """Bytes one sample's forward of `part` keeps for the backward pass, in float32."""
    facts = registry.facts(config.model_type)
    cfg = part_config(modules[part])
    if part == "unet":
        scale = _latent_scale(part_config(modules["vae"])) if "vae" in modules else 8
        full, kept = _unet_units(cfg, math.ceil(height / scale), math.ceil(width / scale))
        return 4 * (UNET_CHECKPOINTED_MEASURED_PER_COUNTED * kept if checkpointing
                    else UNET_MEASURED_PER_COUNTED * full)
    if part == "transformer":
        scale = _latent_scale(part_config(modules["vae"])) if "vae" in modules else 8
        tokens = math.ceil(height / scale / 2) * math.ceil(width / scale / 2)
        tokens += _text_tokens(config, facts.model_type)
        units, one = _transformer_units(cfg, tokens)
    else:  # a trained text encoder: its layers are transformer blocks over its tokens
        width_ = int(cfg.get("hidden_size") or cfg.get("d_model") or 768)
        layers = int(cfg.get("num_hidden_layers") or cfg.get("num_layers") or 12)
        tokens = int(cfg.get("max_position_embeddings") or 77)
        units, one = tokens * width_ * layers, tokens * width_
    if checkpointing:
        blocks = units / one
        # activation_offloading keeps the blocks' saved inputs in CPU memory: one block's
        # remains (the one being recomputed), not every block's
        saved = one if part == facts.denoiser and getattr(
            config, part).activation_offloading else units
        return TRANSFORMER_CHECKPOINTED_BYTES_PER_UNIT * saved + TRANSFORMER_BYTES_PER_UNIT * one \
            if blocks > 1 else TRANSFORMER_BYTES_PER_UNIT * units
    return TRANSFORMER_BYTES_PER_UNIT * units


def largest_size(config: TrainConfig) -> tuple[int, int]:
    """(height, width) of the resolution setting's largest entry (a step's largest batch)."""
    try:
        sizes = parse_resolution(config.resolution)
    except ValueError as error:
        raise ConfigError(f"{error}.") from None
    size = max(sizes, key=lambda s: s.width * s.height)
    return size.height, size.width


# --- The estimate -----------------------------------------------------------------------------

def _trained_parts(config: TrainConfig) -> list[str]:
    if config.training_method == TrainingMethod.EMBEDDING:
        return []
    return [p for p in registry.facts(config.model_type).parts if getattr(config, p).train]


def _offload_fraction(config: TrainConfig, part: str) -> float:
    """The share of a part's frozen weights streamed from CPU memory (the rule of
    TrainConfig.offload_fraction_of, which trainer/layer_offload.py follows)."""
    if part not in registry.facts(config.model_type).parts:
        return 0.0
    return float(config.offload_fraction_of(part))


@dataclass
class _Trained:
    """What training adds on the GPU: bytes and the trained parameter count."""
    weights: dict[str, float] = field(default_factory=dict)  # part -> its weights as trained
    adapters: float = 0.0
    gradients: float = 0.0
    state: float = 0.0
    ema: float = 0.0
    count: int = 0


def _stored(config: TrainConfig, found: ModelTensors, notes: list[str]) -> dict[str, float]:
    """Every part's weights in the dtype it is stored in (a quantized part's other tensors in
    the train dtype)."""
    rest_bytes = PLAIN_BYTES.get(dtype_name(config.train_dtype), 4)
    stored: dict[str, float] = {}
    for part in (*registry.facts(config.model_type).parts, "vae"):
        dtype = dtype_name(getattr(config, part).weight_dtype)
        tensors = found.parts.get(part, [])
        if dtype == "GGUF":  # the file's types decide (check_gguf: the transformer only)
            stored[part] = gguf_stored_bytes(tensors, rest_bytes)
            continue
        quantized = set()
        if dtype in QUANTIZED and tensors:
            quantized = quantized_names(config, part, tensors, found.modules.get(part))
        stored[part], note = stored_bytes(tensors, dtype, quantized, rest_bytes)
        if note and note[0].upper() + note[1:] + "." not in notes:
            notes.append(note[0].upper() + note[1:] + ".")
    return stored


def _trained(config: TrainConfig, found: ModelTensors, trained_parts: list[str]) -> _Trained:
    """Adapters (LoRA) or float32 master weights (fine-tune), their gradients, the optimizer's
    state and an EMA copy on the GPU, part by part."""
    from trainer.config import EMAMode
    from trainer.optim import stochastic_rounding
    out = _Trained()
    fine_tune = config.training_method == TrainingMethod.FINE_TUNE
    for part in trained_parts:
        tensors = found.parts.get(part, [])
        if fine_tune:
            master = 2 if stochastic_rounding.trains_in_place(config, part) else 4
            shapes = [t.shape for t in tensors if t.dtype in FLOAT_TYPES]
            out.weights[part] = sum(math.prod(s) for s in shapes) * master + sum(
                t.numel * SAFETENSORS_BYTES.get(t.dtype, 4) for t in tensors
                if t.dtype not in FLOAT_TYPES)
            gradient_bytes = master
        else:
            spec = found.modules.get(part)
            if spec is None:
                raise ModelLoadError(f"base_model_name: the {part}'s layers cannot be told from "
                                     "this file; give the model's diffusers folder.")
            shapes = lora_tensor_shapes(meta_module(spec), config, part)
            out.adapters += 4 * sum(math.prod(s) for s in shapes)  # kept in float32
            gradient_bytes = 4
        count = sum(math.prod(s) for s in shapes)
        out.count += count
        if fine_tune and config.fused_backward_pass:  # each gradient freed once applied
            out.gradients += max((math.prod(s) for s in shapes), default=0) * gradient_bytes
        else:
            out.gradients += count * gradient_bytes
        out.state += optimizer_state_bytes(config, shapes)
        if config.ema == EMAMode.GPU:
            out.ema += 4 * count
    return out


def _activation_parts(config: TrainConfig, trained_parts: list[str]) -> list[str]:
    """The parts whose forward keeps activations: the denoiser whenever anything learns (the
    loss reaches every trained weight through it), trained text encoders, and text encoders
    whose additional embeddings train."""
    facts = registry.facts(config.model_type)
    vectors = any(getattr(e, "train", False) for e in config.additional_embeddings)
    encoders = [p for p in facts.text_encoders if p in trained_parts or (
        vectors and getattr(getattr(config, p), "train_embedding", False))]
    if not trained_parts and not vectors:
        return []
    return [facts.denoiser, *encoders]


def estimate(config: TrainConfig, *, device_gb: float | None | str = "auto") -> MemoryEstimate:
    """The GPU memory `config`'s training needs. AtelierError (ConfigError, ModelLoadError)
    with the config's own sentence when it cannot be told (a refused setting, a missing or
    unreadable model file). `device_gb`: the GPU to compare with ("auto": this machine's)."""
    from trainer.config import check_supported
    check_supported(config)
    facts = registry.facts(config.model_type)
    found = model_tensors(config)
    notes: list[str] = [f"Weights: {found.source}."] if found.standard else []
    trained_parts = _trained_parts(config)
    stored = _stored(config, found, notes)
    trained = _trained(config, found, trained_parts)

    # The training step: which parts stay on the GPU (trainer/residency.py, loop.py).
    encoders = facts.text_encoders
    text_cached = (config.latent_caching and not config.additional_embeddings
                   and not any(getattr(config, p).train for p in encoders))
    vae_each_step = not config.latent_caching or config.model_type.is_inpainting
    on_gpu = [facts.denoiser, *(p for p in encoders if p in trained_parts or not text_cached)]
    if vae_each_step:
        on_gpu.append("vae")
    weights = trained.adapters + trained.ema
    for part in on_gpu:
        if part in trained.weights:  # a fine-tuned part: its masters, never streamed
            weights += trained.weights[part]
        else:
            weights += stored[part] * (1 - _offload_fraction(config, part))
    optimizer = trained.gradients + trained.state

    # Activations of one step at the largest size, times the batch; a VAE encoding each step
    # runs before the denoiser's forward, so the larger of the two counts.
    height, width = largest_size(config)
    half = dtype_name(config.train_dtype) in ("BFLOAT_16", "FLOAT_16")
    per_sample = copies = 0.0
    for part in _activation_parts(config, trained_parts):
        checkpointed = (config.gradient_checkpointing
                        and getattr(config, part).gradient_checkpointing)
        per_sample += activation_bytes(config, found.modules, part=part, height=height,
                                       width=width, checkpointing=checkpointed) * (
            HALF_PRECISION_SHARE["unet" if part == "unet" else "transformer"] if half else 1.0)
        if half:
            copies += autocast_copies(config, found, part, checkpointed, part in trained.weights)
    activations = per_sample * config.batch_size + copies
    encode = vae_encode_bytes(found.modules, height, width, config.batch_size, half)
    if vae_each_step:
        activations = max(activations, encode)
    phase = "training"
    phases = {phase: {"weights_gb": weights / GB, "optimizer_gb": optimizer / GB,
                      "activations_gb": activations / GB}}

    # Filling the caches first: the VAE and the text encoders, the denoiser not there yet.
    if config.latent_caching and not config.model_type.is_inpainting:
        filling = ["vae", *encoders]  # a streamed encoder streams while it fills the cache
        filling_weights = stored["vae"] + sum(
            stored[p] * (1 - _offload_fraction(config, p)) for p in encoders)
        phases["filling the caches"] = {"weights_gb": filling_weights / GB, "optimizer_gb": 0.0,
                                        "activations_gb": encode / GB}
        if filling_weights + encode > weights + optimizer + activations:
            phase, on_gpu = "filling the caches", filling
            weights, optimizer, activations = filling_weights, 0.0, encode
    if facts.flow_matching:
        notes.append("Activations: the flow transformers' constants were measured on tiny models "
                     "on a CPU; no full-size transformer has been measured yet.")
    if facts.model_type == "CHROMA_1":
        notes.append("Chroma cuts T5's padding: the full text_encoder_sequence_length is counted "
                     "(an upper figure for short captions).")
    total = (weights + optimizer + activations) / GB + OVERHEAD_GB
    return MemoryEstimate(
        weights_gb=weights / GB, optimizer_gb=optimizer / GB, activations_gb=activations / GB,
        overhead_gb=OVERHEAD_GB, total_gb=total,
        device_gb=device_memory_gb() if device_gb == "auto" else device_gb,
        parts={p: b / GB for p, b in stored.items()},
        part_bytes={p: int(b) for p, b in stored.items()}, on_gpu=on_gpu, phase=phase,
        trained_parameters=trained.count, source=found.source, notes=notes, phases=phases)


def autocast_copies(config: TrainConfig, found: ModelTensors, part: str, checkpointed: bool,
                    fine_tuned: bool) -> float:
    """Half-precision copies of float32 weights that autocast makes in the forward pass and
    that live until the backward: a frozen weight's copy is saved for its layer's backward
    (with checkpointing only the recomputed block's, left out here); a trained weight's stays in
    autocast's cache for the whole forward. 2 bytes for each element of the part's matrices and
    kernels. MEASURED on the CPU (bfloat16 autocast, tiny SD 1.5 at 256 px, no checkpointing):
    0.87 MiB more with float32 UNet weights than with bfloat16 ones, 83% of the UNet's bfloat16
    copy; bench/results-cuda-h100.json's sd15-256 rows (float32 weights, bfloat16 autocast)
    exceed the other terms by about its UNet's copy (1.6 GB)."""
    stored = dtype_name(getattr(config, part).weight_dtype)
    if not (fine_tuned or (stored in ("FLOAT_32", "TFLOAT_32") and not checkpointed)):
        return 0.0
    return 2.0 * sum(t.numel for t in found.parts.get(part, [])
                     if t.dtype in FLOAT_TYPES and len(t.shape) >= 2)


# Not measured: the VAE encoder keeps about this many full-resolution feature maps of its
# first width alive at its peak (no gradient; the encode runs before the denoiser's forward).
VAE_ENCODE_MAPS = 4


def vae_encode_bytes(modules: dict[str, Any], height: int, width: int, batch: int,
                     half: bool) -> float:
    if "vae" not in modules:
        return 0.0
    channels = list(part_config(modules["vae"]).get("block_out_channels", (128,)))[0]
    return VAE_ENCODE_MAPS * channels * height * width * batch * (2 if half else 4)


# --- Saying it ---------------------------------------------------------------------------------

def fit_sentence(result: MemoryEstimate) -> str:
    """'needs about X GB of GPU memory; this GPU has Y GB' (or that there is no GPU here)."""
    need = f"Needs about {result.total_gb:.1f} GB of GPU memory"
    if result.device_gb is None:
        return f"{need} (no GPU here: the estimate is for a GPU)."
    return f"{need}; this GPU has {result.device_gb:.1f} GB."


def breakdown(result: MemoryEstimate) -> str:
    return (f"weights {result.weights_gb:.2f} GB, gradients and optimizer state "
            f"{result.optimizer_gb:.2f} GB, activations {result.activations_gb:.2f} GB, "
            f"CUDA overhead {result.overhead_gb:.1f} GB (peak while {result.phase})")


@dataclass(frozen=True)
class Lever:
    description: str                   # "gradient checkpointing on"
    total_gb: float                    # the estimate with it


def _with(config: TrainConfig, **changes) -> TrainConfig:
    """A copy with top-level keys, or part keys as `part__key`, changed (validated)."""
    data = config.model_dump(mode="json")
    for key, value in changes.items():
        if "__" in key:
            part, name = key.split("__", 1)
            data[part][name] = value
        else:
            data[key] = value
    return TrainConfig.model_validate(data)


def candidate_levers(config: TrainConfig) -> list[tuple[str, dict]]:
    """The settings that lower the memory a run needs, as (what, config changes). A smaller
    weight dtype is offered for every part (each is on the GPU in one phase or the other) but a
    transformer read from a GGUF file, whose file decides its types."""
    from trainer.config import DataType, EMAMode, Optimizer
    facts = registry.facts(config.model_type)
    out: list[tuple[str, dict]] = []
    if not config.gradient_checkpointing:
        out.append(("gradient checkpointing on", {"gradient_checkpointing": True}))
    if config.batch_size > 1:
        out.append(("batch size 1", {"batch_size": 1}))
    height, width = largest_size(config)
    side = int(math.sqrt(height * width))
    lower = max(256, (side * 3 // 4) // 64 * 64)
    if lower < side:
        out.append((f"resolution {lower}", {"resolution": str(lower)}))
    members = {m.value for m in DataType}
    # One step down for every part, and (a LoRA) 4 bits for every part but the VAE.
    smaller = {"FLOAT_32": "BFLOAT_16", "TFLOAT_32": "BFLOAT_16", "FLOAT_16": "FLOAT_8",
               "BFLOAT_16": "FLOAT_8", "FLOAT_8": "NFLOAT_4", "INT_8": "NFLOAT_4"}
    trained = _trained_parts(config)
    candidates = [p for p in (*facts.parts, "vae") if not (
        config.training_method == TrainingMethod.FINE_TUNE and p in trained)
        and dtype_name(getattr(config, p).weight_dtype) != "GGUF"]
    steps = [{p: smaller.get(dtype_name(getattr(config, p).weight_dtype)) for p in candidates}]
    if config.training_method == TrainingMethod.LORA:
        steps.append({p: "NFLOAT_4" for p in candidates if p != "vae"})
    offered = []
    for targets in steps:
        chosen = {p: t for p, t in targets.items() if t in members
                  and t != dtype_name(getattr(config, p).weight_dtype)
                  and (p != "vae" or t in PLAIN_BYTES)}  # a VAE is not quantized
        if chosen and chosen not in offered:
            offered.append(chosen)
            out.append(("a smaller weight dtype (" + ", ".join(
                f"{p} {t}" for p, t in chosen.items()) + ")",
                {f"{p}__weight_dtype": t for p, t in chosen.items()}))
    denoiser = getattr(config, facts.denoiser)
    if facts.denoiser == "transformer" and not denoiser.activation_offloading:
        out.append(("activation offloading (with gradient checkpointing)",
                    {"transformer__activation_offloading": True,
                     "gradient_checkpointing": True}))
    fine_tuned = config.training_method == TrainingMethod.FINE_TUNE and denoiser.train
    if config.offload_fraction_of(facts.denoiser) < 0.5 and not fine_tuned:
        out.append((f"offloading ({facts.denoiser}.offload_fraction 0.5, with gradient "
                    "checkpointing)", {f"{facts.denoiser}__offload_fraction": 0.5,
                                       "gradient_checkpointing": True}))
    if config.training_method == TrainingMethod.FINE_TUNE:
        if config.optimizer.optimizer == Optimizer.ADAMW:
            section = dict(config.optimizer.model_dump(mode="json"), optimizer="ADAMW_8BIT")
            out.append(("8-bit AdamW", {"optimizer": section}))
        if not config.fused_backward_pass:
            out.append(("fused backward pass", {"fused_backward_pass": True,
                                                "clip_grad_norm": None,
                                                "gradient_accumulation_steps": 1}))
    if config.ema == EMAMode.GPU:
        out.append(("EMA on the CPU", {"ema": "CPU"}))
    if config.training_method == TrainingMethod.LORA and any(
            p in trained for p in facts.text_encoders) and facts.denoiser in trained:
        out.append(("no text encoder trained (their outputs cached, the encoders off the GPU)",
                    {f"{p}__train": False for p in facts.text_encoders}))
    return out


def levers(config: TrainConfig, result: MemoryEstimate) -> list[Lever]:
    """What each lever would bring the estimate to (only those that lower it), best first."""
    found = []
    for description, changes in candidate_levers(config):
        try:
            other = estimate(_with(config, **changes), device_gb=result.device_gb)
        except (AtelierError, ValueError):
            continue  # a lever this config cannot take (refused by the engine)
        if other.total_gb < result.total_gb - 0.005:
            found.append(Lever(description, other.total_gb))
    return sorted(found, key=lambda lever: lever.total_gb)


def warning_sentence(config: TrainConfig, result: MemoryEstimate,
                     device_gb: float | None = None) -> str | None:
    """When the estimate exceeds the GPU (`device_gb`, else the result's own): a sentence
    naming the levers that would make it fit, each with what it brings the estimate to."""
    limit = device_gb if device_gb is not None else result.device_gb
    if limit is None or result.total_gb <= limit:
        return None
    found = levers(config, result)
    if not found:
        return (f"It will not fit in {limit:.1f} GB, and no setting here lowers it: choose a "
                "smaller model or a larger GPU.")
    said = ", ".join(f"{lever.description} (→ {lever.total_gb:.1f} GB"
                     f"{', fits' if lever.total_gb <= limit else ''})" for lever in found)
    text = f"It will not fit in {limit:.1f} GB. Levers that lower it: {said}."
    if len(found) > 1 and all(lever.total_gb > limit for lever in found):
        together = combined(config, result)
        if together is not None:
            text += (f" All of them together: {together:.1f} GB"
                     + (", which fits." if together <= limit else "; still too much: choose a "
                        "smaller model or a larger GPU."))
    return text


def combined(config: TrainConfig, result: MemoryEstimate) -> float | None:
    """The estimate with every lever that lowers it applied at once; a lever the others
    exclude (NFLOAT_4 weights are not streamed, say) is left out (None: none applies)."""
    changes: dict[str, Any] = {}
    total = None
    for _, change in candidate_levers(config):
        try:
            total = estimate(_with(config, **{**changes, **change}),
                             device_gb=result.device_gb).total_gb
        except (AtelierError, ValueError):
            continue
        changes.update(change)
    return total if changes else None
