"""Quantized frozen weights (trainer/quantization.py): FLOAT_8 layers compute exactly what their
stored codes say and never keep the dequantized weight for backward; LoRA and DoRA train on them
through peft; bitsandbytes' INT_8 and NFLOAT_4 layers train where bitsandbytes runs (this CPU:
both) and are refused where it does not; the filter picks the layers OneTrainer picks; tiny Flux
and SD 1.5 LoRAs trained on quantized weights write the usual files, which load on the
full-precision base; what cannot work is refused naming the key; OneTrainer's quantized presets
import."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import T5EncoderModel

from trainer import quantization as q
from trainer.config import DataType, check_supported, config_from_dict
from trainer.control import Control
from trainer.errors import ConfigError
from trainer.loop import train, weight_dtypes

from flow_family_checks import assert_flux_lora_draws_its_sample_on_the_full_base
from helpers import read_metrics, tiny_config
from onetrainer_files import raw

SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}


def linear(i=64, o=48, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o)


class Holder(torch.nn.Module):
    """One layer in a model, as peft wants a model."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


# --- FLOAT_8 --------------------------------------------------------------------------------

def test_float8_output_is_exactly_its_dequantized_weights_and_near_full_precision():
    full = linear()
    layer = q.Float8Linear.from_linear(full, torch.float32)
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    # the reference dequantizes the stored codes and row scales by hand
    weight = layer.codes.view(torch.float8_e4m3fn).float() * layer.weight_scale[:, None]
    reference = torch.nn.functional.linear(x, weight, layer.bias)
    assert torch.equal(y, reference)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
    assert torch.equal(grad, grad_reference)
    # float8 e4m3 keeps 3 mantissa bits: each weight within 1/16 of its row's scale
    assert torch.allclose(weight, full.weight, rtol=0.0625, atol=1e-3)
    error = (y - full(x)).abs().max() / full(x).abs().max()
    assert 0 < error < 0.05


def test_float8_backward_keeps_the_codes_not_a_dequantized_weight():
    layer = q.Float8Linear.from_linear(linear(256, 128), torch.float32)
    kept = []
    x = torch.randn(3, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    shapes = {(tuple(t.shape), t.dtype) for t in kept}
    assert ((128, 256), torch.uint8) in shapes  # the codes
    assert not any(shape == (128, 256) and dtype.is_floating_point for shape, dtype in shapes)


def test_float8_storage_survives_the_parts_casts_and_reads_as_a_linear():
    layer = q.Float8Linear.from_linear(linear(), torch.bfloat16)
    codes = layer.codes.clone()
    layer.to("cpu", torch.bfloat16)
    assert torch.equal(layer.codes, codes) and layer.codes.dtype == torch.uint8
    assert layer.weight_scale.dtype == torch.float32 and layer.bias.dtype == torch.bfloat16
    # a Linear's names and shapes; `.weight` is the dequantized weight in the compute dtype
    state = layer.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "bias": (48,), "weight": (48, 64), "weight_scale": (48,)}
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.shape == (48, 64)
    assert next(layer.parameters()).dtype == torch.bfloat16  # the bias, not the codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 64)).dtype == torch.bfloat16


def test_float8_under_gradient_checkpointing_gives_the_same_gradients():
    layer = q.Float8Linear.from_linear(linear(), torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    (plain,) = torch.autograd.grad(layer(x).square().sum(), x)
    out = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    (checkpointed,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.equal(plain, checkpointed)


def train_adapter(layer, *, dora: bool, flags: dict | None = None, steps: int = 15):
    """A LoRA (DoRA) on one quantized layer fitted to a fixed target: (peft model, losses)."""
    holder = Holder(layer)
    for key, value in (flags or {}).items():
        setattr(holder, key, value)
    model = get_peft_model(holder, LoraConfig(r=4, lora_alpha=4, target_modules=["layer"],
                                              init_lora_weights="gaussian", use_dora=dora))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # as trainer/lora.py keeps them
    optimizer = torch.optim.Adam(params, lr=3e-2)
    torch.manual_seed(1)
    x, target = torch.randn(8, 64), torch.randn(8, 48)
    losses = []
    for _ in range(steps):
        loss = (model(x) - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_and_dora_train_on_float8_layers(dora):
    layer = q.Float8Linear.from_linear(linear(), torch.float32)
    codes = layer.codes.clone()
    model, losses = train_adapter(layer, dora=dora)
    assert losses[-1] < 0.7 * losses[0], losses
    wrapped = model.base_model.model.layer
    assert wrapped.get_base_layer() is layer and torch.equal(layer.codes, codes)  # frozen
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora" in n)
    if dora:  # DoRA's norms are the dequantized weight's (peft reads `.weight`)
        start = get_peft_model(Holder(q.Float8Linear.from_linear(linear(), torch.float32)),
                               LoraConfig(r=4, target_modules=["layer"], use_dora=True))
        magnitude = start.base_model.model.layer.lora_magnitude_vector["default"].weight
        assert torch.allclose(magnitude, layer.dequantized(torch.float32).norm(dim=1))


# --- bitsandbytes on this CPU -----------------------------------------------------------------

BNB = {"INT_8": ("Linear8bitLt", {"is_loaded_in_8bit": True}),
       "NFLOAT_4": ("Linear4bit", {"is_loaded_in_4bit": True})}


@pytest.mark.parametrize("dtype", ["INT_8", "NFLOAT_4"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_bitsandbytes_layers_train_a_lora_where_bitsandbytes_runs(dtype, dora):
    """What bitsandbytes 0.50.2 runs on this CPU: both layers, forward and backward, under
    peft's own bitsandbytes LoRA layers (DoRA too: on the CPU the 8-bit layer keeps its row
    scales through peft's DoRA only with Atelier's fix)."""
    if not q.bitsandbytes_runs(dtype, "cpu"):
        with pytest.raises(ConfigError, match=f"weight_dtype = {dtype}: bitsandbytes"):
            q.check_device(flux_config_data(dtype), torch.device("cpu"))
        return
    layer = (q.int8_linear(linear()) if dtype == "INT_8"
             else q.nf4_linear(linear(), torch.float32))
    peft_class, flags = BNB[dtype]
    model, losses = train_adapter(layer, dora=dora, flags=flags)
    wrapped = model.base_model.model.layer
    assert type(wrapped).__module__ == "peft.tuners.lora.bnb"
    assert type(wrapped).__name__ == peft_class
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():  # eval without gradients: bitsandbytes' CPU repacking stays off
        model.eval()(torch.randn(2, 64))


def test_the_int8_layers_state_follows_a_move_of_its_part():
    """After a forward pass bitsandbytes reads the int8 weight and its scales from the layer's
    state; moving the part (residency parks frozen encoders on the CPU and brings them back)
    gives the weight new storage, and the state follows it (a copy stands in for the move)."""
    layer = q.int8_linear(linear())
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = Holder(layer)(x)
    assert layer.state.CB is not None and layer.state.SCB is not None
    old = layer.weight.data_ptr()
    Holder(layer)._apply(lambda t: t.clone())
    assert layer.weight.data_ptr() != old
    assert layer.state.CB.data_ptr() == layer.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(Holder(layer)(x), before)


def test_the_int8_weights_codes_follow_a_move_before_the_first_pass():
    """Before its first pass the layer reads the codes from the weight's CB: a move of the part
    (a copy stands in for it) must carry them along, or a part quantized on the GPU keeps a
    second copy there and one read from the quantized cache computes with CPU codes."""
    layer = q.int8_linear(linear())
    x = torch.randn(2, 64)
    with torch.no_grad():
        reference = q.int8_linear(linear())(x)
    Holder(layer)._apply(lambda t: t.clone())
    assert layer.weight.CB.data_ptr() == layer.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(Holder(layer)(x), reference)


@pytest.mark.parametrize("family", ["flux", "chroma", "sd3", "sd15"])
@pytest.mark.parametrize("dtype", [DataType.FLOAT_8, DataType.NFLOAT_4])
def test_a_quantized_denoiser_still_reads_its_compute_dtype_first(family, dtype, request):
    """The families and the sampler take a part's compute dtype from its first parameter: a
    quantized layer puts its bias before its codes, so that stays the train dtype."""
    if family == "sd15":
        model = UNet2DConditionModel.from_pretrained(request.getfixturevalue("tiny_sd15_dir"),
                                                     subfolder="unet")
    else:
        from trainer.models.tiny_flow import tiny_flow_model
        folder = tiny_flow_model(family)
        cls = {"flux": FluxTransformer2DModel}.get(family)
        if cls is None:
            import diffusers
            cls = getattr(diffusers, {"chroma": "ChromaTransformer2DModel",
                                      "sd3": "SD3Transformer2DModel"}[family])
        from trainer.models.chroma import quiet_pos_embed_warning
        with quiet_pos_embed_warning():
            model = cls.from_pretrained(folder, subfolder="transformer")
    model.to(torch.bfloat16)
    q.quantize_part(model, q.layers_to_quantize(model), dtype, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def flux_config_data(dtype):
    return config_from_dict({"model_type": "FLUX_DEV_1", "train_dtype": "FLOAT_32",
                             "transformer": {"weight_dtype": dtype},
                             "concepts": [{"path": "images"}]})


def test_where_bitsandbytes_does_not_run_the_part_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(q, "bitsandbytes_runs", lambda dtype, device: False)
    with pytest.raises(ConfigError) as error:
        q.check_device(flux_config_data("NFLOAT_4"), torch.device("cpu"))
    assert str(error.value) == (
        "transformer.weight_dtype = NFLOAT_4: bitsandbytes' 4-bit NF4 layers do not run on "
        "this machine's cpu (a small test layer failed); choose FLOAT_8, which runs on every "
        "device, or BFLOAT_16.")
    q.check_device(flux_config_data("FLOAT_8"), torch.device("cpu"))  # plain torch


# --- Which layers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux_transformer(tiny_flux_dir):
    return FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")


# Checked against OneTrainer's own replace_linear_with_quantized_layers on these tiny models
# (its code, not a copy): the same layers for each filter.
FLUX_EMBEDDERS = {"time_text_embed.timestep_embedder.linear_1",
                  "time_text_embed.timestep_embedder.linear_2",
                  "time_text_embed.guidance_embedder.linear_1",
                  "time_text_embed.guidance_embedder.linear_2",
                  "time_text_embed.text_embedder.linear_1",
                  "time_text_embed.text_embedder.linear_2", "context_embedder", "x_embedder",
                  "norm_out.linear", "proj_out"}


@pytest.mark.parametrize("patterns, regex, count", [
    ([], False, 50),                                   # full: every linear layer
    (["transformer_block"], False, 40),                # blocks: all but the embedders / final
    (["attn"], False, 22),                             # attn-only (to_out.0 by attn.to_out)
    (["attn", "ff.net", "proj_mlp"], False, 28),       # attn-mlp
    ([r"to_out$"], True, 2),                           # the container rule
    ([r"transformer_blocks\.0\."], True, 20),          # double and single block 0
])
def test_the_filter_picks_the_layers_onetrainer_picks(flux_transformer, patterns, regex, count):
    names = q.layers_to_quantize(flux_transformer, patterns, regex)
    assert len(names) == count
    if patterns == ["transformer_block"]:
        every = q.layers_to_quantize(flux_transformer)
        assert set(every) - set(names) == FLUX_EMBEDDERS
    if patterns == [r"to_out$"]:
        assert names == ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.attn.to_out.0"]


def test_a_filter_entry_that_matches_nothing_is_refused(flux_transformer):
    with pytest.raises(ConfigError) as error:
        q.layers_to_quantize(flux_transformer, ["attn", "to_out.0"], part="transformer")
    assert str(error.value).startswith("quantization.layer_filter: 'to_out.0' matched no linear "
                                       "layer of the transformer (a layer in a list")


def test_a_quantized_part_keeps_norms_embeddings_convs_and_t5_wo_full(tiny_flux_dir,
                                                                       tiny_sd15_dir):
    t5 = T5EncoderModel.from_pretrained(tiny_flux_dir, subfolder="text_encoder_2")
    names = q.layers_to_quantize(t5)
    linears = [n for n, m in t5.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(linears) - set(names) == {n for n in linears if n.endswith(".wo")} != set()
    weighted = {n: type(m) for n, m in t5.named_modules() if list(m.parameters(recurse=False))}
    q.quantize_part(t5, names, DataType.FLOAT_8, torch.float32)
    for name, kind in weighted.items():
        now = type(t5.get_submodule(name))
        assert now is (q.Float8Linear if name in names else kind), name  # embeddings, norms
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    convs = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    q.quantize_part(unet, q.layers_to_quantize(unet), DataType.FLOAT_8, torch.float32)
    assert {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)} == convs
    assert not any(type(m) is torch.nn.Linear for m in unet.modules())


def test_stored_bytes_of_the_tiny_flux_transformer_per_type(flux_transformer):
    """The weights of the tiny transformer (132k parameters, 129k of them in its 50 linear
    layers) as each type stores them, the rest in bfloat16. Its layers are 16-256 wide, so
    scales and NF4's per-layer tables weigh a lot; a 1024 x 4096 layer shows the real ratios."""
    sizes = {"FLOAT_32": q.stored_bytes(flux_transformer),
             "BFLOAT_16": q.stored_bytes(copy.deepcopy(flux_transformer).to(torch.bfloat16))}
    for dtype in (DataType.FLOAT_8, DataType.INT_8, DataType.NFLOAT_4):
        model = copy.deepcopy(flux_transformer).to(torch.bfloat16)
        q.quantize_part(model, q.layers_to_quantize(model), dtype, torch.bfloat16)
        sizes[dtype.value] = q.stored_bytes(model)
    assert sizes == {"FLOAT_32": 528_704, "BFLOAT_16": 264_352, "FLOAT_8": 147_168,
                     "INT_8": 147_168, "NFLOAT_4": 127_632}
    layer = linear(1024, 4096)
    bf16 = q.stored_bytes(copy.deepcopy(layer).to(torch.bfloat16))
    ratios = {name: q.stored_bytes(make().to(torch.bfloat16)) / bf16 for name, make in (
        ("FLOAT_8", lambda: q.Float8Linear.from_linear(layer, torch.bfloat16)),
        ("INT_8", lambda: q.int8_linear(layer)),
        ("NFLOAT_4", lambda: q.nf4_linear(layer, torch.bfloat16)))}
    assert 0.50 < ratios["FLOAT_8"] == ratios["INT_8"] < 0.503  # 1 byte + a scale per row
    assert 0.25 < ratios["NFLOAT_4"] < 0.26  # 4 bits + block scales (double-quantized)


# --- Training on quantized weights --------------------------------------------------------------

def run(config):
    events = []
    result = train(config, Control(on_event=events.append))
    losses = [m["loss"] for m in read_metrics(config)]
    return result, events, losses


def falls(losses, factor):
    n = max(3, len(losses) // 4)
    return np.mean(losses[-n:]) < factor * np.mean(losses[:n])


@pytest.fixture(scope="module")
def flux_float8(tiny_flux_dir, tmp_path_factory):
    """A Flux LoRA on a FLOAT_8 transformer (every linear layer), sampling at its last step."""
    config = tiny_config(tiny_flux_dir, tmp_path_factory.mktemp("flux-fp8"),
                         model_type="FLUX_DEV_1", text_encoder={"train": False},
                         output_model_format="DIFFUSERS_LORA", lora_rank=8, lora_alpha=8.0,
                         transformer={"weight_dtype": "FLOAT_8"}, epochs=8,
                         samples=[SAMPLE], sample_after=8, sample_after_unit="EPOCH")
    return (config, *run(config))


def test_flux_lora_on_float8_weights_learns(flux_float8):
    config, result, events, losses = flux_float8
    assert any(e["type"] == "status" and e["message"] == "Stored 50 linear layers of the "
               "transformer as FLOAT_8 (the rest of it in FLOAT_32)" for e in events)
    assert result.global_step == 24
    assert falls(losses, 0.9), losses  # measured 1.50 -> 1.21


def test_flux_lora_of_float8_weights_loads_on_the_full_base_and_draws_the_sample(
        flux_float8, tiny_flux_dir):
    """The file is the usual DIFFUSERS_LORA (peft names, float32 tensors); on the
    full-precision base its image is the training sample's, up to the quantization."""
    config, result, events, _ = flux_float8
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert dtypes == {torch.float32}
    assert_flux_lora_draws_its_sample_on_the_full_base(tiny_flux_dir, config,
                                                        result.output_path, events)


@pytest.fixture(scope="module")
def sd15_quantized(tiny_sd15_dir, tmp_path_factory):
    """SD 1.5 LoRAs of 45 steps: the UNet in FLOAT_8 (KOHYA_LORA), and the UNet in NFLOAT_4 with
    the text encoder in INT_8, both trained (DIFFUSERS_LORA)."""
    runs = {}
    for name, extra in {
            "float8": {"unet": {"weight_dtype": "FLOAT_8"}, "text_encoder": {"train": False}},
            "bnb": {"unet": {"weight_dtype": "NFLOAT_4"},
                    "text_encoder": {"train": True, "weight_dtype": "INT_8",
                                     "stop_training_after_unit": "NEVER"},
                    "output_model_format": "DIFFUSERS_LORA"}}.items():
        config = tiny_config(tiny_sd15_dir, tmp_path_factory.mktemp(name), epochs=15, **extra)
        runs[name] = (config, *run(config))
    return runs


@pytest.mark.parametrize("name", ["float8", "bnb"])
def test_sd15_lora_on_quantized_weights_learns_and_loads_on_the_full_base(
        sd15_quantized, tiny_sd15_dir, name):
    if name == "bnb" and not (q.bitsandbytes_runs("INT_8", "cpu")
                              and q.bitsandbytes_runs("NFLOAT_4", "cpu")):
        pytest.skip("bitsandbytes does not run here: its refusal is tested above")
    config, result, _, losses = sd15_quantized[name]
    assert result.global_step == 45 and falls(losses, 0.92), losses  # measured 1.09 -> 0.93
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, safety_checker=None)
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    pipe.load_lora_weights(result.output_path)
    lora = [n for n, _ in pipe.unet.named_parameters() if "lora_" in n]
    assert lora and all(torch.equal(p, before[n.replace(".base_layer", "")])
                        for n, p in pipe.unet.named_parameters() if "lora_" not in n)
    if name == "bnb":
        assert any("lora_" in n for n, _ in pipe.text_encoder.named_parameters())


def test_flux_lora_as_onetrainer_presets_it_trains_on_nf4_transformer_and_t5(tiny_flux_dir,
                                                                            tmp_path):
    """'#flux LoRA': the transformer and T5 in NFLOAT_4, DIFFUSERS_LORA. Two epochs: it runs
    and writes a file that loads on the full base."""
    if not q.bitsandbytes_runs("NFLOAT_4", "cpu"):
        pytest.skip("bitsandbytes does not run here: its refusal is tested above")
    config = tiny_config(tiny_flux_dir, tmp_path, model_type="FLUX_DEV_1",
                         text_encoder={"train": False}, output_model_format="DIFFUSERS_LORA",
                         transformer={"weight_dtype": "NFLOAT_4"},
                         text_encoder_2={"weight_dtype": "NFLOAT_4"}, epochs=2)
    result, events, losses = run(config)
    assert result.global_step == 6 and all(np.isfinite(losses))
    stored = [e["message"] for e in events if e["type"] == "status" and "Stored" in e["message"]]
    assert stored == ["Stored 12 linear layers of the text_encoder_2 as NFLOAT_4 (the rest of "
                      "it in FLOAT_32)", "Stored 50 linear layers of the transformer as "
                      "NFLOAT_4 (the rest of it in FLOAT_32)"]
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(result.output_path)
    assert any("lora_" in n for n, _ in pipe.transformer.named_parameters())


# --- Config -------------------------------------------------------------------------------------

def config_with(**data):
    base = {"concepts": [{"path": "images"}], "train_dtype": "BFLOAT_16"}
    return config_from_dict({**base, **data})


def test_a_quantized_part_keeps_the_rest_of_it_in_the_train_dtype():
    config = config_with(model_type="FLUX_DEV_1", transformer={"weight_dtype": "FLOAT_8"},
                         text_encoder_2={"weight_dtype": "NFLOAT_4"},
                         vae={"weight_dtype": "INT_8"})
    dtypes = weight_dtypes(config, "cpu")
    assert dtypes == {"text_encoder": torch.float32, "text_encoder_2": torch.bfloat16,
                      "transformer": torch.bfloat16, "vae": torch.bfloat16}
    check_supported(config)  # a quantized VAE too, as OneTrainer allows


@pytest.mark.parametrize("data, message", [
    ({"training_method": "FINE_TUNE", "output_model_format": "ORIGINAL_SINGLE_FILE",
      "unet": {"weight_dtype": "NFLOAT_4"}},
     "unet.weight_dtype = NFLOAT_4: a fine-tuned part trains its own weights, which are not "
     "stored quantized; choose BFLOAT_16 or FLOAT_32 for the unet, or train a LoRA on it."),
    ({"train_dtype": "FLOAT_8"}, "train_dtype = FLOAT_8 is a storage type of frozen weights, "
                                 "not a compute type; choose FLOAT_32, FLOAT_16, BFLOAT_16, "
                                 "TFLOAT_32."),
    ({"output_dtype": "NFLOAT_4"}, "output_dtype = NFLOAT_4 is a storage type of frozen "
                                   "weights, not a file type"),
    ({"unet": {"weight_dtype": "INT_8"}, "lora_decompose": True},
     "lora_decompose (DoRA) with unet.weight_dtype = INT_8: the KOHYA_LORA file's dora_scale "
     "is computed from the base weights, which bitsandbytes holds quantized"),
    ({"unet": {"weight_dtype": "INT_8"}, "layer_offload_fraction": 0.5},
     "layer_offload_fraction = 0.5 with unet.weight_dtype = INT_8: streaming moves a block's "
     "parameters, not the scales bitsandbytes keeps beside them"),
    ({"unet": {"weight_dtype": "NFLOAT_4", "offload_fraction": 0.3}},
     "unet.offload_fraction = 0.3 with unet.weight_dtype = NFLOAT_4: streaming moves"),
    ({"unet": {"weight_dtype": "NFLOAT_4"}, "lora_decompose": True,
      "output_model_format": "DIFFUSERS_LORA", "lora_model_name": "old.safetensors"},
     "lora_model_name with DoRA and unet.weight_dtype = NFLOAT_4"),
    ({"unet": {"weight_dtype": "NFLOAT_4"}, "peft_type": "LOHA"},
     "peft_type = LOHA with unet.weight_dtype = NFLOAT_4: peft sizes LoHa and LoKr factors"),
    ({"model_type": "FLUX_DEV_1", "transformer": {"weight_dtype": "NFLOAT_4"},
      "output_model_format": "KOHYA_LORA"},
     "output_model_format = KOHYA_LORA with transformer.weight_dtype = NFLOAT_4: Flux.1's "
     "KOHYA_LORA names the fused q/k/v layers"),
    ({"unet": {"weight_dtype": "FLOAT_8"}, "quantization": {"layer_filter_preset": "blocks"}},
     "quantization.layer_filter_preset = blocks is not a layer preset of Stable Diffusion 1.5"),
    ({"unet": {"weight_dtype": "FLOAT_8"},
      "quantization": {"layer_filter_preset": "custom", "layer_filter": "attn(",
                       "layer_filter_regex": True}},
     "quantization.layer_filter: 'attn(' is not a valid regular expression"),
])
def test_what_cannot_work_is_refused_naming_the_key(data, message):
    with pytest.raises(ConfigError) as error:
        check_supported(config_with(**data))
    assert str(error.value).startswith(message), str(error.value)


def test_what_works_is_not_refused():
    for data in ({"unet": {"weight_dtype": "FLOAT_8"}, "lora_decompose": True},  # dora_scale
                 {"unet": {"weight_dtype": "NFLOAT_4"}, "lora_decompose": True,
                  "output_model_format": "DIFFUSERS_LORA"},
                 {"unet": {"weight_dtype": "INT_8"}, "peft_type": "LOKR"},
                 {"model_type": "FLUX_DEV_1", "transformer": {"weight_dtype": "FLOAT_8"},
                  "output_model_format": "KOHYA_LORA"},
                 {"training_method": "FINE_TUNE", "output_model_format": "ORIGINAL_SINGLE_FILE",
                  "text_encoder": {"train": False, "weight_dtype": "FLOAT_8"}},
                 {"quantization": {"layer_filter_preset": "blocks"}}):  # nothing quantized
        check_supported(config_with(**data))


# --- OneTrainer's presets -------------------------------------------------------------------------

def read_onetrainer(name, change=None):
    """A OneTrainer fixture through the import, with a user's change."""
    data = copy.deepcopy(raw(name))
    if change:
        change(data)
    notes = []
    config = config_from_dict({**data, "concepts": [{"path": "images"}]}, warn=notes.append,
                              onetrainer=True)
    return config, notes


def no_offloading(data):
    """Offloading is issue 26's other half; these tests read the quantized weights only."""
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        if isinstance(data.get(part), dict):
            data[part]["offload_fraction"] = 0.0


@pytest.mark.parametrize("name, meant", [
    ("preset.flux_lora.saved", {"transformer": "NFLOAT_4", "text_encoder": "BFLOAT_16",
                                "text_encoder_2": "NFLOAT_4", "preset": "full"}),
    ("preset.chroma_lora_8gb.saved", {"transformer": "FLOAT_8", "text_encoder": "FLOAT_8",
                                      "preset": "blocks"}),
    ("preset.chroma_lora_16gb.saved", {"transformer": "FLOAT_8", "text_encoder": "BFLOAT_16",
                                       "preset": "blocks"}),
])
def test_onetrainer_quantized_presets_import_as_meant_and_validate(name, meant):
    config, notes = read_onetrainer(name, no_offloading)
    for part in ("transformer", "text_encoder", "text_encoder_2"):
        if part in meant:
            assert getattr(config, part).weight_dtype.value == meant[part], part
    assert config.quantization.layer_filter_preset.value == meant["preset"]
    assert not [n for n in notes if n.startswith("Unknown") or "quantiz" in n.split(":")[0]]
    check_supported(config)


@pytest.mark.parametrize("change, refused", [
    (lambda d: d["transformer"].update(weight_dtype="GGUF_A8_INT"),
     "transformer.weight_dtype: GGUF_A8_INT (weights from a GGUF file with int8 activations) is "
     "not built in Atelier; set transformer.weight_dtype to GGUF (the file's weights, "
     "activations in the train data type)."),
    (lambda d: d["transformer"].update(weight_dtype="FLOAT_W8A8"),
     "transformer.weight_dtype: FLOAT_W8A8 (float8 weights with float8 activations"),
    (lambda d: d["quantization"].update(svd_dtype="BFLOAT_16"),
     "quantization.svd_dtype: 'BFLOAT_16' cannot be trained here: SVDQuant"),
])
def test_onetrainer_quantized_types_atelier_does_not_build_are_refused(change, refused):
    with pytest.raises(ConfigError) as error:
        read_onetrainer("preset.chroma_lora_16gb.saved", change)
    assert str(error.value).startswith(refused), str(error.value)


def test_a_different_quantization_filter_is_what_onetrainer_quantized():
    def custom(data):
        data["quantization"]["layer_filter"] = "single_transformer_blocks"
    config, notes = read_onetrainer("preset.chroma_lora_16gb.saved", custom)
    assert (config.quantization.layer_filter_preset.value, config.quantization.layer_filter) \
        == ("custom", "single_transformer_blocks")
    assert any(n.startswith("quantization layer preset blocks with layer_filter "
                            "'single_transformer_blocks': OneTrainer quantizes the filter")
               for n in notes)
