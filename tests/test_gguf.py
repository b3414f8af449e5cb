"""GGUF transformers (transformer.weight_dtype GGUF, OneTrainer's): a flow transformer read
pre-quantized from a .gguf file (transformer.model_name) through diffusers' GGUF layers. The
files are written by the gguf library itself (tests/gguf_files.py) from each tiny family's
original-layout transformer, as city96's files are made from the released ones.

Each family's file loads with its packed layers as diffusers' GGUFLinear, and every weight is
the released one up to the type's rounding (so the layout conversion moved the packed rows
right); the transformer computes exactly what its dequantized weights compute; a LoRA trains on
it, streams, writes the usual files (the original-layout names sized from the layers' logical
shapes) and loads on the full-precision base; what cannot work is refused naming the key."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer.config import check_supported, config_from_dict
from trainer.control import Control
from trainer.errors import ConfigError, ModelLoadError
from trainer.loop import train
from trainer.models.family import load_family
from trainer.models.transformer_layouts import module_shapes
from trainer.quantization import is_gguf_layer

from flow_family_checks import assert_flux_lora_draws_its_sample_on_the_full_base
from gguf_files import flux_inputs, write_gguf
from helpers import read_metrics, tiny_config

SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}
FAMILIES = [("tiny_flux_dir", "FLUX_DEV_1"), ("tiny_chroma_dir", "CHROMA_1"),
            ("tiny_sd3_dir", "STABLE_DIFFUSION_3"), ("tiny_qwen_image_dir", "QWEN"),
            ("tiny_flux2_dir", "FLUX_2"), ("tiny_z_image_dir", "Z_IMAGE")]


def family_config(model_dir, tmp_path, model_type, gguf=None, **overrides):
    transformer = {"model_name": str(gguf), "weight_dtype": "GGUF"} if gguf else {}
    transformer.update(overrides.pop("transformer", {}))
    overrides.setdefault("output_model_format", "DIFFUSERS_LORA")
    return tiny_config(model_dir, tmp_path, model_type=model_type, text_encoder={"train": False},
                       transformer=transformer, **overrides)


def gguf_of(model_dir, tmp_path, model_type, qtype="Q8_0"):
    """(the plain family, its transformer written to a .gguf file, {tensor: type})."""
    plain = load_family(family_config(model_dir, tmp_path / "plain", model_type))
    path = tmp_path / f"transformer-{qtype}.gguf"
    return plain, path, write_gguf(plain.original_state_dict(), path, qtype)


def gguf_layers(module):
    return {name: layer for name, layer in module.named_modules()
            if is_gguf_layer(layer)}


def dequantize_in_place(reference):
    """Each GGUF layer of `reference` replaced by a plain Linear holding diffusers' own
    dequantization of its weight: the reference the GGUF layers must compute exactly."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
    for name, layer in gguf_layers(reference).items():
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight.data = dequantize_gguf_tensor(layer.weight).to(layer.compute_dtype)
        if layer.bias is not None:
            plain.bias.data = layer.bias.data.clone()
        parent_name, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent_name) if parent_name else reference, child, plain)


@pytest.mark.parametrize("qtype", ["Q8_0", "BF16"])
@pytest.mark.parametrize("fixture, model_type", FAMILIES)
def test_each_familys_gguf_file_loads_packed_with_the_released_weights(fixture, model_type,
                                                                       qtype, request, tmp_path):
    """Q8_0 as llama.cpp's quantizer leaves a file, BF16 as city96's converter writes one
    (its 3-D positional embeddings and the like packed too, which no GGUF layer reads: they
    are dequantized at load)."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor
    plain, path, written = gguf_of(request.getfixturevalue(fixture), tmp_path, model_type,
                                   qtype)
    assert qtype in written.values() and "F32" in written.values()
    config = family_config(request.getfixturevalue(fixture), tmp_path / "gguf", model_type, path)
    transformer = load_family(config).parts["transformer"]
    packed = gguf_layers(transformer)
    assert packed, "no layer was read packed"
    want = plain.parts["transformer"].state_dict()
    got = transformer.state_dict()
    assert got.keys() == want.keys()
    for key, tensor in got.items():
        layer = packed.get(key.rpartition(".")[0])
        if layer is not None and key.endswith(".weight"):
            values = dequantize_gguf_tensor(tensor).float()
            # Q8_0: one scale per 32 values, 8-bit codes: within 1/127 of the block's largest
            assert values.shape == want[key].shape, key
            error = (values - want[key]).abs().max()
            assert error <= 0.01 * want[key].abs().max(), (key, float(error))
        else:  # kept unquantized (F32, a fallback F16) or dequantized at load (BF16)
            assert not hasattr(tensor, "quant_type"), key
            value, released = tensor.float(), want[key].float()
            assert any(torch.equal(value, released.to(kind).float())
                       for kind in (torch.float32, torch.float16, torch.bfloat16)), key
    # the LoRA names are sized from the layers' logical shapes, not the packed bytes
    assert module_shapes(transformer) == module_shapes(plain.parts["transformer"])


def test_a_gguf_transformer_computes_exactly_what_its_dequantized_weights_compute(
        tiny_flux_dir, tmp_path):
    _, path, _ = gguf_of(tiny_flux_dir, tmp_path, "FLUX_DEV_1", "Q4_0")
    config = family_config(tiny_flux_dir, tmp_path / "gguf", "FLUX_DEV_1", path)
    transformer = load_family(config).parts["transformer"]
    reference = load_family(config).parts["transformer"]
    dequantize_in_place(reference)
    assert gguf_layers(transformer) and not gguf_layers(reference)
    inputs = flux_inputs(transformer.config)
    with torch.no_grad():
        assert torch.equal(transformer(**inputs).sample, reference(**inputs).sample)


def test_the_backward_pass_keeps_the_packed_weights_not_dequantized_copies(tiny_flux_dir,
                                                                          tmp_path):
    """diffusers' GGUF layer hands F.linear the dequantized weight, which autograd would keep
    for every layer until the backward pass (the whole transformer at the train dtype): here
    each layer keeps its packed weight and dequantizes again, with the same gradients."""
    _, path, _ = gguf_of(tiny_flux_dir, tmp_path, "FLUX_DEV_1")
    config = family_config(tiny_flux_dir, tmp_path / "gguf", "FLUX_DEV_1", path)
    from diffusers.quantizers.gguf.utils import GGUFLinear
    transformer = load_family(config).parts["transformer"]
    layers = gguf_layers(transformer)
    diffusers_own = load_family(config).parts["transformer"]
    for layer in gguf_layers(diffusers_own).values():
        layer.__class__ = GGUFLinear
    inputs = flux_inputs(transformer.config)
    grads = []
    for model in (transformer, diffusers_own):
        x = inputs["hidden_states"].clone().requires_grad_(True)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t,
                                                      lambda t: t):
            model(**{**inputs, "hidden_states": x}).sample.square().mean().backward()
        grads.append(x.grad)
        # what autograd keeps of weight size that is no parameter: a dequantized copy
        own = {t.data_ptr() for t in model.parameters()}
        floating = {tuple(t.shape) for t in kept
                    if t.is_floating_point() and t.data_ptr() not in own}
        copies = {(m.out_features, m.in_features) for m in layers.values()} & floating
        assert bool(copies) == (model is not transformer), copies
    assert torch.equal(grads[0], grads[1])


@pytest.fixture(scope="module")
def flux_on_gguf(tiny_flux_dir, tmp_path_factory):
    """A Flux LoRA on a Q8_0 GGUF transformer, sampling at its last step."""
    folder = tmp_path_factory.mktemp("flux-gguf")
    _, path, _ = gguf_of(tiny_flux_dir, folder, "FLUX_DEV_1")
    config = family_config(tiny_flux_dir, folder / "run", "FLUX_DEV_1", path, lora_rank=8,
                           lora_alpha=8.0, epochs=8, samples=[SAMPLE], sample_after=8,
                           sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    return config, result, events, [m["loss"] for m in read_metrics(config)]


def test_a_lora_on_a_gguf_transformer_learns(flux_on_gguf):
    config, result, events, losses = flux_on_gguf
    assert ("Read the transformer pre-quantized from its GGUF file: 39 linear layers packed "
            "(39 Q8_0), dequantized one layer at a time") in [
        e["message"] for e in events if e["type"] == "status"]
    assert result.global_step == 24
    n = len(losses) // 4
    assert np.mean(losses[-n:]) < 0.9 * np.mean(losses[:n]), losses


def test_a_gguf_runs_lora_loads_on_the_full_base_and_draws_the_sample(flux_on_gguf,
                                                                      tiny_flux_dir):
    config, result, events, _ = flux_on_gguf
    tensors = load_file(result.output_path)
    assert tensors and all(k.startswith("transformer.") and ".lora_" in k for k in tensors)
    # on the full-precision base its image is the training sample's, up to Q8_0's rounding
    assert_flux_lora_draws_its_sample_on_the_full_base(tiny_flux_dir, config,
                                                        result.output_path, events)


@pytest.mark.parametrize("output_format", ["COMFY_LORA", "KOHYA_LORA"])
def test_original_layout_lora_files_are_those_of_a_plain_run(output_format, tiny_flux_dir,
                                                             tmp_path):
    """Flux.1's fused q/k/v names are sized from the layers: a GGUF run writes the keys and
    shapes a run on the plain transformer writes."""
    _, path, _ = gguf_of(tiny_flux_dir, tmp_path, "FLUX_DEV_1")
    shapes = {}
    for name, gguf in (("plain", None), ("gguf", path)):
        config = family_config(tiny_flux_dir, tmp_path / name, "FLUX_DEV_1", gguf, epochs=1,
                               output_model_format=output_format)
        result = train(config, Control())
        shapes[name] = {k: tuple(v.shape) for k, v in load_file(result.output_path).items()}
    assert shapes["gguf"] == shapes["plain"] and shapes["plain"]


def test_a_streamed_gguf_transformer_trains_exactly_like_one_on_the_device(tiny_flux_dir,
                                                                         tmp_path):
    _, path, _ = gguf_of(tiny_flux_dir, tmp_path, "FLUX_DEV_1")
    runs = {}
    for name, fraction in (("resident", 0.0), ("streamed", 0.6)):
        config = family_config(tiny_flux_dir, tmp_path / name, "FLUX_DEV_1", path, epochs=1,
                               gradient_checkpointing=True,
                               transformer={"offload_fraction": fraction})
        events = []
        result = train(config, Control(on_event=events.append))
        runs[name] = ([e["loss"] for e in events if e["type"] == "progress"],
                      load_file(result.output_path), events)
    assert any("Streaming" in e.get("message", "") for e in runs["streamed"][2])
    assert runs["streamed"][0] == runs["resident"][0]
    a, b = runs["streamed"][1], runs["resident"][1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    ({"transformer": {"weight_dtype": "GGUF"}},
     "transformer.weight_dtype = GGUF reads the transformer pre-quantized from a .gguf file"),
    ({"transformer": {"weight_dtype": "GGUF", "model_name": "flux1-dev.safetensors"}},
     "transformer.weight_dtype = GGUF .*'flux1-dev.safetensors' is not one"),
    ({"transformer": {"model_name": "flux1-dev-Q4_K_S.gguf"}},
     "transformer.model_name: 'flux1-dev-Q4_K_S.gguf' is a GGUF file"),
    ({"text_encoder_2": {"weight_dtype": "GGUF"}},
     "text_encoder_2.weight_dtype = GGUF: only a transformer"),
    ({"lora_decompose": True}, r"lora_decompose \(DoRA\) with transformer.weight_dtype = GGUF"),
    ({"training_method": "FINE_TUNE", "output_model_format": "DIFFUSERS"},
     "transformer.weight_dtype = GGUF: a fine-tuned part"),
    ({"train_dtype": "GGUF"}, "train_dtype = GGUF is a storage type"),
], ids=["no-file", "not-gguf-file", "file-without-type", "encoder", "dora",
        "fine-tune", "train-dtype"])
def test_what_gguf_cannot_do_is_refused_naming_the_key(overrides, message, tmp_path):
    data = {"model_type": "FLUX_DEV_1", "base_model_name": "org/model",
            "concepts": [{"path": str(tmp_path)}], "text_encoder": {"train": False},
            "output_model_format": "DIFFUSERS_LORA",
            "transformer": {"weight_dtype": "GGUF", "model_name": "flux1-dev-Q4_K_S.gguf"}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            data[key] = {**data.get(key, {}), **value}
            if key == "transformer" and "model_name" not in value:
                data[key].pop("model_name", None)
            if key == "transformer" and "weight_dtype" not in value:
                data[key].pop("weight_dtype", None)
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=f"^{message}"):
        check_supported(config_from_dict(data, warn=lambda m: None))


def test_a_broken_or_foreign_gguf_file_is_refused_naming_the_key(tiny_flux_dir, tiny_chroma_dir,
                                                                 tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelLoadError, match="^transformer.model_name: '.*broken.gguf' is not "
                                             "a readable GGUF file"):
        load_family(family_config(tiny_flux_dir, tmp_path / "a", "FLUX_DEV_1", broken))
    _, chroma, _ = gguf_of(tiny_chroma_dir, tmp_path, "CHROMA_1")
    with pytest.raises(ModelLoadError, match="^transformer.model_name: .*holds a Chroma"):
        load_family(family_config(tiny_flux_dir, tmp_path / "b", "FLUX_DEV_1", chroma))
