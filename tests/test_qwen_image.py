"""Qwen-Image (QWEN) on the tiny model: LoRA training, its DIFFUSERS_LORA file in diffusers'
QwenImagePipeline reproducing the training sample, COMFY_LORA's names, fine-tune outputs
(diffusers folder, single file), exact resume, masked training, the text encoding, latents and
prediction as the pipeline and OneTrainer do them, caption dropout, the refusals, Try it, the
CLI. OneTrainer's Qwen presets are checked field by field with the other presets
(tests/test_onetrainer.py) and trained in tests/test_onetrainer_flow.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flow_family_checks import (CAPTIONS, assert_another_transformer_file_is_refused,
                                assert_changed, assert_comfy_deltas_are_the_diffusers_ones,
                                assert_dora_reloads, assert_lora_reproduces_the_sample,
                                assert_text_encoder_training_is_refused, assert_try_it_reads,
                                encode, fine_tune, lora_files_of_both_formats, make_tiny_model,
                                pipeline_from, text_cache_entries, the_sample, train_with_events)
from helpers import (assert_black_masks_learn_nothing, assert_loss_falls, assert_same_weights,
                     resumed_equals_whole, tiny_config)
from trainer.config import check_supported, config_from_dict
from trainer.errors import ConfigError, ModelLoadError
from trainer.models.family import load_family
from trainer.models.qwen_image import (PROMPT_TEMPLATE, TEMPLATE_TOKENS, QwenImageFamily,
                                       batch_captions, pack, unpack)
from trainer.models.tiny_qwen_image import build_tiny_qwen25_tokenizer, tiny_qwen_image_model

SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}
EPOCHS = 30


@pytest.fixture(scope="module")
def model_dir():
    return tiny_qwen_image_model()


def qwen_config(tmp_path, **overrides):
    """A Qwen-Image LoRA run of seconds on OneTrainer's attn-mlp layers, DIFFUSERS_LORA."""
    data = dict(model_type="QWEN", text_encoder={"train": False},
                output_model_format="DIFFUSERS_LORA", lora_rank=8, lora_alpha=8.0,
                lora_layer_preset="attn-mlp")
    data.update(overrides)
    return tiny_config(tiny_qwen_image_model(), tmp_path, **data)


def base_pipeline(folder) -> QwenImagePipeline:
    return pipeline_from(QwenImagePipeline, folder)


def render(pipe: QwenImagePipeline, sample=SAMPLE) -> np.ndarray:
    """The sample as a user draws it: true CFG on the empty negative prompt."""
    generator = torch.Generator("cpu").manual_seed(sample["seed"])
    image = pipe(sample["prompt"], negative_prompt="", true_cfg_scale=sample["cfg_scale"],
                 width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"], max_sequence_length=512,
                 generator=generator).images[0]
    return np.asarray(image).astype(np.float64)


# --- LoRA ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """30 epochs (90 steps) of LoRA (rank 8, alpha 8) on the demo photos at 64 px, sampling at
    the end."""
    tmp = tmp_path_factory.mktemp("qwen-lora")
    config = qwen_config(tmp, epochs=EPOCHS, samples=[SAMPLE],
                         sample_after=EPOCHS, sample_after_unit="EPOCH")
    return config, *train_with_events(config)


def test_lora_training_lowers_the_loss(lora_run):
    config, result, _ = lora_run
    # 5 photos: batches of 2, 2, 1; measured: 1.40 -> 1.16 (x0.83); a tiny model's loss is
    # mostly the drawn timesteps'
    assert_loss_falls(config, result, EPOCHS * 3, 0.9)


def test_the_lora_file_holds_onetrainers_attn_mlp_layers(lora_run, model_dir):
    _, result, _ = lora_run
    with safe_open(result.output_path, "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_base_model_version"] == "qwen_image"
    assert metadata["modelspec.architecture"] == "Qwen-Image/lora"  # OneTrainer's id
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in keys}
    transformer = QwenImageTransformer2DModel.from_pretrained(str(model_dir),
                                                              subfolder="transformer")
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    # OneTrainer's attn-mlp: names containing attn, img_mlp or txt_mlp
    assert modules == {n for n in linear if any(p in n for p in ("attn", "img_mlp", "txt_mlp"))}
    assert {"transformer_blocks.1.attn.add_q_proj", "transformer_blocks.0.img_mlp.net.2",
            "transformer_blocks.0.txt_mlp.net.0.proj"} <= modules
    assert not any("img_mod" in m or m.startswith(("img_in", "txt_in")) for m in modules)


def test_diffusers_lora_reproduces_the_training_sample(lora_run, model_dir):
    _, result, events = lora_run
    assert_lora_reproduces_the_sample(base_pipeline(model_dir), render, result.output_path,
                                      the_sample(events))


def test_text_cache_keeps_the_captions_states_and_mask(lora_run):
    config, _, _ = lora_run
    entries = text_cache_entries(config)
    assert len(entries) == 5  # one per caption
    entry = load_file(str(entries[0]))
    assert set(entry) == {"encoder_hidden_states", "text_attention_mask"}
    assert entry["text_attention_mask"].dtype == torch.bool
    assert entry["encoder_hidden_states"].shape == (512, 32)  # 512 tokens x the encoder's width
    kept = entry["text_attention_mask"]
    assert 3 < int(kept.sum()) < 512 and not entry["encoder_hidden_states"][~kept].any()


def test_comfy_lora_names_diffusers_layers_under_diffusion_model(tmp_path):
    """COMFY_LORA: ComfyUI's Qwen-Image model has diffusers' module names, which comfy/lora.py
    reads as 'diffusion_model.<module>': the same deltas as the DIFFUSERS_LORA file."""
    files = lora_files_of_both_formats(qwen_config, tmp_path)
    comfy = files["COMFY_LORA"]
    assert comfy and all(k.startswith("diffusion_model.transformer_blocks.") for k in comfy)
    name = "diffusion_model.transformer_blocks.0.attn.to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(comfy)
    assert_comfy_deltas_are_the_diffusers_ones(comfy, files["DIFFUSERS_LORA"])


def test_dora_trains_and_reloads_in_the_pipeline(tmp_path, model_dir):
    assert_dora_reloads(qwen_config, tmp_path, 1, base_pipeline(model_dir), render, SAMPLE)


def test_try_it_reads_a_qwen_image_lora_as_qwen_image(lora_run, tmp_path):
    """Its header and its layer names name the family (assert_try_it_reads); a file of
    attention layers alone may be SD 3's too."""
    from trainer.try_lora import read_lora
    _, result, _ = lora_run
    tensors = assert_try_it_reads(result.output_path, tmp_path, "QWEN")
    # attention only: SD 3's diffusers names too; the page's model type picks among them
    attention = {k: v for k, v in tensors.items() if ".attn." in k}
    save_file(attention, str(tmp_path / "attn.safetensors"))
    assert "QWEN" in read_lora(tmp_path / "attn.safetensors").fits


# --- fine-tune -------------------------------------------------------------------------------

def test_fine_tune_diffusers_folder_reloads_to_the_trained_weights(model_dir, tmp_path,
                                                                   monkeypatch):
    path, trained = fine_tune(qwen_config, tmp_path, "DIFFUSERS", monkeypatch)
    index = json.loads((Path(path) / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"  # not the sampling subclass
    pipe = base_pipeline(path)
    assert_same_weights(pipe.transformer.state_dict(), trained)
    assert_changed(trained, base_pipeline(model_dir).transformer.state_dict())
    assert type(pipe.vae).__name__ == "AutoencoderKLQwenImage"


def test_fine_tune_single_file_reads_back_bit_identical(model_dir, tmp_path, monkeypatch):
    """The transformer alone under its own names (ComfyUI detects Qwen-Image by txt_norm),
    read back by diffusers' from_single_file and as a run's transformer file."""
    path, trained = fine_tune(qwen_config, tmp_path, "ORIGINAL_SINGLE_FILE", monkeypatch)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert {"txt_norm.weight", "img_in.weight", "transformer_blocks.0.attn.to_q.weight"} <= keys
    loaded = QwenImageTransformer2DModel.from_single_file(
        str(path), config=str(model_dir), subfolder="transformer", local_files_only=True)
    assert_same_weights(loaded.state_dict(), trained)
    config = qwen_config(tmp_path / "next", transformer={"model_name": str(path)})
    assert_same_weights(load_family(config).parts["transformer"].state_dict(), trained)
    # ComfyUI's saved checkpoints prefix the names: read too
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in trained.items()}, str(prefixed))
    config = qwen_config(tmp_path / "prefixed", transformer={"model_name": str(prefixed)})
    assert_same_weights(load_family(config).parts["transformer"].state_dict(), trained)


def test_a_transformer_file_of_another_kind_is_refused_naming_the_key(tmp_path):
    assert_another_transformer_file_is_refused(qwen_config, tmp_path,
                                               "double_blocks.0.img_attn.qkv.weight")


# --- resume, masks -----------------------------------------------------------------------------

def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    steps = resumed_equals_whole(qwen_config, tmp_path, 2, epochs=2,
                                 timestep_distribution="LOGIT_NORMAL",
                                 dynamic_timestep_shifting=True)
    assert steps == 6


def test_masked_training_with_black_masks_learns_nothing(tmp_path):
    assert_black_masks_learn_nothing(qwen_config, tmp_path, epochs=1)


# --- the family directly: encoding, latents and prediction as the pipeline does them ---------

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return load_family(qwen_config(tmp_path_factory.mktemp("qwen-family")))


def test_the_loaded_family_is_qwen_image(family):
    assert isinstance(family, QwenImageFamily)
    assert family.part_names == ("text_encoder", "transformer")
    assert family.checkpoint_architecture == "Qwen-Image"
    assert family.sample_inputs() == {"max_sequence_length": 512}
    assert family.facts.bucket_quantum == 16 and family.facts.flow_matching
    assert family.vae_scale_factor == 8


def test_the_template_system_turn_is_34_tokens_as_with_qwens_tokenizer():
    """The pipeline and OneTrainer cut 34 tokens: the tiny tokenizer keeps them the system
    turn, so the states start at the caption."""
    tokenizer = build_tiny_qwen25_tokenizer()
    ids = tokenizer(PROMPT_TEMPLATE.format("a cat")).input_ids
    assert tokenizer.decode(ids[:TEMPLATE_TOKENS]).endswith("<|im_start|>user\n")
    assert tokenizer.decode(ids[TEMPLATE_TOKENS:]).startswith("a cat<|im_end|>")


def test_encoding_is_the_pipelines(family, model_dir):
    """The caption states (cut to the batch's longest) and mask equal QwenImagePipeline's."""
    states, mask = batch_captions(encode(family), torch.float32)
    pipe = base_pipeline(model_dir)
    with torch.no_grad():
        theirs, their_mask = pipe.encode_prompt(list(CAPTIONS))
    assert states.shape == theirs.shape and states.shape[1] < 512
    assert torch.equal(mask.long(), their_mask)
    torch.testing.assert_close(states, theirs, rtol=1e-5, atol=1e-6)


def test_latents_are_normalised_per_channel_as_onetrainer_scales_them(family):
    """The engine's latent = (VAE latent − latents_mean) / latents_std per channel (OneTrainer's
    scale_latents), on the VAE's own frame axis of one."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    vae = family.vae.vae
    with torch.no_grad():
        ours = family.vae.encode(image).latent_dist
        dist = vae.encode(image.unsqueeze(2)).latent_dist
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert ours.mean.shape == (1, 4, 4, 4)
    torch.testing.assert_close(ours.mean, ((dist.mean - mean) / std).squeeze(2))
    torch.testing.assert_close(ours.std, (dist.std / std).squeeze(2))
    assert family.vae.config.scaling_factor == 1.0 and not family.vae.config.shift_factor


def test_prediction_is_the_transformers_velocity_at_t_over_1000(family):
    """predict = unpack(transformer(pack(latents), t/1000, states, mask)): the velocity ε − x₀
    itself, as the pipeline steps with it; each sample's own, whatever its batch."""
    conditioning = encode(family)
    states, mask = batch_captions(conditioning, torch.float32)
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ours = family.predict(noisy, t, conditioning)
        out = family.parts["transformer"](
            hidden_states=pack(noisy), timestep=t / 1000, encoder_hidden_states=states,
            encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False)[0]
        alone = family.predict(noisy[:1], t[:1], {k: v[:1] for k, v in conditioning.items()})
    assert torch.equal(ours, unpack(out, 8, 8))
    torch.testing.assert_close(alone, ours[:1], rtol=1e-5, atol=1e-5)
    assert torch.equal(unpack(pack(noisy), 8, 8), noisy)


def test_a_batch_of_whole_captions_runs_unmasked(family):
    """Captions of one length: no padding in the batch, no mask (attention unmasked)."""
    conditioning = encode(family, ["a cat", "a cat"])
    states, mask = batch_captions(conditioning, torch.float32)
    assert mask is None and states.shape[1] == int(conditioning["text_attention_mask"][0].sum())


@pytest.mark.parametrize("probability", [0.0, 1.0])
def test_caption_dropout_encodes_the_empty_caption(family, monkeypatch, probability):
    monkeypatch.setattr(family.config.text_encoder, "caption_dropout_probability", probability)
    dropped = family.caption_dropout(CAPTIONS, lambda c: encode(family, c))
    want = encode(family, [""] * 2 if probability else CAPTIONS)
    for key in want:
        assert torch.equal(dropped[key], want[key])


def test_sampling_guides_with_true_cfg_on_the_empty_negative_prompt(family, monkeypatch):
    calls = []
    monkeypatch.setattr(QwenImagePipeline, "__call__",
                        lambda self, prompt, **kw: calls.append((prompt, kw)))
    pipe = family.pipeline()
    pipe("a cat", negative_prompt=None, guidance_scale=3.0)
    pipe("a cat", negative_prompt="blurry", guidance_scale=1.0)
    assert calls[0][1]["negative_prompt"] == "" and calls[0][1]["true_cfg_scale"] == 3.0
    assert calls[1][1]["negative_prompt"] is None and calls[1][1]["true_cfg_scale"] == 1.0


@pytest.mark.parametrize("side, tokens", [(128, 4096), (32, 256)])
def test_dynamic_shift_uses_qwen_images_scheduler_constants(tmp_path, side, tokens):
    """OneTrainer's calculate_timestep_shift on 2x2 patches with the scheduler config's
    constants (0.5 at 256 tokens, 0.9 at 8192); off, the constant timestep_shift."""
    import math
    latents = torch.zeros(1, 4, side, side)
    family = load_family(qwen_config(tmp_path, dynamic_timestep_shifting=True))
    mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (tokens - 256)
    assert family.objective.shift(latents) == pytest.approx(math.exp(mu), rel=1e-9)
    fixed = load_family(qwen_config(tmp_path, timestep_shift=3.0))
    assert fixed.objective.shift(latents) == 3.0


def test_the_page_offers_qwen_image_with_its_sections_and_timestep_preview(model_dir):
    """The model list (from the registry) has it; its sections are a Transformer and one
    frozen Qwen2.5-VL encoder without clip skip; the timestep preview reads the model's
    scheduler (Qwen-Image's constants: shift 2.0 at 1024 px, where Flux.1's give 3.16)."""
    from ui import fields as F
    from ui import timestep_preview
    assert "QWEN" in F.SPECS["model_type"].choices
    shown = lambda key: F.applies(key, {"model_type": "QWEN", "training_method": "LORA"})
    assert shown("transformer.train") and shown("dynamic_timestep_shifting")
    assert not shown("text_encoder_2.train") and not shown("text_encoder.clip_skip")
    assert not shown("transformer.guidance_scale")
    config = config_from_dict({"model_type": "QWEN", "base_model_name": str(model_dir),
                               "dynamic_timestep_shifting": True, "resolution": "1024",
                               "timestep_distribution": "LOGIT_NORMAL"})
    _, caption = timestep_preview.histogram_frame(config)
    assert caption.startswith("LOGIT_NORMAL, shift 2 (dynamic at 1024×1024, the base model's"), \
        caption


# --- refusals, the CLI -------------------------------------------------------------------------

def test_training_the_text_encoder_is_refused_naming_the_key():
    assert_text_encoder_training_is_refused("QWEN", "Qwen2.5-VL")


@pytest.mark.parametrize("fmt", ["KOHYA_LORA", "LEGACY_LORA"])
def test_kohya_formats_are_refused_naming_the_key(fmt):
    config = config_from_dict({"model_type": "QWEN", "output_model_format": fmt})
    with pytest.raises(ConfigError, match="output_model_format"):
        check_supported(config)


def test_another_vae_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match="vae_model_name"):
        load_family(qwen_config(tmp_path, vae_model_name=str(tmp_path)))


def test_make_tiny_model_writes_a_folder_the_pipeline_loads(tmp_path):
    out = tmp_path / "tiny-qwen"
    index = make_tiny_model("qwen", out, "Qwen-Image")
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert_same_weights(base_pipeline(out).transformer.state_dict(),
                        base_pipeline(tiny_qwen_image_model()).transformer.state_dict())
