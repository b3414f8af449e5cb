"""Flux.1 (FLUX_DEV_1): LoRA and fine-tune training of the tiny dev and schnell models on the
demo photos, what the outputs load into, the guidance input, resume, masks, caption dropout."""
import pathlib

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors import safe_open

from trainer.config import config_from_dict
from trainer.control import Control
from trainer.loop import train
from trainer.models.family import load_family
from trainer.models.flux import image_ids, pack, unpack
from trainer.models.tiny_flow import tiny_flow_model

from flow_family_checks import render_flux
from helpers import (RUNS_ARE_BIT_EXACT, assert_black_masks_learn_nothing, read_metrics,
                     resumed_equals_whole, same_trained, tiny_config)

SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}


def flux_config(tmp_path, kind="flux", **overrides):
    """A Flux LoRA run of seconds: the CLIP frozen (T5 always is), DIFFUSERS_LORA."""
    data = dict(model_type="FLUX_DEV_1", text_encoder={"train": False},
                output_model_format="DIFFUSERS_LORA", lora_rank=8, lora_alpha=8.0)
    data.update(overrides)
    return tiny_config(tiny_flow_model(kind), tmp_path, **data)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 epochs (90 steps) of a dev LoRA that samples at its last step."""
    tmp = tmp_path_factory.mktemp("flux-lora")
    config = flux_config(tmp, epochs=30, samples=[SAMPLE], sample_after=30,
                         sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    return config, result, events


def test_flux_lora_loss_falls(trained):
    config, result, _ = trained
    losses = [m["loss"] for m in read_metrics(config)]
    assert result.global_step == 90 and len(losses) == 90
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.85 * first, (first, last)  # measured: 1.56 -> 1.17 (factor 0.75)


def test_diffusers_lora_reloads_in_flux_pipeline_and_gives_the_training_sample(trained):
    config, result, events = trained
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)
    sample_path = [e["path"] for e in events if e["type"] == "sample"][-1]
    pipe = FluxPipeline.from_pretrained(tiny_flow_model("flux"))
    pipe.set_progress_bar_config(disable=True)
    base = render_flux(pipe, config)
    pipe.load_lora_weights(result.output_path)
    with_lora = render_flux(pipe, config)
    sample = np.asarray(Image.open(sample_path)).astype(np.float64)
    assert np.abs(with_lora - sample).max() <= (0 if RUNS_ARE_BIT_EXACT else 2)
    assert np.abs(with_lora - base).mean() > 1.0


def test_pack_unpack_and_ids_are_diffusers_own(trained):
    latents = torch.randn(2, 4, 6, 10)
    ours = pack(latents)
    theirs = FluxPipeline._pack_latents(latents, 2, 4, 6, 10)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack(ours, 6, 10), latents)
    assert torch.equal(image_ids(3, 5, "cpu", torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def _prediction(family, guidance_scale):
    family.config = family.config.model_copy(update={"transformer": family.config.transformer
                                                     .model_copy(update={"guidance_scale":
                                                                         guidance_scale})})
    torch.manual_seed(0)
    noisy = torch.randn(1, 4, 8, 8)
    conditioning = family.encode_text(["a photo"], {}, clip_skip=0, device=torch.device("cpu"),
                                      grad={})
    with torch.no_grad():
        return family.predict(noisy, torch.tensor([500.0]), conditioning)


def test_guidance_scale_is_an_input_of_dev_and_ignored_by_schnell(tmp_path):
    dev = load_family(flux_config(tmp_path))
    assert dev.guided and dev.lora_architecture == "flux-1-dev/lora"
    assert not torch.equal(_prediction(dev, 1.0), _prediction(dev, 4.0))
    schnell = load_family(flux_config(tmp_path, kind="flux-schnell"))
    assert not schnell.guided and schnell.lora_architecture == "flux-1-schnell/lora"
    assert torch.equal(_prediction(schnell, 1.0), _prediction(schnell, 4.0))


def test_schnell_lora_trains(tmp_path):
    config = flux_config(tmp_path, kind="flux-schnell", epochs=2)
    result = train(config)
    assert result.global_step == 6
    with safe_open(result.output_path, "pt") as f:
        assert any(torch.count_nonzero(f.get_tensor(k)) for k in f.keys() if "lora_B" in k)


def test_caption_dropout_zeroes_each_encoders_output(tmp_path):
    config = flux_config(tmp_path, text_encoder={"train": False,
                                                 "caption_dropout_probability": 1.0})
    family = load_family(config)
    out = family.caption_dropout(["a photo", "a cat"], lambda c: family.encode_text(
        c, {}, clip_skip=0, device=torch.device("cpu"), grad={}))
    assert torch.count_nonzero(out["pooled_projections"]) == 0
    assert torch.count_nonzero(out["encoder_hidden_states"]) > 0  # T5's probability is 0


def test_attention_mask_zeroes_t5_padding(tmp_path):
    config = flux_config(tmp_path, transformer={"attention_mask": True},
                         text_encoder_2_sequence_length=16)
    family = load_family(config)
    out = family.encode_text(["a photo"], {}, clip_skip=0, device=torch.device("cpu"), grad={})
    hidden = out["encoder_hidden_states"]
    assert hidden.shape[1] == 16
    assert torch.count_nonzero(hidden[0, -1]) == 0 and torch.count_nonzero(hidden[0, 0]) > 0


def test_masked_training_with_black_masks_learns_nothing(tmp_path):
    assert_black_masks_learn_nothing(flux_config, tmp_path, epochs=2)


def test_interrupted_and_resumed_flux_run_ends_with_the_same_weights(tmp_path):
    steps = resumed_equals_whole(flux_config, tmp_path, 2, epochs=2,
                                 timestep_distribution="LOGIT_NORMAL",
                                 dynamic_timestep_shifting=True)
    assert steps == 6


def test_flux_fine_tune_saves_a_diffusers_folder_and_an_original_single_file(tmp_path):
    config = flux_config(tmp_path, epochs=1, training_method="FINE_TUNE",
                         output_model_format="DIFFUSERS", learning_rate=1e-3)
    result = train(config)
    trained = FluxTransformer2DModel.from_pretrained(result.output_path, subfolder="transformer")
    base = FluxTransformer2DModel.from_pretrained(tiny_flow_model("flux"),
                                                  subfolder="transformer")
    state, before = trained.state_dict(), base.state_dict()
    assert any(not torch.equal(state[k], before[k]) for k in state)

    single = flux_config(tmp_path / "single", epochs=1, training_method="FINE_TUNE",
                         output_model_format="ORIGINAL_SINGLE_FILE", learning_rate=1e-3)
    out = train(single).output_path
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
    assert "double_blocks.0.img_attn.qkv.weight" in keys and "guidance_in.in_layer.weight" in keys
    from trainer.models.transformer_layouts import load_original_transformer
    reloaded = load_original_transformer(FluxTransformer2DModel, out,
                                         config=tiny_flow_model("flux"))
    # the same seed and data: the single file holds the same weights as the folder
    for key, tensor in reloaded.state_dict().items():
        assert same_trained(tensor, state[key]), key
    # ... and is a base model's transformer (`transformer.model_name`) beside the folder
    family = load_family(flux_config(tmp_path / "again", transformer={"model_name": out}))
    for key, tensor in family.parts["transformer"].state_dict().items():
        assert same_trained(tensor, state[key]), key


def test_a_flux_base_model_given_to_another_type_is_named(tmp_path):
    from trainer.errors import ModelLoadError
    config = tiny_config(tiny_flow_model("flux"), tmp_path, model_type="STABLE_DIFFUSION_35",
                         text_encoder={"train": False})
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        load_family(config)


def test_sd_families_keep_their_objective(tmp_path):
    config = config_from_dict({"model_type": "FLUX_DEV_1"})
    assert config.model_type.facts.flow_matching and config.model_type.facts.bucket_quantum == 16


# diffusers' kohya converter splits a single block's fused linear1 at Flux.1's own widths
# (3072 x 3 + 12288), which the 32-wide tiny model does not have: these runs train the double
# blocks only (test_flow_lora_names checks the single blocks' names against our reader).
DOUBLE_BLOCKS = dict(epochs=10, lora_layer_preset="custom", layer_filter="^transformer_blocks",
                     layer_filter_regex=True)


@pytest.fixture(scope="module")
def double_block_runs(tmp_path_factory):
    return {fmt: train(flux_config(tmp_path_factory.mktemp(fmt), output_model_format=fmt,
                                   **DOUBLE_BLOCKS))
            for fmt in ("DIFFUSERS_LORA", "KOHYA_LORA", "COMFY_LORA")}


@pytest.mark.parametrize("output_format", ["KOHYA_LORA", "COMFY_LORA"])
def test_kohya_and_comfy_files_give_the_diffusers_files_image(output_format, double_block_runs):
    """The same run (same seed) saved as KOHYA_LORA / COMFY_LORA: the q/k/v LoRAs written on
    the fused original layers; diffusers' own kohya converter loads the file and draws the image
    the DIFFUSERS_LORA file of the run draws."""
    config = flux_config(pathlib.Path("unused"), **DOUBLE_BLOCKS)
    other = double_block_runs[output_format]
    with safe_open(other.output_path, "pt") as f:
        keys = list(f.keys())
    prefix = "lora_unet_" if output_format == "KOHYA_LORA" else "diffusion_model."
    assert keys and all(k.startswith(prefix) for k in keys)
    fused = (prefix + "double_blocks_0_img_attn_qkv" if output_format == "KOHYA_LORA"
             else prefix + "double_blocks.0.img_attn.qkv")
    assert f"{fused}.lora_down.weight" in keys
    pipe = FluxPipeline.from_pretrained(tiny_flow_model("flux"))
    pipe.set_progress_bar_config(disable=True)
    base = render_flux(pipe, config)
    pipe.load_lora_weights(double_block_runs["DIFFUSERS_LORA"].output_path)
    expected = render_flux(pipe, config)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(other.output_path)
    got = render_flux(pipe, config)
    assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()
    assert np.abs(expected - base).mean() > 1.0


def test_the_clip_text_encoder_trains_with_the_transformer(tmp_path):
    """Flux's CLIP-L (text_encoder) takes a LoRA too; the file holds it under diffusers'
    text_encoder prefix and FluxPipeline loads both."""
    config = flux_config(tmp_path, epochs=2, text_encoder={"train": True,
                                                           "stop_training_after_unit": "NEVER"})
    result = train(config)
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.") for k in keys)
    pipe = FluxPipeline.from_pretrained(tiny_flow_model("flux"))
    pipe.load_lora_weights(result.output_path)
    assert getattr(pipe.text_encoder, "peft_config", None)  # the CLIP got its adapter


def test_training_continues_from_a_saved_kohya_file(double_block_runs, tmp_path):
    """lora_model_name: a KOHYA_LORA file of this run's layers is read back onto the separate
    q/k/v adapters (each module its own rank columns of the fused layer): the continued run's
    adapters start where the file's ended, so a 0-learning-rate continuation writes the same
    weight deltas."""
    from trainer.flow_lora_names import read_flow_lora
    saved = double_block_runs["KOHYA_LORA"].output_path
    config = flux_config(tmp_path, lora_model_name=saved, output_model_format="KOHYA_LORA",
                         **{**DOUBLE_BLOCKS, "epochs": 1, "learning_rate": 1e-12})
    again = train(config).output_path
    shapes = FluxTransformer2DModel.from_pretrained(
        tiny_flow_model("flux"), subfolder="transformer").state_dict()
    shapes = {k: v.shape for k, v in shapes.items()}
    with safe_open(saved, "pt") as a, safe_open(again, "pt") as b:
        first = read_flow_lora("FLUX_DEV_1", shapes, {k: a.get_tensor(k) for k in a.keys()})
        second = read_flow_lora("FLUX_DEV_1", shapes, {k: b.get_tensor(k) for k in b.keys()})
    assert first.keys() == second.keys() and first
    for module in first:
        assert torch.allclose(first[module].delta(), second[module].delta(), atol=1e-6), module


@pytest.mark.parametrize("settings, message", [
    ({"peft_type": "LOHA", "output_model_format": "KOHYA_LORA"}, "peft_type LOHA is not"),
    ({"peft_type": "LOKR", "output_model_format": "COMFY_LORA"}, "peft_type LOKR is not"),
    ({"lora_decompose": True, "output_model_format": "KOHYA_LORA"}, "DIFFUSERS_LORA only"),
])
def test_adapters_without_an_exact_fused_layout_are_refused_before_the_run(settings, message):
    from trainer.config import check_supported
    from trainer.errors import ConfigError
    config = config_from_dict({"model_type": "FLUX_DEV_1", "text_encoder": {"train": False},
                               **settings})
    with pytest.raises(ConfigError, match=message):
        check_supported(config)


def test_dora_trains_and_reloads_in_flux_pipeline(tmp_path):
    config = flux_config(tmp_path, epochs=2, lora_decompose=True, samples=[SAMPLE],
                         sample_after=2, sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    with safe_open(result.output_path, "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())
    pipe = FluxPipeline.from_pretrained(tiny_flow_model("flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(result.output_path)
    sample = [e["path"] for e in events if e["type"] == "sample"][-1]
    got = render_flux(pipe, config)
    assert np.abs(got - np.asarray(Image.open(sample)).astype(np.float64)).max() <= 1


def test_parts_load_in_the_type_they_are_stored_in(tmp_path):
    """A BFLOAT_16 (or quantized, from the train dtype) frozen part is read from the files in
    that type: no float32 copy of the whole transformer on the host; a fine-tuned part in
    float32, its masters' type."""
    lora = load_family(flux_config(tmp_path, transformer={"weight_dtype": "BFLOAT_16"},
                                   text_encoder_2={"weight_dtype": "BFLOAT_16"}))
    assert lora.parts["transformer"].dtype == torch.bfloat16
    assert lora.parts["text_encoder_2"].dtype == torch.bfloat16
    assert lora.parts["text_encoder"].dtype == torch.float32
    fine_tune = load_family(flux_config(tmp_path, training_method="FINE_TUNE",
                                        output_model_format="DIFFUSERS",
                                        transformer={"weight_dtype": "BFLOAT_16"}))
    assert fine_tune.parts["transformer"].dtype == torch.float32
