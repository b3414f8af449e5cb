"""Additional embeddings (pivotal tuning with a LoRA) and textual inversion (EMBEDDING) on the
tiny models: the placeholder's tokens, training, the files and their layouts, diffusers'
loader, the norm, resume, and what is refused."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer.config import config_from_dict
from trainer.control import Control
from trainer.errors import ConfigError
from trainer.loop import train

from helpers import read_metrics, same_trained, sdxl_config, stop_at, tiny_config


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def two_colour_dir(tmp_path_factory):
    """A distinctive concept: the same red-and-blue picture, four times, for the embedding to
    learn (a random tiny model has little else to tell apart)."""
    folder = tmp_path_factory.mktemp("two-colour")
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[:, :32], picture[:, 32:] = (230, 40, 30), (20, 60, 220)
    for i in range(4):
        Image.fromarray(picture).save(folder / f"{i}.png")
    return folder


TI = {"placeholder": "<zq>", "token_count": 2, "initial_embedding_text": "photo"}


def ti_config(model_dir, tmp_path, concept_dir, **overrides):
    data = dict(training_method="EMBEDDING", additional_embeddings=[TI], batch_size=4,
                concepts=[{"path": str(concept_dir), "prompt_source": "concept",
                           "prompt": "<zq>"}],
                learning_rate=0.1, clip_grad_norm=None, min_noising_strength=0.3,
                max_noising_strength=0.7)
    data.update(overrides)
    return tiny_config(model_dir, tmp_path, **data)


@pytest.fixture(scope="module")
def ti_run(tiny_sd15_dir, two_colour_dir, tmp_path_factory):
    config = ti_config(tiny_sd15_dir, tmp_path_factory.mktemp("ti"), two_colour_dir, epochs=24)
    events = []
    result = train(config, Control(on_event=events.append))
    return config, result, events


def fixed_loss(config, images_dir, vectors_file=None):
    """The model's loss on the concept's images with fixed noise and timesteps, with the
    embedding's starting vectors or those of `vectors_file`: a noise-free measure of what the
    embedding learned."""
    from trainer.embeddings import AdditionalEmbeddings
    from trainer.models.family import load_family
    embedding = config.additional_embeddings[0].model_copy(
        update={"model_name": str(vectors_file or "")})
    config = config.model_copy(update={"additional_embeddings": [embedding]})
    family = load_family(config)
    AdditionalEmbeddings(family, config, torch.device("cpu"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 127.5 - 1)
                          .permute(2, 0, 1) for p in sorted(images_dir.glob("*.png"))])
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        latents = family.vae.encode(pixels).latent_dist.mean * family.vae.config.scaling_factor
        conditioning = family.encode_text(["<zq>"] * len(pixels), {}, clip_skip=0,
                                          device=torch.device("cpu"), grad={})
        for t in (300, 400, 500, 600, 700):
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.full((len(pixels),), t)
            noisy = family.noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = family.predict(noisy, timesteps, conditioning)
            total += torch.nn.functional.mse_loss(prediction, noise).item()
    return total / 5


def test_textual_inversion_trains_only_the_embedding_and_its_loss_falls(ti_run, two_colour_dir):
    config, result, events = ti_run
    assert result.output_path.endswith("embedding.safetensors") and result.global_step == 24
    saved = tensors(result.output_path)
    assert list(saved) == ["emb_params"] and saved["emb_params"].shape == (2, 32)
    # only the embeddings' group trained, at the base LR (embedding_learning_rate empty)
    assert {tuple(r["lr"]) for r in read_metrics(config)} == {("embeddings",)}
    messages = [e["message"] for e in events if e["type"] == "status"]
    assert any("outputs are not cached" in m and "embeddings" in m for m in messages)
    assert any("model stays frozen" in m for m in messages)
    before = fixed_loss(config, two_colour_dir)
    after = fixed_loss(config, two_colour_dir, result.output_path)
    assert after < before * 0.99, (before, after)


def test_the_standalone_embedding_loads_in_diffusers(ti_run, tiny_sd15_dir):
    """diffusers' load_textual_inversion(path, token=...) reads the file: a prompt with the
    placeholder draws another image, a prompt without it the same one."""
    from diffusers import StableDiffusionPipeline
    _, result, _ = ti_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def draw(prompt):
        return pipe(prompt, num_inference_steps=2, width=64, height=64, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(1), output_type="np").images[0]

    plain = {p: draw(p) for p in ("a photo of <zq>", "a photo of a cat")}
    pipe.load_textual_inversion(result.output_path, token="<zq>")
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer)
    assert np.abs(draw("a photo of <zq>") - plain["a photo of <zq>"]).max() > 1e-3
    assert np.abs(draw("a photo of a cat") - plain["a photo of a cat"]).max() <= 1e-5


def test_captions_with_the_placeholder_expand_to_its_tokens(tiny_sd15_dir, tmp_path):
    from trainer.embeddings import AdditionalEmbeddings
    from trainer.models.family import load_family, tokenize
    config = tiny_config(tiny_sd15_dir, tmp_path, additional_embeddings=[
        {"placeholder": "<zq>", "token_count": 3}, {"placeholder": "<w>", "token_count": 1}])
    family = load_family(config)
    tokenizer = family.components.tokenizer
    vocabulary = len(tokenizer)
    AdditionalEmbeddings(family, config, torch.device("cpu"))
    ids = tokenize(tokenizer, ["a photo of <zq> with <w>", "a photo"], "cpu")
    new = [i for i in ids[0].tolist() if i >= vocabulary]
    assert new == [vocabulary, vocabulary + 1, vocabulary + 2, vocabulary + 3]
    assert not (ids[1] >= vocabulary).any()
    # and the encoder reads the new ids from the vectors
    embedding = family.parts["text_encoder"].get_input_embeddings()
    assert torch.equal(embedding(torch.tensor([vocabulary + 3]))[0], embedding.vectors[1][0])


def test_preserve_embedding_norm_keeps_the_vocabulary_median(tiny_sd15_dir, two_colour_dir,
                                                             tmp_path):
    from trainer.models.family import load_family
    config = ti_config(tiny_sd15_dir, tmp_path, two_colour_dir, epochs=2,
                       preserve_embedding_norm=True)
    saved = tensors(train(config).output_path)["emb_params"]
    matrix = load_family(config).parts["text_encoder"].get_input_embeddings().weight
    median = matrix.detach().norm(dim=1).median()
    assert torch.allclose(saved.norm(dim=1), median.expand(2), atol=1e-5)
    # the vectors moved from their start ("photo"), which has another norm
    start = matrix[family_tokens(config, "photo")[:2]]
    assert not torch.allclose(start.norm(dim=1), median.expand(2), atol=1e-3)


def family_tokens(config, text):
    from trainer.models.family import load_family
    return load_family(config).components.tokenizer(text, add_special_tokens=False).input_ids


PIVOTAL = [{"placeholder": "<zq>", "token_count": 2, "initial_embedding_text": "woman"},
           {"placeholder": "<ww>", "token_count": 1, "train": False}]


def test_pivotal_tuning_on_sd15_writes_the_lora_with_its_embeddings(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, additional_embeddings=PIVOTAL,
                         embedding_learning_rate=0.003,
                         samples=[{"prompt": "a <zq> and <ww>", "width": 64, "height": 64,
                                   "diffusion_steps": 2}], sample_after=1,
                         sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    assert not [e for e in events if e["type"] == "warning" and "Sampling" in e["message"]]
    lora = tensors(result.output_path)
    bundle = {k: v.shape for k, v in lora.items() if k.startswith("bundle_emb.")}
    assert bundle == {"bundle_emb.<zq>.clip_l": (2, 32),
                      "bundle_emb.<ww>.clip_l": (1, 32)}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in lora if k not in bundle)
    out = tmp_path / "ws" / "output"
    first, second = tensors(out / "lora-zq.safetensors"), tensors(out / "lora-ww.safetensors")
    assert first.keys() == second.keys() == {"emb_params"}
    assert torch.equal(first["emb_params"], lora["bundle_emb.<zq>.clip_l"])
    # the trained one moved from "woman", the untrained one kept its start ("*")
    from trainer.models.family import load_family
    family = load_family(config)
    matrix = family.parts["text_encoder"].get_input_embeddings().weight.detach()
    tokenizer = family.components.tokenizer
    woman = matrix[tokenizer("woman", add_special_tokens=False).input_ids[:2]]
    star = matrix[tokenizer("*", add_special_tokens=False).input_ids]
    assert not torch.allclose(first["emb_params"], woman[:len(first["emb_params"])])
    assert torch.equal(second["emb_params"], star)
    # their own parameter group at their own LR, beside the LoRA's
    lrs = read_metrics(config)[-1]["lr"]
    assert lrs["embeddings"] == pytest.approx(0.003) and lrs["unet"] == pytest.approx(0.01)


def test_pivotal_tuning_on_sdxl_has_vectors_for_both_text_encoders(tiny_sdxl_dir, tmp_path):
    config = sdxl_config(tiny_sdxl_dir, tmp_path, epochs=1, additional_embeddings=PIVOTAL[:1],
                         text_encoder={"train": False}, text_encoder_2={"train": False},
                         samples=[{"prompt": "a <zq>", "width": 64, "height": 64,
                                   "diffusion_steps": 2}], sample_after=1,
                         sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    assert not [e for e in events if e["type"] == "warning" and "Sampling" in e["message"]]
    lora = tensors(result.output_path)
    assert {k: v.shape for k, v in lora.items() if k.startswith("bundle_emb.")} == {
        "bundle_emb.<zq>.clip_l": (2, 32), "bundle_emb.<zq>.clip_g": (2, 64)}
    standalone = tensors(tmp_path / "ws" / "output" / "lora-zq.safetensors")
    assert {k: v.shape for k, v in standalone.items()} == {"clip_l": (2, 32), "clip_g": (2, 64)}
    # diffusers' SDXL recipe: each encoder's vectors with load_textual_inversion
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_textual_inversion(standalone["clip_l"], token="<zq>",
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(standalone["clip_g"], token="<zq>",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    new_id = pipe.tokenizer_2.convert_tokens_to_ids("<zq>_1")
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[new_id],
                       standalone["clip_g"][1])


def test_an_interrupted_run_with_embeddings_resumes_to_the_same_weights(tiny_sd15_dir, tmp_path):
    extra = dict(epochs=2, backup_after_unit="NEVER", additional_embeddings=PIVOTAL,
                 preserve_embedding_norm=True, ema="CPU", ema_update_step_interval=1)
    reference = train(tiny_config(tiny_sd15_dir, tmp_path / "whole", **extra))
    parts = tiny_config(tiny_sd15_dir, tmp_path / "parts", **extra)
    assert train(parts, stop_at(2)).global_step == 2
    resumed = train(parts.model_copy(update={"continue_last_backup": True}))
    assert resumed.global_step == reference.global_step == 6
    a, b = tensors(reference.output_path), tensors(resumed.output_path)
    assert a.keys() == b.keys() and "bundle_emb.<zq>.clip_l" in a
    for key in a:
        assert same_trained(a[key], b[key]), key


@pytest.mark.parametrize("entries, named", [
    ([{"placeholder": "<x>"}, {"placeholder": "<x>"}], "additional_embeddings: placeholder <x> "
                                                       "is used twice"),
    ([{"placeholder": "<x>", "token_count": 0}], "additional_embeddings.0.token_count"),
    ([{"placeholder": "<x>", "is_output_embedding": True}],
     "additional_embeddings.0.is_output_embedding"),
    ([{"placeholder": "<X>"}], "additional_embeddings.0.placeholder: write the placeholder in "
                               "lower case"),
])
def test_bad_embeddings_are_refused_naming_the_key(entries, named):
    with pytest.raises(ConfigError, match=named):
        config_from_dict({"additional_embeddings": entries})


def test_a_placeholder_that_is_already_a_word_is_refused(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, additional_embeddings=[
        {"placeholder": "<zq>"}, {"placeholder": "a"}])  # "a" is one token of the vocabulary
    with pytest.raises(ConfigError, match=r"additional_embeddings\[1\]\.placeholder: 'a' is "
                                          "already a word"):
        train(config)


@pytest.mark.parametrize("change, named", [
    ({"training_method": "FINE_TUNE", "additional_embeddings": [{"placeholder": "<x>"}]},
     "a fine-tuned checkpoint has no place"),
    ({"training_method": "EMBEDDING", "additional_embeddings": []},
     "add at least one"),
    ({"training_method": "EMBEDDING", "additional_embeddings": [{"train": False}]},
     "none of them trains"),
    ({"output_model_format": "DIFFUSERS_LORA", "additional_embeddings": [{}]},
     "bundle_additional_embeddings"),
])
def test_combinations_that_cannot_work_are_refused_at_config_time(change, named):
    from trainer.config import check_supported
    with pytest.raises(ConfigError, match=named):
        check_supported(config_from_dict(change))


def test_the_page_has_an_embeddings_section_and_a_curve_per_parameter_group():
    from trainer.demo import DEMO_DATASET_DIR
    from ui import fields as F
    from ui import lr_preview, tables
    assert "Embeddings" in F.sections()
    assert F.LISTS["additional_embeddings"].section == "Embeddings"
    assert F.LISTS["additional_embeddings"].required == "placeholder"
    assert {"embedding_learning_rate", "preserve_embedding_norm",
            "bundle_additional_embeddings"} <= set(F.keys_in_section("Embeddings"))
    rows = [{"placeholder": "<zq>", "token_count": 3}]
    assert tables.from_frame(F.LISTS["additional_embeddings"].item,
                             tables.to_frame(F.LISTS["additional_embeddings"].item, rows),
                             "placeholder")[0]["token_count"] == 3
    config = config_from_dict({"concepts": [{"path": str(DEMO_DATASET_DIR)}], "epochs": 2,
                               "learning_rate": 0.01, "learning_rate_warmup_steps": 0,
                               "unet": {"learning_rate": 0.02},
                               "embedding_learning_rate": 0.005,
                               "additional_embeddings": [{"placeholder": "<zq>"}]})
    frame, _ = lr_preview.curve_frame(config)
    first = frame.groupby("group")["learning rate"].first().to_dict()
    assert first == pytest.approx({"text encoder": 0.01, "UNet": 0.02, "embeddings": 0.005})
    textual_inversion = {**config.model_dump(mode="json"), "training_method": "EMBEDDING",
                         "output_model_format": "SAFETENSORS"}
    frame, _ = lr_preview.curve_frame(config_from_dict(textual_inversion))
    assert set(frame["group"]) == {"embeddings"}
