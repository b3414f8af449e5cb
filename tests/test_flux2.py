"""Flux.2 klein (FLUX_2) on the tiny model: LoRA training, its DIFFUSERS_LORA file in diffusers'
Flux2KleinPipeline reproducing the training sample, COMFY_LORA's names, fine-tune outputs
(diffusers folder, original single file), exact resume, masked training, the text encoding, the
latents and the prediction as the pipeline does them, caption dropout, the refusals, the CLI.
OneTrainer's Flux 2 presets: tests/test_onetrainer*.py."""
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from flow_family_checks import (CAPTIONS, assert_another_transformer_file_is_refused,
                                assert_changed, assert_dora_reloads,
                                assert_lora_reproduces_the_sample,
                                assert_text_encoder_training_is_refused, assert_try_it_reads,
                                encode, fine_tune, lora_files_of_both_formats, make_tiny_model,
                                pipeline_from, text_cache_entries, the_sample, train_with_events)
from helpers import (assert_black_masks_learn_nothing, assert_loss_falls, assert_same_weights,
                     resumed_equals_whole, tiny_config)
from trainer.config import check_supported, config_from_dict
from trainer.errors import ConfigError
from trainer.models.family import load_family
from trainer.models.flux2 import Flux2Family, chat_prompt, patchify, unpatchify
from trainer.models.tiny_flux2 import tiny_flux2_model
from trainer.models.tiny_z_image import build_tiny_qwen_tokenizer

# Captions of 64 tokens (OneTrainer's text_encoder_sequence_length, 512 by default): the tiny
# encoder is 28 layers deep, and a shorter text keeps every step a fraction of the time.
LENGTH = 64
SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}
EPOCHS = 30


@pytest.fixture(scope="module")
def model_dir():
    return tiny_flux2_model()


def f2_config(tmp_path, **overrides):
    """A Flux.2 klein LoRA run of seconds on OneTrainer's `blocks` layers, DIFFUSERS_LORA."""
    data = dict(model_type="FLUX_2", text_encoder={"train": False},
                text_encoder_sequence_length=LENGTH, output_model_format="DIFFUSERS_LORA",
                lora_layer_preset="blocks", lora_rank=8, lora_alpha=8.0)
    data.update(overrides)
    return tiny_config(tiny_flux2_model(), tmp_path, **data)


def base_pipeline(folder) -> Flux2KleinPipeline:
    return pipeline_from(Flux2KleinPipeline, folder)


def render(pipe: Flux2KleinPipeline, sample=SAMPLE) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(sample["seed"])
    image = pipe(prompt=sample["prompt"], width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"],
                 guidance_scale=sample["cfg_scale"], generator=generator,
                 max_sequence_length=LENGTH).images[0]
    return np.asarray(image).astype(np.float64)


# --- LoRA ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """30 epochs (90 steps) of LoRA (rank 8, alpha 8) on the demo photos at 64 px, sampling at
    the end."""
    tmp = tmp_path_factory.mktemp("flux2-lora")
    config = f2_config(tmp, epochs=EPOCHS, learning_rate=2e-2, samples=[SAMPLE],
                       sample_after=EPOCHS, sample_after_unit="EPOCH")
    return config, *train_with_events(config)


def test_lora_training_lowers_the_loss(lora_run):
    config, result, _ = lora_run
    # 5 photos: batches of 2, 2, 1; measured: 2.35 -> 2.11 (x0.90). The batch-normalised
    # latents (the tiny VAE's statistics are random) leave a large part of the loss no LoRA of
    # a few steps removes; the run is deterministic, so the margin is not one for noise
    # between runs
    assert_loss_falls(config, result, EPOCHS * 3, 0.93)


def test_the_lora_file_holds_the_transformer_blocks(lora_run, model_dir):
    _, result, _ = lora_run
    with safe_open(result.output_path, "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_base_model_version"] == "flux2"
    assert metadata["modelspec.architecture"] == "Flux.2/lora"  # OneTrainer's id
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in keys}
    transformer = Flux2Transformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    # OneTrainer's "blocks": every linear layer of both kinds of block, nothing outside them
    assert modules == {n for n in linear if "transformer_block" in n}
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.ff.linear_in",
            "single_transformer_blocks.0.attn.to_qkv_mlp_proj"} <= modules


def test_diffusers_lora_reproduces_the_training_sample(lora_run, model_dir):
    _, result, events = lora_run
    assert_lora_reproduces_the_sample(base_pipeline(model_dir), render, result.output_path,
                                      the_sample(events))


def test_text_cache_keeps_three_layers_of_states(lora_run):
    config, _, _ = lora_run
    entries = text_cache_entries(config)
    assert len(entries) == 5  # one per caption
    entry = load_file(str(entries[0]))
    assert set(entry) == {"encoder_hidden_states"}
    assert entry["encoder_hidden_states"].shape == (LENGTH, 3 * 16)  # 3 layers x Qwen3's width


def test_comfy_lora_fuses_q_k_v_under_bfl_names(tmp_path, model_dir):
    """COMFY_LORA: `diffusion_model.<BFL layer>`, ComfyUI's generic names for any weight of its
    Flux.2 model (comfy/lora.py model_lora_keys_unet); the double blocks' q/k/v fused into
    img_attn.qkv / txt_attn.qkv exactly: each part's rows get the same delta as the
    DIFFUSERS_LORA file of the same run."""
    from trainer.models.transformer_layouts import to_original
    files = lora_files_of_both_formats(f2_config, tmp_path)
    comfy, diffusers = files["COMFY_LORA"], files["DIFFUSERS_LORA"]
    transformer = Flux2Transformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")
    original = to_original("FLUX_2", transformer.state_dict())
    layers = {k.removeprefix("diffusion_model.").rsplit(".", 2)[0] for k in comfy
              if k.endswith(".lora_down.weight")}
    assert all(k.startswith("diffusion_model.") for k in comfy)
    assert {f"{layer}.weight" for layer in layers} <= set(original)  # ComfyUI's own weights
    assert {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv",
            "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"} <= layers

    def comfy_delta(layer):
        down = comfy[f"diffusion_model.{layer}.lora_down.weight"].float()
        up = comfy[f"diffusion_model.{layer}.lora_up.weight"].float()
        return float(comfy[f"diffusion_model.{layer}.alpha"]) / down.shape[0] * up @ down

    def diffusers_delta(module):
        return diffusers[f"transformer.{module}.lora_B.weight"].float() @ \
            diffusers[f"transformer.{module}.lora_A.weight"].float()

    fused = comfy_delta("double_blocks.0.img_attn.qkv")
    want = torch.cat([diffusers_delta(f"transformer_blocks.0.attn.to_{p}") for p in "qkv"])
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(comfy_delta("single_blocks.0.linear1"),
                               diffusers_delta("single_transformer_blocks.0.attn.to_qkv_mlp_proj"),
                               rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(fused)


# --- fine-tune -------------------------------------------------------------------------------

def test_fine_tune_diffusers_folder_reloads_to_the_trained_weights(model_dir, tmp_path,
                                                                   monkeypatch):
    path, trained = fine_tune(f2_config, tmp_path, "DIFFUSERS", monkeypatch)
    pipe = base_pipeline(path)
    assert type(pipe) is Flux2KleinPipeline  # the pipeline itself, not the sampling wrapper
    assert_same_weights(pipe.transformer.state_dict(), trained)
    assert_changed(trained, base_pipeline(model_dir).transformer.state_dict())
    # the VAE keeps its batch-norm statistics
    assert torch.equal(pipe.vae.bn.running_var, base_pipeline(model_dir).vae.bn.running_var)


def test_fine_tune_original_single_file_reads_back_bit_identical(model_dir, tmp_path,
                                                                 monkeypatch):
    """BFL's layout (fused q/k/v, global modulations, final_layer with (shift, scale)): what
    ComfyUI loads, read back by diffusers' own single-file converter, and as a run's
    transformer file (transformer.model_name) beside the base folder."""
    path, trained = fine_tune(f2_config, tmp_path, "ORIGINAL_SINGLE_FILE", monkeypatch)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.weight",
            "double_stream_modulation_img.lin.weight", "single_blocks.0.linear1.weight",
            "final_layer.adaLN_modulation.1.weight", "img_in.weight", "txt_in.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale"} <= keys
    assert not any(".to_q." in k or k.startswith("transformer_blocks.") for k in keys)
    loaded = Flux2Transformer2DModel.from_single_file(
        path, config=str(model_dir), subfolder="transformer", local_files_only=True)
    assert_same_weights(loaded.state_dict(), trained)
    config = f2_config(tmp_path / "next", transformer={"model_name": str(path)})
    assert_same_weights(load_family(config).parts["transformer"].state_dict(), trained)


def test_a_transformer_file_of_another_kind_is_refused_naming_the_key(tmp_path):
    assert_another_transformer_file_is_refused(f2_config, tmp_path,
                                               "layers.0.attention.qkv.weight")


# --- resume, masks -----------------------------------------------------------------------------

def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    steps = resumed_equals_whole(f2_config, tmp_path, 2, epochs=2,
                                 timestep_distribution="LOGIT_NORMAL",
                                 dynamic_timestep_shifting=True)
    assert steps == 6


def test_masked_training_with_black_masks_learns_nothing(tmp_path):
    assert_black_masks_learn_nothing(f2_config, tmp_path, epochs=1)


# --- the family directly: encoding, latents and prediction as Flux2KleinPipeline does them ----

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The family at OneTrainer's default sequence length, 512."""
    return load_family(f2_config(tmp_path_factory.mktemp("flux2-family"),
                                 text_encoder_sequence_length=None))


def test_the_loaded_family_is_flux2_klein(family):
    assert isinstance(family, Flux2Family)
    assert family.part_names == ("text_encoder", "transformer")
    assert family.checkpoint_architecture == "Flux.2"
    assert family.sample_inputs() == {"max_sequence_length": 512}
    assert family.facts.bucket_quantum == 16 and family.facts.flow_matching


def test_captions_are_chat_turns_without_thinking():
    tokenizer = build_tiny_qwen_tokenizer()
    assert chat_prompt(tokenizer, "a cat") == ("<|im_start|>user\na cat<|im_end|>\n"
                                               "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_encoding_is_the_pipelines(family, model_dir):
    """Layers 9, 18 and 27 side by side, every token: Flux2KleinPipeline.encode_prompt's."""
    ours = encode(family)["encoder_hidden_states"]
    pipe = base_pipeline(model_dir)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(list(CAPTIONS))
    assert ours.shape == theirs.shape == (2, 512, 48)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_latents_are_normalised_as_the_pipeline_does(family, model_dir):
    """The engine's latents (unpatched) are the pipeline's patched, batch-normalised latents."""
    pipe = base_pipeline(model_dir)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ours = family.vae.encode(pixels).latent_dist.mode()
        theirs = pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(patchify(ours), theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(unpatchify(patchify(ours)), ours)
    assert family.vae.config.scaling_factor == 1.0 and not family.vae.config.shift_factor


def test_prediction_is_the_transformer_on_patched_tokens_at_sigma(family):
    """predict = the transformer's output on the 2x2-patched, packed latents with the
    pipeline's own position ids and σ = t / 1000, unpatched again."""
    pipe = Flux2KleinPipeline  # its static helpers: the pipeline's conventions
    conditioning = encode(family)
    states = conditioning["encoder_hidden_states"]
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ours = family.predict(noisy, t, conditioning)
        patched = pipe._patchify_latents(noisy)
        out = family.parts["transformer"](
            hidden_states=pipe._pack_latents(patched), encoder_hidden_states=states,
            timestep=t / 1000, guidance=None, txt_ids=pipe._prepare_text_ids(states),
            img_ids=pipe._prepare_latent_ids(patched), return_dict=False)[0]
    want = pipe._unpatchify_latents(
        pipe._unpack_latents_with_ids(out, pipe._prepare_latent_ids(patched), 4, 4))
    assert torch.equal(ours, want)


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_caption_dropout_encodes_the_empty_caption(family, monkeypatch, probability):
    import random
    monkeypatch.setattr(family.config.text_encoder, "caption_dropout_probability", probability)
    clean, empty = encode(family), encode(family, [""])
    random.seed(0)
    dropped = family.caption_dropout(CAPTIONS, lambda c: encode(family, c))
    for i in range(len(CAPTIONS)):
        want = empty["encoder_hidden_states"][0] if probability else \
            clean["encoder_hidden_states"][i]
        torch.testing.assert_close(dropped["encoder_hidden_states"][i], want)


@pytest.mark.parametrize("side, tokens", [(128, 4096), (32, 256)])
def test_dynamic_shift_is_onetrainers(family, tmp_path, side, tokens):
    """OneTrainer's calculate_timestep_shift: the scheduler's constants on the 2x2 patches of
    the latents."""
    import math

    from trainer.models.objectives import FlowMatchingObjective
    config = f2_config(tmp_path, dynamic_timestep_shifting=True)
    objective = FlowMatchingObjective(family.noise_scheduler, config, packing=2,
                                      dynamic_shift=True)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    assert objective.shift(torch.zeros(1, 4, side, side)) == pytest.approx(math.exp(mu))
    assert family.objective.dynamic_shift  # the family shifts dynamically when asked


# --- refusals, DoRA, the CLI, Try it -----------------------------------------------------------

def test_training_the_qwen3_text_encoder_is_refused_naming_the_key():
    assert_text_encoder_training_is_refused("FLUX_2", "Qwen3")


@pytest.mark.parametrize("settings", [{"output_model_format": "KOHYA_LORA"},
                                      {"lora_layer_preset": "attn-mlp"}])
def test_what_flux2_lacks_is_refused_naming_the_key(settings):
    """No kohya layout; no attn-mlp preset (OneTrainer's are blocks and full; attn-only is
    Atelier's default)."""
    config = config_from_dict({"model_type": "FLUX_2", "lora_layer_preset": "blocks",
                               **settings})
    with pytest.raises(ConfigError, match=next(iter(settings))):
        check_supported(config)


def test_dora_trains_and_reloads_in_the_pipeline(tmp_path, model_dir):
    assert_dora_reloads(f2_config, tmp_path, 1, base_pipeline(model_dir), render, SAMPLE)


def test_make_tiny_model_writes_a_folder_the_pipeline_loads(tmp_path):
    out = tmp_path / "tiny-flux2"
    index = make_tiny_model("flux2", out, "Flux.2 klein")
    assert index["_class_name"] == "Flux2KleinPipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    # the same seed builds the same model
    assert_same_weights(base_pipeline(out).transformer.state_dict(),
                        base_pipeline(tiny_flux2_model()).transformer.state_dict())


def test_try_it_reads_a_flux2_lora_as_flux2(lora_run, tmp_path):
    _, result, _ = lora_run
    assert_try_it_reads(result.output_path, tmp_path, "FLUX_2")


def test_the_page_offers_flux2_with_its_sections_and_timestep_preview(model_dir):
    """The model list (from the registry) has it; its sections are a Transformer and one
    frozen Qwen3 encoder without clip skip or guidance; the timestep preview shows OneTrainer's
    preset defaults (logit-normal, dynamic shift from the model's scheduler: 1.88 at 512 px)."""
    from ui import fields as F
    from ui import timestep_preview
    assert "FLUX_2" in F.SPECS["model_type"].choices
    assert F.section_label("Text encoder", "FLUX_2") == "Text encoder (Qwen3)"
    shown = lambda key: F.applies(key, {"model_type": "FLUX_2", "training_method": "LORA"})
    assert shown("transformer.train") and shown("dynamic_timestep_shifting")
    assert not shown("text_encoder_2.train") and not shown("text_encoder.clip_skip")
    assert not shown("transformer.guidance_scale") and not shown("unet.train")
    config = config_from_dict({"model_type": "FLUX_2", "base_model_name": str(model_dir),
                               "dynamic_timestep_shifting": True, "resolution": "512",
                               "timestep_distribution": "LOGIT_NORMAL"})
    _, caption = timestep_preview.histogram_frame(config)
    assert caption.startswith("LOGIT_NORMAL, shift 1.88 (dynamic at 512×512"), caption
