"""Quantized frozen weights, OneTrainer's `<part>.weight_dtype` FLOAT_8, INT_8 and NFLOAT_4: a
part's linear layers store their frozen weights in 8 or 4 bits, and a LoRA (DoRA; LoHa and LoKr
on FLOAT_8 and INT_8) trains on top of them through peft, as QLoRA does. The saved file is the
one an unquantized run writes (float32 adapters), and loads on the full-precision model.

- FLOAT_8: `Float8Linear` keeps float8 e4m3 codes with one float32 scale per output row. The
  forward pass dequantizes one layer at a time into the compute dtype, and its backward pass
  dequantizes again instead of keeping the dequantized weight: the whole model's weight is
  never held at full precision. Any code that reads a Linear's `.weight` (peft's DoRA, the
  DoRA scale of a LoRA file) gets the dequantized values.
- INT_8 / NFLOAT_4: bitsandbytes' `Linear8bitLt` (row-wise int8) and `Linear4bit` with
  quant_type "nf4" and double quantization, the layers QLoRA uses; the part is flagged as peft
  expects (`is_loaded_in_8bit` / `is_loaded_in_4bit`) so that peft wraps them in its own
  bitsandbytes LoRA layers.

Which layers (OneTrainer's rules, modules/util/quantization_util.py): every `torch.nn.Linear` of
a quantized part except those its class keeps in float32 (`_keep_in_fp32_modules`: T5's `wo`).
In the denoiser (UNet / transformer) only the layers that `quantization.layer_filter_preset`
picks (the family's LAYER_PRESETS, the same presets as the LoRA's) or, for `custom`,
`quantization.layer_filter` (`layer_filter_regex`); the text encoders and the VAE have no
filter. Convolutions, norms and embeddings are never quantized. As in OneTrainer, a linear layer
that sits directly in a ModuleList / Sequential (`attn.to_out.0`) is matched by its
container's name (`attn.to_out`).

Everything else of a quantized part (norms, embeddings, convolutions, biases, the layers left
out) is stored in the train dtype (`train_dtype`), as OneTrainer stores it; the quantized
layers compute in that type too.

What cannot work is refused by trainer/config.py's check_quantization (a fine-tuned quantized
part; where Atelier would read bitsandbytes' packed weights back as plain ones: DoRA scales in
kohya-layout files, LoHa / LoKr or Flux's fused kohya names on NF4, layer streaming), and by
`check_device` where bitsandbytes does not run. A quantized part is written to a disk cache
once (trainer/quantized_cache.py) and the next run reads it there instead of the full-precision
files: it reads a quarter (NF4) or half (8 bits) of the bytes and quantizes nothing (measured on
this machine's 2 CPU cores: quantizing costs 4.6 ms per million parameters for FLOAT_8, 6.5 for
INT_8, 18 for NFLOAT_4).
"""
from __future__ import annotations

import functools
import re
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from trainer.config import DataType, LoraLayerPreset, TrainConfig
from trainer.errors import ConfigError
from trainer.models import registry

QUANTIZED = (DataType.FLOAT_8, DataType.INT_8, DataType.NFLOAT_4)
# Read quantized from the model's file (the transformer's GGUF): stored quantized, never
# quantized here.
PREQUANTIZED = (DataType.GGUF,)
# The types bitsandbytes stores (the rest of QUANTIZED, FLOAT_8, is plain torch).
BITSANDBYTES = (DataType.INT_8, DataType.NFLOAT_4)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
COMPUTE_DTYPES = {DataType.FLOAT_32: torch.float32, DataType.TFLOAT_32: torch.float32,
                  DataType.BFLOAT_16: torch.bfloat16, DataType.FLOAT_16: torch.float16}
CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def is_quantized(dtype: Any) -> bool:
    """Whether a weight type (DataType or its value) stores weights quantized (here or in the
    model's file)."""
    return str(getattr(dtype, "value", dtype)) in {d.value for d in (*QUANTIZED, *PREQUANTIZED)}


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """The torch type of the train dtype: what quantized layers compute in, and what the rest
    of a quantized part is stored in."""
    return COMPUTE_DTYPES[config.train_dtype]


# --- FLOAT_8 --------------------------------------------------------------------------------

def dequantize_float8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight that float8 codes (stored as uint8) and their row scales stand for."""
    return codes.view(FP8).to(dtype) * scale.to(dtype).unsqueeze(1)


class _Float8Matmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized here, and again in the backward pass: autograd keeps the
    8-bit codes, not the dequantized weight of every layer until backward."""

    @staticmethod
    def forward(ctx, x, codes, scale, bias):
        ctx.save_for_backward(codes, scale)
        return F.linear(x, dequantize_float8(codes, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        codes, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(dequantize_float8(codes, scale, grad.dtype))
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


class Float8Linear(torch.nn.Linear):
    """A frozen linear layer stored as float8 e4m3 codes with a float32 scale per output row.

    The codes are the layer's `weight` parameter in the state dict (uint8 bits, shape (out, in)
    like the float weight, so names and shapes read from a state dict stay a Linear's; uint8
    because every `.to(dtype)` of the part leaves integer tensors alone). Attribute access
    `.weight` returns the dequantized weight in `compute_dtype` instead (for peft's DoRA and
    LoRA-file writers); the forward pass does not use it.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = codes.shape
        self.compute_dtype = compute_dtype  # peft reads it for its adapters' dtype too
        # the bias first: families and pipelines read a part's compute dtype from its first
        # parameter (next(module.parameters()).dtype), which must not be the uint8 codes
        self.register_parameter(
            "bias", None if bias is None else torch.nn.Parameter(bias, requires_grad=False))
        # set directly: the `weight` property below makes Module refuse the name otherwise
        self._parameters["weight"] = torch.nn.Parameter(codes.view(torch.uint8),
                                                        requires_grad=False)
        self.register_buffer("weight_scale", scale.float())

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, compute_dtype: torch.dtype,
                    device: torch.device | None = None) -> "Float8Linear":
        """`linear` quantized (on `device`, then back where its weight was): each row scaled so
        its largest magnitude is float8's largest value, 448, then rounded to nearest."""
        weight = linear.weight.detach()
        home = weight.device
        weight = weight.to(device or home, torch.float32)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        codes = (weight / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(codes.to(home), scale.to(home), bias, compute_dtype)

    @property
    def codes(self) -> torch.Tensor:
        return self._parameters["weight"]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.dequantized(self.compute_dtype)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_float8(self.codes, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        # under autocast, compute in its type, as F.linear would
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return _Float8Matmul.apply(x.to(dtype), self.codes, self.weight_scale, bias)

    def _apply(self, fn, recurse=True):
        # the scales stay float32 when the part is cast to the train dtype (they are tiny);
        # the codes are uint8, which no dtype cast touches
        scale = self._buffers["weight_scale"]
        super()._apply(fn, recurse)
        moved = self._buffers["weight_scale"]
        if moved.dtype != scale.dtype:
            self._buffers["weight_scale"] = scale.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, float8_e4m3 codes, row scales")


# --- GGUF (read packed from the file by diffusers) ----------------------------------------------

def _dequantize_gguf(packed: torch.Tensor, quant_type, dtype: torch.dtype) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor
    # the type given apart: a tensor autograd saved may come back without the parameter's class
    return dequantize_gguf_tensor(GGUFParameter(packed, quant_type=quant_type)).to(dtype)


class _GGUFMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized from its GGUF blocks here, and again in the backward
    pass. diffusers' own layer hands F.linear the dequantized weight, which autograd then keeps
    until the backward pass for every layer: the whole transformer at the train dtype, beside
    the packed one, without gradient checkpointing."""

    @staticmethod
    def forward(ctx, x, packed, bias, quant_type):
        ctx.save_for_backward(packed)
        ctx.quant_type = quant_type
        return F.linear(x, _dequantize_gguf(packed, quant_type, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(_dequantize_gguf(packed, ctx.quant_type, grad.dtype))
        if ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


def is_gguf_layer(layer: torch.nn.Module) -> bool:
    """Whether `layer` is one of diffusers' GGUF layers (its weight packed as the file stores
    it; `in_features` / `out_features` give its shape)."""
    from diffusers.quantizers.gguf.utils import GGUFLinear
    return isinstance(layer, GGUFLinear)


def prepare_gguf_transformer(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """A transformer diffusers read from a GGUF file, made fit to train on: each GGUF layer
    computes through `_GGUFMatmul` (the same output: F.linear of the same dequantized weight),
    and any other tensor the file stores packed (a BF16 positional embedding or bias, which
    diffusers leaves as packed bytes where no GGUF layer reads them) is dequantized into
    `dtype`, the train dtype its neighbours were loaded in."""
    from diffusers.quantizers.gguf.utils import GGUFLinear
    for sub in module.modules():
        gguf_layer = type(sub) is GGUFLinear
        if gguf_layer:  # the layer and its weight stay; only its forward pass changes
            sub.__class__ = _recomputing_gguf_linear()
        for name, tensor in list(sub._parameters.items()):
            if tensor is not None and hasattr(tensor, "quant_type") and not (
                    gguf_layer and name == "weight"):
                sub._parameters[name] = torch.nn.Parameter(
                    _dequantize_gguf(tensor, tensor.quant_type, dtype), requires_grad=False)
        for name, tensor in list(sub._buffers.items()):
            if tensor is not None and hasattr(tensor, "quant_type"):
                sub._buffers[name] = _dequantize_gguf(tensor, tensor.quant_type, dtype)


@functools.cache
def _recomputing_gguf_linear() -> type:
    from diffusers.quantizers.gguf.utils import GGUFLinear

    class RecomputingGGUFLinear(GGUFLinear):
        """diffusers' GGUFLinear whose weight is dequantized again for the backward pass."""

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            device = inputs.device.type
            dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else self.compute_dtype or inputs.dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return _GGUFMatmul.apply(inputs.to(dtype), self.weight, bias,
                                         self.weight.quant_type)
    return RecomputingGGUFLinear


# --- INT_8 / NFLOAT_4 (bitsandbytes) --------------------------------------------------------

@functools.cache
def _bitsandbytes_layers():
    """bitsandbytes' layers with the fixes Atelier needs (built on first use: importing
    bitsandbytes is slow)."""
    import bitsandbytes as bnb

    class Int8Linear(bnb.nn.Linear8bitLt):
        """bitsandbytes' 8-bit layer. On the CPU, peft's DoRA replaces the weight parameter each
        time it dequantizes it (peft.utils.integrations.dequantize_module_weight), and the new
        one has lost its row scales (SCB) while the layer's state still holds them: the next
        forward pass would take the missing ones. Keep the state's."""

        def init_8bit_state(self):
            scales = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
            super().init_8bit_state()
            self.state.SCB = scales

        def _apply(self, fn, recurse=True):
            # The int8 weight and its row scales are read from the weight's CB / SCB before
            # the first forward pass and from the layer's state after it; a move of the whole
            # part (`part.to(device)` calls this, not the layer's own `to`) gives the weight new
            # storage and would leave both behind (CB on the device it was quantized on, or on
            # the CPU for a part read from the quantized cache): they follow the weight.
            super()._apply(fn, recurse)
            weight = self._parameters["weight"]
            if getattr(weight, "CB", None) is not None:
                weight.CB = weight.data
            if getattr(weight, "SCB", None) is not None:
                weight.SCB = weight.SCB.to(weight.device)
            if self.state.CB is not None:
                self.state.CB = weight.data
            if self.state.SCB is not None:
                self.state.SCB = self.state.SCB.to(weight.device)
            return self

    class NF4Linear(bnb.nn.Linear4bit):
        """bitsandbytes' 4-bit layer. On a CPU with AVX512-BF16 its first forward pass in eval
        mode without gradients repacks the weight for a CPU kernel, in place, and asserts that
        the output size is a multiple of 32: one layout for every pass and every size here."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.support_avx512bf16_for_cpu = False

    return bnb, Int8Linear, NF4Linear


def _bias_first(layer: torch.nn.Module) -> torch.nn.Module:
    """The bias before the packed weight in the parameter order (see Float8Linear)."""
    if layer._parameters.get("bias") is not None:
        layer._parameters = {"bias": layer._parameters["bias"],
                             **{k: v for k, v in layer._parameters.items() if k != "bias"}}
    return layer


def int8_linear(linear: torch.nn.Linear, device: torch.device | None = None) -> torch.nn.Module:
    """`linear` as bitsandbytes' 8-bit layer (row-wise int8 with float scales, no outlier
    threshold: OneTrainer's Linear8bitLt(has_fp16_weights=False)), quantized on `device`."""
    bnb, Int8Linear, _ = _bitsandbytes_layers()
    weight = linear.weight.detach()
    home = weight.device
    layer = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       has_fp16_weights=False, device="meta")
    layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False,
                                     has_fp16_weights=False)
    layer.weight = layer.weight.to(device or home)  # quantizes
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
    return _bias_first(layer.to(home))


def nf4_linear(linear: torch.nn.Linear, dtype: torch.dtype,
               device: torch.device | None = None) -> torch.nn.Module:
    """`linear` as bitsandbytes' NF4 layer (blocks of 64, double quantization: QLoRA's),
    computing in `dtype`, quantized on `device`."""
    bnb, _, NF4Linear = _bitsandbytes_layers()
    weight = linear.weight.detach()
    home = weight.device
    layer = NF4Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      compute_dtype=dtype, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, module=layer)
    layer.weight = layer.weight.to(device or home)  # quantizes
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
    return _bias_first(layer.to(home))


@functools.cache
def bitsandbytes_runs(dtype_value: str, device_type: str) -> bool:
    """Whether bitsandbytes' layer for INT_8 / NFLOAT_4 runs on this kind of device: a small
    layer quantized there, a forward pass without gradients, and a forward and backward pass
    through a trainable input (what a LoRA on top of it needs). Tried once per process."""
    try:
        device = torch.device(device_type)
        torch.manual_seed(0)
        linear = torch.nn.Linear(64, 32)
        layer = (int8_linear(linear, device) if dtype_value == "INT_8"
                 else nf4_linear(linear, torch.float32, device)).to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        with warnings.catch_warnings():  # its note that float32 inputs are cast to float16
            warnings.simplefilter("ignore")
            with torch.no_grad():
                layer.eval()(x)
            layer.train()(x).square().sum().backward()
        return bool(torch.isfinite(x.grad).all())
    except Exception:  # noqa: BLE001 - any failure means: not on this device
        return False


# --- Which layers ---------------------------------------------------------------------------

def quantization_patterns(config: TrainConfig) -> tuple[list[str], bool]:
    """(the denoiser's layer-name patterns to quantize, whether they are regular expressions):
    the family's preset, or for `custom` the config's filter (OneTrainer: an empty filter, or an
    empty entry, quantizes every linear layer)."""
    settings = config.quantization
    if settings.layer_filter_preset == LoraLayerPreset.CUSTOM:
        patterns = [p.strip() for p in settings.layer_filter.split(",")]
        return patterns, settings.layer_filter_regex
    presets = registry.family_class(config.model_type).LAYER_PRESETS
    preset = settings.layer_filter_preset.value
    if preset not in presets:
        raise ConfigError(f"quantization.layer_filter_preset = {preset} is not a layer preset of "
                          f"{registry.facts(config.model_type).label}; it has "
                          f"{', '.join(presets)} (or custom).")
    return list(presets[preset]), False


def _matcher(pattern: str, regex: bool):
    if not pattern:
        return lambda name: True
    if regex:
        compiled = re.compile(pattern)
        return lambda name: compiled.search(name) is not None
    return lambda name: pattern in name


def layers_to_quantize(module: torch.nn.Module, patterns: list[str] | None = None,
                       regex: bool = False, *, part: str = "") -> list[str]:
    """The names of `module`'s linear layers that a quantized part stores quantized: not kept
    in float32 by the module's class, and, with `patterns` (the denoiser's), matched by one of
    them (a layer directly in a container by the container's name, as OneTrainer matches). A
    pattern that matches no linear layer is refused: a typo would silently quantize less."""
    keep = set(getattr(type(module), "_keep_in_fp32_modules", None) or ())
    # no patterns (the `full` preset): every linear layer
    matchers = [(p, _matcher(p, regex)) for p in patterns] if patterns else None
    used: set[str] = set()
    names = []
    for name, layer in module.named_modules():
        if not isinstance(layer, torch.nn.Linear) or keep & set(name.split(".")):
            continue
        if matchers is None:
            names.append(name)
            continue
        parent_name = name.rpartition(".")[0]
        parent = module.get_submodule(parent_name) if parent_name else module
        matched = parent_name if isinstance(parent, CONTAINERS) else name
        hits = [p for p, matches in matchers if matches(matched)]
        used.update(hits)
        if hits:
            names.append(name)
    unused = [p for p in patterns or () if p not in used]
    if unused:
        raise ConfigError("quantization.layer_filter: " + ", ".join(repr(p) for p in unused)
                          + f" matched no linear layer of the {part or 'model'} (a layer in a "
                          "list, attn.to_out.0, goes by the list's name, attn.to_out, as in "
                          "OneTrainer).")
    return names


# --- The parts ------------------------------------------------------------------------------

def quantized_layer(linear: torch.nn.Linear, dtype: DataType, compute: torch.dtype,
                    device: torch.device | None = None) -> torch.nn.Module:
    if dtype == DataType.FLOAT_8:
        return Float8Linear.from_linear(linear, compute, device)
    if dtype == DataType.INT_8:
        return int8_linear(linear, device)
    return nf4_linear(linear, compute, device)


def stored_bytes(module: torch.nn.Module) -> int:
    """The bytes `module`'s weights take as stored: its parameters and buffers, and the
    statistics bitsandbytes keeps beside its packed weights (NF4's block scales, int8's row
    scales)."""
    total = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    for layer in module.modules():
        weight = layer._parameters.get("weight")
        state = getattr(weight, "quant_state", None)
        if state is not None:  # NF4
            extra = [state.absmax, state.code]
            if state.nested:
                extra += [state.offset, state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in extra)
        scales = getattr(weight, "SCB", None)  # int8: on the weight, or in the layer's state
        if scales is None:
            scales = getattr(getattr(layer, "state", None), "SCB", None)
        if isinstance(scales, torch.Tensor):
            total += scales.numel() * scales.element_size()
    return total


def quantized_parts(config: TrainConfig) -> list[str]:
    """The family's parts (and the VAE) that Atelier quantizes (FLOAT_8, INT_8, NFLOAT_4)."""
    parts = (*registry.facts(config.model_type).parts, "vae")
    return [p for p in parts if getattr(config, p).weight_dtype in QUANTIZED]


def check_device(config: TrainConfig, device: torch.device) -> None:
    """Refuse the bitsandbytes types where bitsandbytes does not run (tried on a small layer);
    FLOAT_8 is plain torch and runs everywhere."""
    for part in quantized_parts(config):
        dtype = getattr(config, part).weight_dtype
        if dtype in BITSANDBYTES and not bitsandbytes_runs(dtype.value, device.type):
            bits = "8-bit" if dtype == DataType.INT_8 else "4-bit NF4"
            raise ConfigError(
                f"{part}.weight_dtype = {dtype.value}: bitsandbytes' {bits} layers do not run "
                f"on this machine's {device.type} (a small test layer failed); choose FLOAT_8, "
                "which runs on every device, or BFLOAT_16.")


def quantize_part(module: torch.nn.Module, names: list[str], dtype: DataType,
                  compute: torch.dtype, device: torch.device | None = None) -> None:
    """Replace the named linear layers of `module` by their quantized form, one at a time (the
    full-precision layer is freed as it goes)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        original = getattr(parent, child)
        # in the mode of the layer it replaces: a frozen part stays in eval mode (bitsandbytes'
        # int8 layer computes differently in training mode)
        layer = quantized_layer(original, dtype, compute, device).train(original.training)
        setattr(parent, child, layer)
    flag_quantized(module, dtype)


def flag_quantized(module: torch.nn.Module, dtype: DataType) -> None:
    """peft wraps bitsandbytes layers in its own LoRA layers only in a model flagged so."""
    if dtype == DataType.INT_8:
        module.is_loaded_in_8bit = True
    elif dtype == DataType.NFLOAT_4:
        module.is_loaded_in_4bit = True


def prequantized_line(module: torch.nn.Module, part: str) -> str:
    """What a part read quantized from its file (GGUF) holds: its packed layers by type."""
    from collections import Counter
    kinds = Counter(getattr(getattr(layer, "weight", None), "quant_type", None)
                    for layer in module.modules() if is_gguf_layer(layer))
    kinds.pop(None, None)
    names = ", ".join(f"{count} {getattr(kind, 'name', kind)}"
                      for kind, count in sorted(kinds.items(), key=lambda item: -item[1]))
    return (f"Read the {part} pre-quantized from its GGUF file: {sum(kinds.values())} linear "
            f"layers packed ({names or 'none'}), dequantized one layer at a time")


def quantize_frozen_parts(family, config: TrainConfig, device: torch.device,
                          write_cache: bool = True) -> list[str]:
    """Store the frozen weights of every part whose weight_dtype is FLOAT_8, INT_8 or NFLOAT_4
    quantized (before adapters are added; the layers are quantized on `device` and left where
    the part is), and write each to the quantized cache for the next run (`write_cache`: the
    main process). A part the loader read from that cache is quantized already. Returns one
    line per part for the status."""
    check_device(config, device)
    lines = [prequantized_line(family.parts[part], part) for part in family.parts
             if getattr(config, part).weight_dtype in PREQUANTIZED]
    from trainer.models.family import is_read_later
    for part in quantized_parts(config):
        module = family.vae if part == "vae" else family.parts[part]
        if is_read_later(module):  # quantized when it is read (trainer/placement.py)
            continue
        lines += quantize_frozen_part(module, part, config, device, denoiser=family.denoiser,
                                      write_cache=write_cache)
    return lines


def quantize_frozen_part(module: torch.nn.Module, part: str, config: TrainConfig,
                         device: torch.device, *, denoiser: str,
                         write_cache: bool = True) -> list[str]:
    """`quantize_frozen_parts` for one part (`module`, whose weight_dtype quantizes); also for
    a text encoder read again from its files (trainer/residency.py)."""
    from trainer import quantized_cache
    dtype = getattr(config, part).weight_dtype
    if (line := getattr(module, quantized_cache.FROM_CACHE, None)) is not None:
        return [line]
    if part == denoiser:
        patterns, regex = quantization_patterns(config)
        names = layers_to_quantize(module, patterns, regex, part=part)
    else:
        names = layers_to_quantize(module, part=part)
    quantize_part(module, names, dtype, compute_dtype(config), device)
    lines = [f"Stored {len(names)} linear layers of the {part} as {dtype.value} (the rest of "
             f"it in {config.train_dtype.value})"]
    if (write_cache and part != "vae" and config.base_model_name
            and quantized_cache.writes_enabled()):
        if (line := quantized_cache.store(config, part, module, names, dtype)) is not None:
            lines.append(line)
    return lines
