"""Z-Image (Z_IMAGE) on the tiny model: LoRA training, its DIFFUSERS_LORA file in diffusers'
ZImagePipeline reproducing the training sample, COMFY_LORA's names, fine-tune outputs (diffusers
folder, original single file), exact resume, masked training, the text encoding and prediction
as the pipeline does them, caption dropout, the refusals, OneTrainer's presets, the CLI."""
import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from flow_family_checks import (CAPTIONS, assert_another_transformer_file_is_refused,
                                assert_changed, assert_comfy_deltas_are_the_diffusers_ones,
                                assert_dora_reloads, assert_lora_reproduces_the_sample,
                                assert_text_encoder_training_is_refused, assert_try_it_reads,
                                encode, fine_tune, lora_files_of_both_formats, make_tiny_model,
                                pipeline_from, text_cache_entries, the_sample, train_with_events)
from helpers import (assert_black_masks_learn_nothing, assert_loss_falls, assert_same_weights,
                     resumed_equals_whole, tiny_config)
from trainer.config import check_supported, config_from_dict
from trainer.errors import ConfigError
from trainer.models.family import load_family
from trainer.models.tiny_z_image import build_tiny_qwen_tokenizer, tiny_z_image_model
from trainer.models.z_image import ZImageFamily, chat_prompt, to_original

SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}
EPOCHS = 30
# OneTrainer's Z-Image LoRA presets' layer filter (attn-mlp: the main blocks' attention and
# feed-forward, not the refiners'), as its files carry it.
ATTN_MLP = "^(?=.*attention)(?!.*refiner).*,^(?=.*feed_forward)(?!.*refiner).*"
OT_LAYERS = dict(lora_layer_preset="custom", layer_filter=ATTN_MLP, layer_filter_regex=True)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_z_image_model()


def z_config(tmp_path, **overrides):
    """A Z-Image LoRA run of seconds on OneTrainer's layers, DIFFUSERS_LORA."""
    data = dict(model_type="Z_IMAGE", text_encoder={"train": False},
                output_model_format="DIFFUSERS_LORA", lora_rank=8, lora_alpha=8.0, **OT_LAYERS)
    data.update(overrides)
    return tiny_config(tiny_z_image_model(), tmp_path, **data)


def base_pipeline(folder) -> ZImagePipeline:
    return pipeline_from(ZImagePipeline, folder)


def render(pipe: ZImagePipeline, sample=SAMPLE) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(sample["seed"])
    image = pipe(sample["prompt"], width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"],
                 guidance_scale=sample["cfg_scale"], generator=generator).images[0]
    return np.asarray(image).astype(np.float64)


# --- LoRA ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """30 epochs (90 steps) of LoRA (rank 8, alpha 8) on the demo photos at 64 px, sampling at
    the end."""
    tmp = tmp_path_factory.mktemp("z-image-lora")
    config = z_config(tmp, epochs=EPOCHS, samples=[SAMPLE], sample_after=EPOCHS,
                      sample_after_unit="EPOCH")
    return config, *train_with_events(config)


def test_lora_training_lowers_the_loss(lora_run):
    config, result, _ = lora_run
    # 5 photos: batches of 2, 2, 1; measured: 1.37 -> 1.07 (x0.78)
    assert_loss_falls(config, result, EPOCHS * 3, 0.85)


def test_the_lora_file_holds_onetrainers_layers_of_the_transformer(lora_run, model_dir):
    _, result, _ = lora_run
    with safe_open(result.output_path, "pt") as f:
        metadata, keys = f.metadata(), list(f.keys())
    assert metadata["ss_base_model_version"] == "z_image"
    assert metadata["modelspec.architecture"] == "Z-Image/lora"  # OneTrainer's id
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in keys}
    transformer = ZImageTransformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")
    linear = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    want = {n for n in linear if n.startswith("layers.") and
            (".attention." in n or ".feed_forward." in n)}
    assert modules == want  # the main blocks' attention and MLP; no refiner, no embedder
    assert {"layers.1.attention.to_q", "layers.0.feed_forward.w2"} <= modules


def test_diffusers_lora_reproduces_the_training_sample(lora_run, model_dir):
    _, result, events = lora_run
    assert_lora_reproduces_the_sample(base_pipeline(model_dir), render, result.output_path,
                                      the_sample(events))


def test_text_cache_keeps_the_padded_states_and_the_mask(lora_run):
    config, _, _ = lora_run
    entries = text_cache_entries(config)
    assert len(entries) == 5  # one per caption
    entry = load_file(str(entries[0]))
    assert set(entry) == {"encoder_hidden_states", "text_attention_mask"}
    assert entry["text_attention_mask"].dtype == torch.bool
    assert entry["encoder_hidden_states"].shape == (512, 32)  # 512 tokens x Qwen3's width
    assert 10 < int(entry["text_attention_mask"].sum()) < 512


def test_comfy_lora_names_diffusers_layers_under_diffusion_model(tmp_path):
    """COMFY_LORA: ComfyUI's Z-Image loader reads `diffusion_model.<diffusers layer>` and
    places q/k/v on its fused qkv itself (comfy/lora.py, comfy/utils.py z_image_to_diffusers),
    so each module's LoRA is written as trained: the same deltas as the DIFFUSERS_LORA file
    of the same run."""
    files = lora_files_of_both_formats(z_config, tmp_path)
    comfy = files["COMFY_LORA"]
    assert comfy and all(k.startswith("diffusion_model.layers.") for k in comfy)
    name = "diffusion_model.layers.0.attention.to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= set(comfy)
    assert_comfy_deltas_are_the_diffusers_ones(comfy, files["DIFFUSERS_LORA"])


def test_named_attn_mlp_preset_picks_onetrainers_layers(tmp_path):
    """lora_layer_preset attn-mlp is OneTrainer's regular expressions (what its Z-Image files
    carry); it must pick the layers the custom filter above picks."""
    from trainer.lora import denoiser_targets
    family = load_family(z_config(tmp_path))
    transformer = family.parts["transformer"]
    named = z_config(tmp_path, lora_layer_preset="attn-mlp", layer_filter="",
                     layer_filter_regex=False)
    assert denoiser_targets(transformer, named) == denoiser_targets(transformer,
                                                                    z_config(tmp_path))


# --- fine-tune -------------------------------------------------------------------------------

def test_fine_tune_diffusers_folder_reloads_to_the_trained_weights(model_dir, tmp_path,
                                                                   monkeypatch):
    path, trained = fine_tune(z_config, tmp_path, "DIFFUSERS", monkeypatch)
    pipe = base_pipeline(path)
    assert type(pipe) is ZImagePipeline
    assert_same_weights(pipe.transformer.state_dict(), trained)
    assert_changed(trained, base_pipeline(model_dir).transformer.state_dict())
    assert pipe.tokenizer.chat_template  # the tokenizer keeps its template


def test_fine_tune_original_single_file_reads_back_bit_identical(model_dir, tmp_path,
                                                                 monkeypatch):
    """The original layout (fused qkv, q_norm/k_norm, out, final_layer, x_embedder: what
    ComfyUI loads), read back by diffusers' own single-file converter, and as a run's
    transformer file (transformer.model_name) beside the base folder."""
    path, trained = fine_tune(z_config, tmp_path, "ORIGINAL_SINGLE_FILE", monkeypatch)
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    assert {"layers.0.attention.qkv.weight", "layers.0.attention.q_norm.weight",
            "layers.0.attention.out.weight", "final_layer.linear.weight",
            "x_embedder.weight", "noise_refiner.0.attention.qkv.weight"} <= set(keys)
    assert not any(".to_q." in k or k.startswith("all_") for k in keys)
    loaded = ZImageTransformer2DModel.from_single_file(
        path, config=str(model_dir), subfolder="transformer", local_files_only=True)
    assert_same_weights(loaded.state_dict(), trained)
    config = z_config(tmp_path / "next", transformer={"model_name": str(path)})
    assert_same_weights(load_family(config).parts["transformer"].state_dict(), trained)
    # a file of diffusers' names (OneTrainer's ORIGINAL_TRANSFORMER for Z-Image) loads too
    from safetensors.torch import save_file
    named = tmp_path / "diffusers-names.safetensors"
    save_file(trained, str(named))
    config = z_config(tmp_path / "named", transformer={"model_name": str(named)})
    assert_same_weights(load_family(config).parts["transformer"].state_dict(), trained)


def test_to_original_fuses_q_k_v_in_order():
    state = {f"layers.0.attention.to_{p}.weight": torch.full((2, 3), float(i))
             for i, p in enumerate("qkv")}
    fused = to_original(state)["layers.0.attention.qkv.weight"]
    assert fused[:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_a_transformer_file_of_another_kind_is_refused_naming_the_key(tmp_path):
    assert_another_transformer_file_is_refused(z_config, tmp_path,
                                               "double_blocks.0.img_attn.qkv.weight")


# --- resume, masks -----------------------------------------------------------------------------

def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    steps = resumed_equals_whole(z_config, tmp_path, 2, epochs=2,
                                 timestep_distribution="LOGIT_NORMAL",
                                 dynamic_timestep_shifting=True)
    assert steps == 6


def test_masked_training_with_black_masks_learns_nothing(tmp_path):
    assert_black_masks_learn_nothing(z_config, tmp_path, epochs=2)


# --- the family directly: encoding and prediction as ZImagePipeline does them -----------------

@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return load_family(z_config(tmp_path_factory.mktemp("z-image-family")))


def test_the_loaded_family_is_z_image(family):
    assert isinstance(family, ZImageFamily)
    assert family.part_names == ("text_encoder", "transformer")
    assert family.checkpoint_architecture == "Z-Image"
    assert family.sample_inputs() == {"max_sequence_length": 512}
    assert family.facts.bucket_quantum == 16 and family.facts.flow_matching


def test_captions_are_chat_turns():
    tokenizer = build_tiny_qwen_tokenizer()
    assert chat_prompt(tokenizer, "a cat") == \
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"


def test_encoding_is_the_pipelines(family, model_dir):
    """Each caption's states without padding equal ZImagePipeline.encode_prompt's."""
    from trainer.models.z_image import caption_states
    ours = caption_states(encode(family), torch.float32)
    pipe = base_pipeline(model_dir)
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(list(CAPTIONS), do_classifier_free_guidance=False)
    assert [t.shape[0] for t in ours] == [t.shape[0] for t in theirs]
    assert ours[0].shape[0] < ours[1].shape[0] < 512
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prediction_is_the_negated_transformer_output_at_one_minus_t(family):
    """predict = −transformer(latents, (1000 − t)/1000, captions): the velocity ε − x₀ the
    pipeline's scheduler steps with (it negates the output too)."""
    from trainer.models.z_image import caption_states
    conditioning = encode(family)
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ours = family.predict(noisy, t, conditioning)
        out = family.parts["transformer"](list(noisy.unsqueeze(2).unbind(0)),
                                           torch.tensor([0.3, 0.7]),
                                           caption_states(conditioning, torch.float32),
                                           return_dict=False)[0]
    assert torch.equal(ours, -torch.stack(out).squeeze(2))
    # each sample's prediction is its own: a batch of one predicts the same
    with torch.no_grad():
        alone = family.predict(noisy[:1], t[:1], {k: v[:1] for k, v in conditioning.items()})
    torch.testing.assert_close(alone, ours[:1], rtol=1e-5, atol=1e-6)


def test_the_padding_changes_nothing(family):
    """The caption's padded states never reach the transformer: scrambled, the same."""
    conditioning = encode(family)
    states = conditioning["encoder_hidden_states"].clone()
    states[~conditioning["text_attention_mask"]] = 1e3
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        a = family.predict(noisy, t, conditioning)
        b = family.predict(noisy, t, {**conditioning, "encoder_hidden_states": states})
    assert torch.equal(a, b)


@pytest.mark.parametrize("probability", [0.0, 0.5, 1.0])
def test_caption_dropout_encodes_the_empty_caption(family, monkeypatch, probability):
    """A dropped caption is the empty one, the pipeline's unconditional input (its chat turn,
    not zeros)."""
    import random
    monkeypatch.setattr(family.config.text_encoder, "caption_dropout_probability", probability)
    captions = CAPTIONS * 4
    clean, empty = encode(family, captions), encode(family, [""])
    random.seed(0)
    dropped = family.caption_dropout(captions, lambda c: encode(family, c))
    was_dropped = []
    for i in range(len(captions)):
        same_as_empty = torch.equal(dropped["text_attention_mask"][i],
                                    empty["text_attention_mask"][0])
        if same_as_empty:
            torch.testing.assert_close(dropped["encoder_hidden_states"][i],
                                       empty["encoder_hidden_states"][0])
        else:
            assert torch.equal(dropped["encoder_hidden_states"][i],
                               clean["encoder_hidden_states"][i])
        was_dropped.append(same_as_empty)
    assert int(empty["text_attention_mask"].sum()) > 0  # the empty turn still has tokens
    expected = {0.0: 0, 1.0: len(captions)}.get(probability)
    if expected is None:
        assert 0 < sum(was_dropped) < len(captions)
    else:
        assert sum(was_dropped) == expected


# --- refusals, OneTrainer's presets, the CLI ---------------------------------------------------

def test_training_the_qwen3_text_encoder_is_refused_naming_the_key():
    assert_text_encoder_training_is_refused("Z_IMAGE", "Qwen3")


@pytest.mark.parametrize("fmt", ["KOHYA_LORA", "LEGACY_LORA"])
def test_kohya_formats_are_refused_naming_the_key(fmt):
    config = config_from_dict({"model_type": "Z_IMAGE", "output_model_format": fmt})
    with pytest.raises(ConfigError, match="output_model_format"):
        check_supported(config)


def test_make_tiny_model_writes_a_folder_the_pipeline_loads(tmp_path):
    out = tmp_path / "tiny-z"
    index = make_tiny_model("z-image", out, "Z-Image")
    assert index["_class_name"] == "ZImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    pipe = base_pipeline(out)
    # the same seed builds the same model
    assert_same_weights(pipe.transformer.state_dict(),
                        base_pipeline(tiny_z_image_model()).transformer.state_dict())


@pytest.mark.parametrize("side, tokens", [(128, 4096), (64, 1024), (32, 256)])
def test_dynamic_shift_is_onetrainers_on_the_schedulers_default_constants(tmp_path, side, tokens):
    """Z-Image's scheduler config names no shift constants: the resolution-dependent shift uses
    FlowMatchEulerDiscreteScheduler's defaults (256 → 0.5, 4096 → 1.15) on 2x2 patches, as
    OneTrainer's Z-Image model computes it; off, the constant timestep_shift applies."""
    import math
    latents = torch.zeros(1, 4, side, side)
    family = load_family(z_config(tmp_path, dynamic_timestep_shifting=True))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
    assert family.objective.shift(latents) == pytest.approx(math.exp(mu), rel=1e-9)
    fixed = load_family(z_config(tmp_path, timestep_shift=3.0))
    assert fixed.objective.shift(latents) == 3.0


def test_dora_trains_and_reloads_in_the_pipeline(tmp_path, model_dir):
    assert_dora_reloads(z_config, tmp_path, 2, base_pipeline(model_dir), render, SAMPLE)


def test_try_it_reads_a_z_image_lora_as_z_image(lora_run, tmp_path):
    _, result, _ = lora_run
    assert_try_it_reads(result.output_path, tmp_path, "Z_IMAGE")
