"""SDXL end to end on the tiny SDXL model: its architecture, text encoding and time ids, real
LoRA trainings of both text encoders and the UNet, per-part switches, and the file reloading in
diffusers."""
import json
import pathlib
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer.loop import train
from trainer.models.family import load_family
from trainer.models.tiny import build_tiny_sdxl

from helpers import read_metrics, sdxl_config, train_sampling_at_the_end


def lora_keys(path):
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# --- The tiny model ----------------------------------------------------------------------------

def test_tiny_sdxl_has_sdxl_architecture(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    unet, vae = pipe.unet.config, pipe.vae.config
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert te2.hidden_size > te1.hidden_size  # diffusers' single-file reader tells them apart so
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert list(unet.transformer_layers_per_block) == [1, 2] and unet.use_linear_projection
    assert unet.down_block_types[0] == "DownBlock2D"  # SDXL's first block has no attention
    assert vae.scaling_factor == pytest.approx(0.13025) and vae.force_upcast
    assert 2 ** (len(vae.block_out_channels) - 1) == 8
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_tiny_sdxl_build_is_deterministic(tiny_sdxl_dir, tmp_path):
    again = build_tiny_sdxl(tmp_path / "again", seed=0)
    files = sorted(pathlib.Path(tiny_sdxl_dir).rglob("*.safetensors"))
    assert len(files) == 4  # unet, vae, text_encoder, text_encoder_2
    for a in files:
        assert a.read_bytes() == (again / a.relative_to(tiny_sdxl_dir)).read_bytes(), a


def test_make_tiny_model_sdxl_from_the_command_line(tmp_path, capsys):
    from trainer.cli import main
    assert main(["make-tiny-model", "sdxl", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "text_encoder_2" / "model.safetensors").is_file()
    assert "SDXL" in capsys.readouterr().out


# --- Text encoding and time ids ----------------------------------------------------------------

@pytest.fixture(scope="module")
def family(tiny_sdxl_dir, tmp_path_factory):
    return load_family(sdxl_config(tiny_sdxl_dir, tmp_path_factory.mktemp("f")))


def encode(family, captions, clip_skip=0):
    grad = {}
    with torch.no_grad():
        return family.encode_text(captions, {}, clip_skip=clip_skip, device=torch.device("cpu"),
                                  grad=grad)


def test_sdxl_text_encoding_concatenates_penultimate_states_and_pools_te2(family):
    c = family.components
    out = encode(family, ["a photo of a cat", "a dog"])
    hidden, pooled = out["encoder_hidden_states"], out["text_embeds"]
    assert hidden.shape == (2, 77, 32 + 64) and pooled.shape == (2, 32)
    with torch.no_grad():
        ids1 = c.tokenizer(["a photo of a cat"], padding="max_length", max_length=77,
                           return_tensors="pt").input_ids
        ids2 = c.tokenizer_2(["a photo of a cat"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        te1 = c.text_encoder(ids1, output_hidden_states=True)
        te2 = c.text_encoder_2(ids2, output_hidden_states=True)
    same = dict(rtol=0, atol=1e-6)  # a batch of 2 against a batch of 1: rounding only
    torch.testing.assert_close(hidden[0, :, :32], te1.hidden_states[-2][0], **same)  # TE1, penultimate
    torch.testing.assert_close(hidden[0, :, 32:], te2.hidden_states[-2][0], **same)  # TE2, penultimate
    torch.testing.assert_close(pooled[0], te2.text_embeds[0], **same)  # TE2's pooled projection
    assert (ids2[0] == 0).sum() > 60  # TE2's tokenizer pads with "!" (id 0)


def test_clip_skip_is_per_text_encoder(family):
    base = encode(family, ["a cat"])["encoder_hidden_states"]
    skip1 = encode(family, ["a cat"], clip_skip=1)["encoder_hidden_states"]
    assert not torch.equal(base[..., :32], skip1[..., :32])
    assert torch.equal(base[..., 32:], skip1[..., 32:])
    family.config.text_encoder_2.clip_skip = 1
    try:
        skip2 = encode(family, ["a cat"])["encoder_hidden_states"]
    finally:
        family.config.text_encoder_2.clip_skip = 0
    assert torch.equal(base[..., :32], skip2[..., :32])
    assert not torch.equal(base[..., 32:], skip2[..., 32:])


@pytest.mark.parametrize("p1, p2", [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_caption_dropout_zeroes_each_encoder_on_its_own(family, p1, p2):
    family.config.text_encoder.caption_dropout_probability = p1
    family.config.text_encoder_2.caption_dropout_probability = p2
    try:
        out = family.caption_dropout(["a cat", "a dog"], lambda c: encode(family, c))
    finally:
        family.config.text_encoder.caption_dropout_probability = 0.0
        family.config.text_encoder_2.caption_dropout_probability = 0.0
    full = encode(family, ["a cat", "a dog"])
    for part, dropped in ((slice(0, 32), p1 == 1), (slice(32, 96), p2 == 1)):
        got = out["encoder_hidden_states"][..., part]
        assert torch.count_nonzero(got) == 0 if dropped else torch.equal(
            got, full["encoder_hidden_states"][..., part])
    assert (torch.count_nonzero(out["text_embeds"]) == 0) == (p2 == 1)


def test_time_ids_come_from_each_samples_size_and_crop(family):
    batch = {"original_size": [(480, 640), (64, 64)], "crop_top_left": [(16, 0), (0, 8)]}
    conditioning = dict(encode(family, ["a", "b"]), **family.batch_conditioning(batch, "cpu"))
    latents = torch.zeros(2, 4, 8, 16)  # 64 x 128 px trained
    ids = family.time_ids(conditioning, latents)
    assert ids.tolist() == [[480, 640, 16, 0, 64, 128], [64, 64, 0, 8, 64, 128]]
    # and they reach the UNet: another crop gives another prediction
    t = torch.tensor([500, 500])
    with torch.no_grad():
        a = family.predict(latents, t, conditioning)
        moved = dict(conditioning, crop_top_left=torch.zeros(2, 2))
        b = family.predict(latents, t, moved)
    assert not torch.equal(a, b)


# --- Training ----------------------------------------------------------------------------------

def test_sdxl_lora_loss_falls_and_each_part_has_its_learning_rate(tiny_sdxl_dir, tmp_path):
    # 5 images, batch 2 -> 3 steps an epoch; 50 epochs = 150 steps.
    config = sdxl_config(tiny_sdxl_dir, tmp_path, epochs=50, lora_layer_preset="full",
                         text_encoder={"train": True, "learning_rate": 2e-3,
                                       "stop_training_after_unit": "NEVER"},
                         unet={"learning_rate": 5e-3})
    result = train(config)
    records = read_metrics(config)
    assert result.global_step == 150 and len(records) == 150
    first = np.mean([r["loss"] for r in records[:30]])
    last = np.mean([r["loss"] for r in records[-30:]])
    assert last < 0.75 * first, (first, last)
    assert records[0]["lr"] == {"text_encoder": 2e-3, "text_encoder_2": 1e-2, "unet": 5e-3}
    keys = lora_keys(result.output_path)
    for prefix in ("lora_unet_", "lora_te1_text_model_encoder_layers_",
                   "lora_te2_text_model_encoder_layers_"):
        assert any(k.startswith(prefix) for k in keys), prefix


@pytest.fixture(scope="module")
def trained_sdxl_lora(tiny_sdxl_dir, tmp_path_factory):
    """A short run of both TEs and the UNet that samples at its last step."""
    return train_sampling_at_the_end(sdxl_config, tiny_sdxl_dir,
                                     tmp_path_factory.mktemp("sdxl-lora"))


def test_sdxl_lora_file_is_kohya_with_sdxl_metadata(trained_sdxl_lora):
    config, result, _, _ = trained_sdxl_lora
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
        alphas = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
    assert all(k.startswith(("lora_unet_", "lora_te1_text_model_encoder_layers_",
                             "lora_te2_text_model_encoder_layers_",
                             "lora_te2_text_projection.")) for k in keys)
    assert "lora_te2_text_projection.lora_down.weight" in keys  # every linear layer of TE2
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    # the UNet by its original (SGM) names, as kohya and OneTrainer write SDXL LoRAs: the
    # second transformer layer of a block is there
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for k in keys)
    assert any(re.match(r"lora_unet_input_blocks_\d+_1_transformer_blocks_1_", k)
               for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert alphas and all(float(a) == 3.0 for a in alphas)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(metadata["atelier_config"]) == json.loads(config.to_json())


def _render(pipe, sample):
    generator = torch.Generator("cpu").manual_seed(sample["seed"])
    image = pipe(sample["prompt"], width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"], guidance_scale=sample["cfg_scale"],
                 generator=generator).images[0]
    return np.asarray(image, dtype=np.int16)


def test_sdxl_lora_reloads_in_diffusers_and_gives_the_trained_image(trained_sdxl_lora,
                                                                     tiny_sdxl_dir):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    _, result, events, sample = trained_sdxl_lora
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and samples[-1]["step"] == result.global_step
    trained = np.asarray(Image.open(samples[-1]["path"]), dtype=np.int16)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe, sample)
    pipe.load_lora_weights(result.output_path)
    reloaded = _render(pipe, sample)

    assert np.abs(reloaded - trained).max() <= 2        # the trained model's image
    assert np.abs(reloaded - base).mean() > 2           # and not the base model's


def test_part_switches_and_learning_rate_overrides_reach_the_optimizer(tiny_sdxl_dir, tmp_path):
    """TE1 off, TE2 on with its own LR, UNet off: one parameter group, TE2's, and a file with
    only TE2's adapters."""
    config = sdxl_config(tiny_sdxl_dir, tmp_path, epochs=1, learning_rate=1e-3,
                         text_encoder={"train": False},
                         text_encoder_2={"train": True, "learning_rate": 4e-4,
                                         "stop_training_after_unit": "NEVER"},
                         unet={"train": False, "learning_rate": 7e-4})
    result = train(config)
    assert {json.dumps(r["lr"]) for r in read_metrics(config)} == {'{"text_encoder_2": 0.0004}'}
    keys = lora_keys(result.output_path)
    assert keys and all(k.startswith("lora_te2_") for k in keys)


def test_text_encoder_2_stops_after_one_epoch(tiny_sdxl_dir, tmp_path):
    """TE2 'stop training after 1 EPOCH': its adapter after 2 epochs equals a 1-epoch run's,
    while TE1 and the UNet go on learning."""
    te2 = {"train": True, "stop_training_after": 1, "stop_training_after_unit": "EPOCH"}
    long_run = train(sdxl_config(tiny_sdxl_dir, tmp_path / "long", epochs=2, text_encoder_2=te2))
    short_run = train(sdxl_config(tiny_sdxl_dir, tmp_path / "short", epochs=1, text_encoder_2=te2))
    with safe_open(long_run.output_path, "pt") as fl, safe_open(short_run.output_path, "pt") as fs:
        te2_keys = [k for k in fl.keys() if k.startswith("lora_te2_")]
        others = [k for k in fl.keys() if k.startswith(("lora_te1_", "lora_unet_"))
                  and "lora_up" in k]
        assert te2_keys and all(torch.equal(fl.get_tensor(k), fs.get_tensor(k)) for k in te2_keys)
        assert any(not torch.equal(fl.get_tensor(k), fs.get_tensor(k)) for k in others)


def test_sdxl_model_refuses_an_sd15_folder(tiny_sd15_dir, tmp_path):
    from trainer.errors import ModelLoadError
    with pytest.raises(ModelLoadError, match="STABLE_DIFFUSION_15") as err:
        train(sdxl_config(tiny_sd15_dir, tmp_path))
    assert str(tiny_sd15_dir) in str(err.value)
