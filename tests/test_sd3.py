"""SD 3 / 3.5 (STABLE_DIFFUSION_3, STABLE_DIFFUSION_35): LoRA and fine-tune training of the tiny
models on the demo photos, what the outputs load into, the text encoding (as the pipeline joins
it; clip skip, mask and caption dropout per encoder), the time input, the kohya ids, and SD 3.5's
all-in-one single file (with and without T5) as a base model."""
import json
import pathlib

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.control import Control
from trainer.errors import ModelLoadError
from trainer.loop import train
from trainer.models.family import load_family
from trainer.models.sd3 import (CLIPS, ENCODER_PREFIXES, SINGLE_FILE_CONFIGS, T5,
                                TRANSFORMER_PREFIX, EncodingSD3Pipeline, hidden_key, join_text,
                                pooled_key)
from trainer.models.tiny_flow import tiny_flow_model
from trainer.models.transformer_layouts import SD3, load_original_transformer, to_original

from helpers import (RUNS_ARE_BIT_EXACT, assert_black_masks_learn_nothing, read_metrics,
                     resumed_equals_whole, same_trained, tiny_config)

SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}
MODEL_TYPES = {"sd3": "STABLE_DIFFUSION_3", "sd35": "STABLE_DIFFUSION_35"}
CPU = torch.device("cpu")


def sd3_config(tmp_path, kind="sd35", **overrides):
    """An SD 3 LoRA run of seconds: the CLIPs frozen (T5 always is), DIFFUSERS_LORA."""
    data = dict(model_type=MODEL_TYPES[kind], text_encoder={"train": False},
                output_model_format="DIFFUSERS_LORA", lora_rank=8, lora_alpha=8.0)
    data.update(overrides)
    return tiny_config(data.pop("base", None) or tiny_flow_model(kind), tmp_path, **data)


def render(pipe, sample=SAMPLE):
    generator = torch.Generator("cpu").manual_seed(sample["seed"])
    image = pipe(sample["prompt"], width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"],
                 guidance_scale=sample["cfg_scale"], generator=generator,
                 max_sequence_length=77).images[0]
    return np.asarray(image).astype(np.float64)


def last_sample(events):
    path = [e["path"] for e in events if e["type"] == "sample"][-1]
    return np.asarray(Image.open(path)).astype(np.float64)


def plain_pipeline(kind):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_flow_model(kind))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(family, captions, clip_skip=0):
    with torch.no_grad():
        return family.encode_text(captions, {}, clip_skip=clip_skip, device=CPU, grad={})


@pytest.fixture(scope="module", params=["sd3", "sd35"])
def trained(request, tmp_path_factory):
    """30 epochs (90 steps) of a transformer LoRA that samples at its last step."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"{kind}-lora")
    config = sd3_config(tmp, kind, epochs=30, samples=[SAMPLE], sample_after=30,
                        sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    return kind, config, result, events


def test_sd3_lora_loss_falls(trained):
    _, config, result, _ = trained
    losses = [m["loss"] for m in read_metrics(config)]
    assert result.global_step == 90 and len(losses) == 90
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    # measured: sd3 4.42 -> 3.79 (factor 0.86), sd35 4.35 -> 3.79 (0.87)
    assert last < 0.93 * first, (first, last)


def test_diffusers_lora_reloads_in_the_sd3_pipeline_and_gives_the_training_sample(trained):
    kind, _, result, events = trained
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert metadata["ss_base_model_version"] == {"sd3": "medium", "sd35": "5-medium"}[kind]
    assert metadata["modelspec.architecture"] == (
        f"stable-diffusion-3-{metadata['ss_base_model_version']}/lora")
    pipe = plain_pipeline(kind)
    base = render(pipe)
    pipe.load_lora_weights(result.output_path)
    with_lora = render(pipe)
    assert np.abs(with_lora - last_sample(events)).max() <= (0 if RUNS_ARE_BIT_EXACT else 2)
    assert np.abs(with_lora - base).mean() > 1.0


def test_a_clip_l_lora_saves_and_reloads_with_the_transformers(tmp_path):
    config = sd3_config(tmp_path, "sd3", epochs=2, text_encoder={"train": True},
                        samples=[SAMPLE], sample_after=2, sample_after_unit="EPOCH")
    events = []
    result = train(config, Control(on_event=events.append))
    with safe_open(result.output_path, "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"text_encoder", "transformer"}
    pipe = plain_pipeline("sd3")
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length",
                         return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids).text_embeds
        pipe.load_lora_weights(result.output_path)
        after = pipe.text_encoder(ids).text_embeds
    assert not torch.equal(before, after)  # CLIP-L's LoRA is in
    assert np.abs(render(pipe) - last_sample(events)).max() <= (0 if RUNS_ARE_BIT_EXACT else 2)


def test_fine_tune_saves_a_diffusers_folder_and_an_original_single_file(tmp_path):
    extra = dict(epochs=1, training_method="FINE_TUNE", learning_rate=1e-3)
    folder = train(sd3_config(tmp_path / "folder", output_model_format="DIFFUSERS",
                              **extra)).output_path
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    state = pipe.transformer.state_dict()
    before = SD3Transformer2DModel.from_pretrained(tiny_flow_model("sd35"),
                                                   subfolder="transformer").state_dict()
    assert any(not torch.equal(state[k], before[k]) for k in state)

    single = train(sd3_config(tmp_path / "single", output_model_format="ORIGINAL_SINGLE_FILE",
                              **extra)).output_path
    with safe_open(single, "pt") as f:
        assert "joint_blocks.0.x_block.attn2.qkv.weight" in f.keys()
    reloaded = load_original_transformer(SD3Transformer2DModel, single,
                                         config=tiny_flow_model("sd35"))
    # the same seed and data: the single file holds the folder's trained weights
    for key, tensor in reloaded.state_dict().items():
        assert same_trained(tensor, state[key]), key


def test_an_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    steps = resumed_equals_whole(sd3_config, tmp_path, 2, epochs=2,
                                 timestep_distribution="LOGIT_NORMAL", timestep_shift=3.0)
    assert steps == 6


def test_masked_training_with_black_masks_learns_nothing(tmp_path):
    assert_black_masks_learn_nothing(sd3_config, tmp_path, epochs=2)


# --- text encoding and prediction -----------------------------------------------------------

def test_conditioning_joins_as_the_pipeline_encodes_the_prompt(tmp_path):
    family = load_family(sd3_config(tmp_path))
    out = encode(family, ["a photo of a cat"])
    with torch.no_grad():
        embeds, _, pooled, _ = family.pipeline().encode_prompt(
            "a photo of a cat", None, None, do_classifier_free_guidance=False,
            max_sequence_length=77)
    text = join_text(*(out[hidden_key(p)] for p in (*CLIPS, T5)))
    assert text.shape == (1, 77 + 77, 128)  # CLIP-L 32 + CLIP-G 64 wide, padded to T5's 128
    assert torch.equal(text, embeds)
    assert torch.equal(torch.cat([out[pooled_key(p)] for p in CLIPS], -1), pooled)
    assert set(family.text_cache_keys) == set(out)


def test_clip_skip_is_per_encoder_and_samples_read_it(tmp_path):
    config = sd3_config(tmp_path, text_encoder={"train": False, "clip_skip": 1})
    family = load_family(config)
    skipped, plain = encode(family, ["a cat"], clip_skip=1), encode(family, ["a cat"])
    assert not torch.equal(skipped[hidden_key("text_encoder")],
                           plain[hidden_key("text_encoder")])
    assert torch.equal(skipped[hidden_key("text_encoder_2")], plain[hidden_key("text_encoder_2")])
    assert torch.equal(skipped[pooled_key("text_encoder")], plain[pooled_key("text_encoder")])
    pipe = family.pipeline()
    assert isinstance(pipe, EncodingSD3Pipeline) and pipe.clip_skips == (1, 0)
    with torch.no_grad():
        embeds, negative, *_ = pipe.encode_prompt("a cat", None, None,
                                                  max_sequence_length=77)
    assert torch.equal(embeds, join_text(*(skipped[hidden_key(p)] for p in (*CLIPS, T5))))
    assert torch.equal(negative[:, :77], join_text(
        *(encode(family, [""], clip_skip=1)[hidden_key(p)] for p in (*CLIPS, T5)))[:, :77])
    assert type(family.export_pipeline()) is StableDiffusion3Pipeline


def test_attention_mask_zeroes_each_encoders_states_after_its_end_token(tmp_path):
    family = load_family(sd3_config(tmp_path, transformer={"attention_mask": True}))
    out = encode(family, ["a cat"])
    plain = encode(load_family(sd3_config(tmp_path)), ["a cat"])
    c = family.components
    for part, tokenizer in zip((*CLIPS, T5), (c.tokenizer, c.tokenizer_2, c.tokenizer_3)):
        real = len(tokenizer("a cat").input_ids)  # <bos> a cat <eos>, or a cat </s>
        hidden = out[hidden_key(part)][0]
        assert torch.equal(hidden[:real], plain[hidden_key(part)][0, :real]), part
        assert torch.count_nonzero(hidden[real:]) == 0, part


def test_caption_dropout_zeroes_each_encoders_outputs_on_its_own(tmp_path):
    config = sd3_config(tmp_path, text_encoder_2={"train": False,
                                                  "caption_dropout_probability": 1.0})
    family = load_family(config)
    out = family.caption_dropout(["a photo", "a cat"], lambda c: encode(family, c))
    assert torch.count_nonzero(out[hidden_key("text_encoder_2")]) == 0
    assert torch.count_nonzero(out[pooled_key("text_encoder_2")]) == 0
    for key in (hidden_key("text_encoder"), pooled_key("text_encoder"), hidden_key(T5)):
        assert torch.count_nonzero(out[key]) > 0, key


def test_the_transformer_reads_the_drawn_timestep_unscaled(tmp_path):
    family = load_family(sd3_config(tmp_path))
    conditioning = encode(family, ["a cat"])
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = family.predict(noisy, torch.tensor([700.0]), conditioning)
        theirs = family.parts["transformer"](
            hidden_states=noisy, timestep=torch.tensor([700.0]),
            encoder_hidden_states=join_text(*(conditioning[hidden_key(p)] for p in (*CLIPS, T5))),
            pooled_projections=torch.cat([conditioning[pooled_key(p)] for p in CLIPS], -1)).sample
    assert torch.equal(ours, theirs)
    assert not family.objective.dynamic_shift and family.objective.packing == 2


def test_attn_only_preset_adapts_every_attention_projection(tmp_path):
    from trainer.lora import denoiser_targets
    family = load_family(sd3_config(tmp_path))
    targets = denoiser_targets(family.parts["transformer"], family.config)
    linears = [n for n, m in family.parts["transformer"].named_modules()
               if isinstance(m, torch.nn.Linear)]
    assert sorted(targets) == sorted(n for n in linears if "attn" in n)
    assert any(".attn2." in n for n in targets)  # SD 3.5 Medium's second attention


# --- all-in-one single files ----------------------------------------------------------------

def all_in_one(kind, path, with_t5=True):
    """SAI's all-in-one layout of the tiny model: the transformer in the original layout under
    model.diffusion_model., the VAE in LDM layout, the encoders under text_encoders.*."""
    from trainer.models.single_file import vae_to_ldm
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_flow_model(kind))
    tensors = {TRANSFORMER_PREFIX + k: v
               for k, v in to_original(SD3, pipe.transformer.state_dict()).items()}
    tensors.update(vae_to_ldm(pipe.vae.state_dict()))
    for part in (*CLIPS, *([T5] if with_t5 else [])):
        for key, tensor in getattr(pipe, part).state_dict().items():
            if key != "encoder.embed_tokens.weight":  # T5 ties it to shared.weight
                tensors[ENCODER_PREFIXES[part] + key] = tensor
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_an_all_in_one_file_predicts_as_the_folder(tmp_path):
    path = all_in_one("sd35", tmp_path / "sd35.safetensors")
    single = load_family(sd3_config(tmp_path, base=path))
    folder = load_family(sd3_config(tmp_path))
    # SAI's files and ComfyUI read CLIP-L's pooled output unprojected; diffusers loads it with
    # an identity projection. Everything else is the folder's, weight for weight.
    clip_l = folder.parts["text_encoder"]
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(clip_l.config.hidden_size))
    for part in ("transformer", "text_encoder", "text_encoder_2", T5):
        a, b = single.parts[part].state_dict(), folder.parts[part].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b) and set(a) >= set(b), part
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predictions = [f.predict(noisy, torch.tensor([30.0, 800.0]),
                                 encode(f, ["a photo of a cat", "a cup"]))
                       for f in (single, folder)]
        latents = [f.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
                   for f in (single, folder)]
    assert torch.equal(*predictions) and torch.equal(*latents)
    assert single.base_model_version == "5-medium"


def test_an_all_in_one_file_without_t5_reads_zeros_in_its_place(tmp_path):
    path = all_in_one("sd35", tmp_path / "no-t5.safetensors", with_t5=False)
    family = load_family(sd3_config(tmp_path, base=path))
    assert T5 not in family.parts and family.components.tokenizer_3 is None
    out = encode(family, ["a cat"])
    assert out[hidden_key(T5)].shape == (1, 77, 128)
    assert torch.count_nonzero(out[hidden_key(T5)]) == 0
    image = family.pipeline()("a cat", width=64, height=64, num_inference_steps=2,
                              **family.sample_inputs()).images[0]
    assert image.size == (64, 64)


def test_a_transformer_alone_or_another_familys_file_is_refused_with_a_reason(tmp_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_flow_model("sd3"))
    alone = tmp_path / "alone.safetensors"
    save_file({TRANSFORMER_PREFIX + k: v.contiguous()
               for k, v in to_original(SD3, pipe.transformer.state_dict()).items()}, str(alone))
    with pytest.raises(ModelLoadError, match="no CLIP-L weights.*transformer.model_name"):
        load_family(sd3_config(tmp_path, base=alone))
    flux = pathlib.Path(tiny_flow_model("flux")) / "transformer"
    from diffusers import FluxTransformer2DModel
    other = tmp_path / "flux.safetensors"
    save_file({k: v.contiguous() for k, v in to_original(
        "flux", FluxTransformer2DModel.from_pretrained(flux).state_dict()).items()}, str(other))
    with pytest.raises(ModelLoadError, match="Flux.1 dev.*choose model type FLUX_DEV_1"):
        load_family(sd3_config(tmp_path, base=other))


def test_the_shipped_configs_are_the_models_diffusers_recognises(tmp_path):
    """The real configs' transformers have the shapes diffusers' single-file code tells the SD 3
    models apart by; the tiny config is exactly the tiny model's."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    expected = {"SD 3.5 Large": "sd35_large", "SD 3.5 Medium": "sd35_medium",
                "SD 3 Medium": "sd3"}
    for name, model_type in expected.items():
        with torch.device("meta"):
            model = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(
                SINGLE_FILE_CONFIGS[name], subfolder="transformer"))
        keys = {TRANSFORMER_PREFIX + k: v for k, v in to_original(SD3,
                                                                   model.state_dict()).items()}
        assert infer_diffusers_model_type(keys) == model_type, name
    tiny = SINGLE_FILE_CONFIGS["tiny SD 3.5"]
    built = pathlib.Path(tiny_flow_model("sd35"))
    for config in sorted(tiny.rglob("*.json")):
        relative = config.relative_to(tiny)
        assert json.loads(config.read_text()) == json.loads((built / relative).read_text()), \
            relative


def test_a_real_models_file_finds_its_config_and_one_with_t5_needs_its_tokenizer(tmp_path):
    from trainer.models.sd3 import _SingleFile, _config_for, _tokenizers, _transformer_shapes
    for name in ("SD 3.5 Large", "SD 3.5 Medium", "SD 3 Medium"):
        folder = SINGLE_FILE_CONFIGS[name]
        file = _SingleFile(tmp_path / "model.safetensors", dict(_transformer_shapes(folder)))
        assert _config_for(file) == folder, name
    shapes = dict(_transformer_shapes(SINGLE_FILE_CONFIGS["SD 3 Medium"]))
    shapes[TRANSFORMER_PREFIX + "x_embedder.proj.weight"] = (1024, 16, 2, 2)
    with pytest.raises(ModelLoadError, match="24 blocks, 1024 wide, that is none of"):
        _config_for(_SingleFile(tmp_path / "odd.safetensors", shapes))
    large = SINGLE_FILE_CONFIGS["SD 3.5 Large"]
    tokenizers = _tokenizers(large, with_t5=False, file_name="sd3.5_large.safetensors")
    assert len(tokenizers["tokenizer"]) == len(tokenizers["tokenizer_2"]) == 49408
    assert tokenizers["tokenizer_2"].pad_token == "!" and tokenizers["tokenizer_3"] is None
    with pytest.raises(ModelLoadError, match="holds T5-XXL, whose tokenizer does not ship"):
        _tokenizers(large, with_t5=True, file_name="sd3.5_large.safetensors")
