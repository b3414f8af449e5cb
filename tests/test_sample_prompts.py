"""Samples draw from their prompts' recorded encodings (trainer/sample_prompts.py): recorded
at the first draw, replayed by a pipeline without text encoders while the encoders hold no
weights, the image the same to the bit. For every family, with a negative prompt and CFG
(the pipelines that encode the negative prompt apart record two calls)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer.config import SampleConfig
from trainer.data.dataset import collect_items
from trainer.models.family import load_family
from trainer.models.tiny_flow import tiny_flow_model
from trainer.models.tiny_flux2 import tiny_flux2_model
from trainer.models.tiny_qwen_image import tiny_qwen_image_model
from trainer.models.tiny_z_image import tiny_z_image_model
from trainer.sample_prompts import STRUCTURE_KEY, PromptRecordMismatch, SamplePromptCache
from trainer.sampling import record_sample_prompts, render_samples

from helpers import tiny_config

SAMPLE = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "seed": 7, "width": 64,
          "height": 64, "diffusion_steps": 2, "cfg_scale": 3.0}

# model type, the tiny model (a conftest fixture's name or a builder), extra settings
FAMILIES = {
    "sd15": ("STABLE_DIFFUSION_15", "tiny_sd15_dir", {}),
    "sdxl": ("STABLE_DIFFUSION_XL_10_BASE", "tiny_sdxl_dir", {}),
    "sd15-inpainting": ("STABLE_DIFFUSION_15_INPAINTING", "tiny_sd15_inpaint_dir", {}),
    "flux": ("FLUX_DEV_1", lambda: tiny_flow_model("flux"), {}),
    "chroma": ("CHROMA_1", lambda: tiny_flow_model("chroma"), {}),
    "sd3": ("STABLE_DIFFUSION_3", lambda: tiny_flow_model("sd3"), {}),
    "qwen-image": ("QWEN", tiny_qwen_image_model, {}),
    "z-image": ("Z_IMAGE", tiny_z_image_model, {}),
    "flux2": ("FLUX_2", tiny_flux2_model, {"text_encoder_sequence_length": 64}),
}


def family_of(name, request, tmp_path):
    model_type, model, extra = FAMILIES[name]
    folder = request.getfixturevalue(model) if isinstance(model, str) else model()
    frozen = {p: {"train": False} for p in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    config = tiny_config(folder, tmp_path, model_type=model_type, samples=[SAMPLE],
                         **frozen, **extra)
    return load_family(config), config


def draw(family, config, folder, **kwargs) -> np.ndarray:
    records = list(render_samples(family, config.samples, folder, step=0,
                                  device=torch.device("cpu"), **kwargs))
    return np.asarray(records[0]["image"])


def count_calls(*modules) -> dict:
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1
    for module in modules:
        module.register_forward_pre_hook(count)
    return calls


def count_encoder_calls(family) -> dict:
    return count_calls(*(part for name, part in family.parts.items()
                         if name != family.denoiser))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_recorded_sample_draws_the_same_image_without_text_encoders(name, request, tmp_path):
    family, config = family_of(name, request, tmp_path)
    spec = config.samples[0]
    inpaint = ({"inpaint_item": collect_items(config.concepts)[0]} if family.inpainting
               else {})
    plain = draw(family, config, tmp_path / "plain", **inpaint)

    prompts = SamplePromptCache(tmp_path / "cache", ["an identity"])
    assert not prompts.covers(family, config.samples)
    calls = count_encoder_calls(family)
    recording = draw(family, config, tmp_path / "recording", prompts=prompts, **inpaint)
    assert calls["n"] > 0 and np.array_equal(recording, plain)

    # recorded ahead of the first draw (as the run does while it fills the text cache): the
    # encoders run, the denoiser does not (not for an inpainting model: its pipeline needs
    # the image, and its run does not fill the caches first)
    ahead = SamplePromptCache(tmp_path / "ahead", ["an identity"])
    if not family.inpainting:
        denoised = count_calls(family.parts[family.denoiser])
        calls["n"] = 0
        device = torch.device("cpu")
        assert record_sample_prompts(family, config.samples, ahead, device) == 1
        assert calls["n"] > 0 and denoised["n"] == 0
        assert record_sample_prompts(family, config.samples, ahead, device) == 0

    # fresh cache objects read the records from disk; the encoders hold no weights now
    for part in family.parts:
        if part != family.denoiser:
            family.parts[part].to("meta")
    calls["n"] = 0
    for folder in ("cache", "ahead")[:1 if family.inpainting else 2]:
        replaying = SamplePromptCache(tmp_path / folder, ["an identity"])
        assert replaying.covers(family, config.samples)
        replayed = draw(family, config, tmp_path / f"replayed-{folder}", prompts=replaying,
                        without_encoders=True, **inpaint)
        assert calls["n"] == 0
        assert np.array_equal(replayed, plain)

    # the negative prompt is recorded where the pipeline reads it (Flux.1-dev's guidance is
    # an input of the transformer, not a negative prompt)
    with safe_open(str(prompts.path(prompts.key(family, spec))), framework="pt") as entry:
        recorded_calls = json.loads(entry.metadata()[STRUCTURE_KEY])
    assert any("blurry" in call for call, _ in recorded_calls) == (name != "flux")


def test_the_key_is_what_reaches_the_encoders(request, tmp_path):
    family, config = family_of("flux", request, tmp_path)
    prompts = SamplePromptCache(tmp_path / "cache", ["an identity"])
    spec = config.samples[0]
    key = prompts.key(family, spec)
    for same in ({"seed": 8}, {"width": 128}, {"diffusion_steps": 9}):
        assert prompts.key(family, spec.model_copy(update=same)) == key
    for changed in ({"prompt": "a dog"}, {"negative_prompt": ""}, {"cfg_scale": 1.0}):
        assert prompts.key(family, spec.model_copy(update=changed)) != key
    assert SamplePromptCache(tmp_path / "cache", ["another"]).key(family, spec) != key
    family.sample_inputs = lambda: {"max_sequence_length": 16}  # T5 reads fewer tokens
    assert prompts.key(family, spec) != key


def test_a_record_that_does_not_match_the_call_is_removed_with_a_message(request, tmp_path):
    family, config = family_of("sd15", request, tmp_path)
    prompts = SamplePromptCache(tmp_path / "cache", ["an identity"])
    draw(family, config, tmp_path / "first", prompts=prompts)
    key = prompts.key(family, config.samples[0])
    prompts.records[key] = [("another call", None)]
    with pytest.raises(PromptRecordMismatch, match="recorded again at the next sample"):
        draw(family, config, tmp_path / "second", prompts=prompts)
    assert not prompts.path(key).exists() and key not in prompts.records
    draw(family, config, tmp_path / "third", prompts=prompts)  # recorded again
    assert prompts.covers(family, config.samples)


class EchoPipeline:
    """A pipeline's encode_prompt and device, nothing else."""
    _execution_device = torch.device("cpu")

    def __init__(self):
        self.calls = 0

    def encode_prompt(self, prompt, device=None, prompt_embeds=None, scale=1.0):
        self.calls += 1
        factor = scale if isinstance(scale, float) else 1.0
        return (torch.full((2,), len(prompt) * factor) if prompt_embeds is None
                else prompt_embeds), None


class NoFamily:
    inpainting = False

    def sample_inputs(self):
        return {}


def test_calls_given_embeddings_run_and_calls_given_objects_are_not_recorded(tmp_path):
    """A call given precomputed embeddings needs no encoder: it runs as it is, beside the
    recorded calls. One given an object (which may print differently in the next process)
    cannot be keyed: the draw is not recorded, as a record without it would be incomplete."""
    prompts = SamplePromptCache(tmp_path, ["an identity"])
    pipeline, family = EchoPipeline(), NoFamily()
    spec = SampleConfig(prompt="a cat")
    with prompts.serving(pipeline, family, spec):
        pipeline.encode_prompt("a cat", torch.device("cpu"))
        pipeline.encode_prompt("a cat", scale=object())
    assert not prompts.covers(family, [spec]) and pipeline.calls == 2
    with prompts.serving(pipeline, family, spec):
        first = pipeline.encode_prompt("a cat", scale=2.0)
        given = pipeline.encode_prompt("a cat", prompt_embeds=torch.ones(2))
    assert prompts.covers(family, [spec]) and pipeline.calls == 4
    with prompts.serving(pipeline, family, spec):
        again = pipeline.encode_prompt("a cat", scale=2.0)  # replayed
        given_again = pipeline.encode_prompt("a cat", prompt_embeds=torch.ones(2))  # run
    assert pipeline.calls == 5 and torch.equal(again[0], first[0]) and again[1] is None
    assert torch.equal(given_again[0], given[0])
    assert "encode_prompt" not in vars(pipeline)  # the method is the class's again
