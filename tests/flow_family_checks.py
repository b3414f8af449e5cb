"""Checks the flow-family tests share (Z-Image, Qwen-Image and Flux.2 above all): a LoRA run's
sample reproduced in the family's own diffusers pipeline, COMFY_LORA against DIFFUSERS_LORA,
fine-tunes, refusals, the CLI's tiny model and the Try it reader. Each family's test passes
its own config maker (`make_config(tmp_path, **overrides)`), pipeline and renderer."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import RUNS_ARE_BIT_EXACT, fine_tune_keeping_weights
from trainer.config import check_supported, config_from_dict
from trainer.control import Control
from trainer.errors import ConfigError, ModelLoadError
from trainer.loop import train
from trainer.models.family import load_family

CAPTIONS = ["a cat", "an astronaut in a white suit with a helmet in space"]
SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 4, "cfg_scale": 3.0}


def render_flux(pipe, config, sample=SAMPLE) -> np.ndarray:
    """`sample` drawn by a Flux.1 pipeline with the run's T5 length."""
    generator = torch.Generator("cpu").manual_seed(sample["seed"])
    image = pipe(sample["prompt"], width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"],
                 guidance_scale=sample["cfg_scale"], generator=generator,
                 max_sequence_length=config.text_encoder_2_sequence_length).images[0]
    return np.asarray(image).astype(np.float64)


def assert_flux_lora_draws_its_sample_on_the_full_base(model_dir, config, lora_path, events):
    """A Flux.1 LoRA trained on quantized base weights, loaded on the full-precision base,
    draws the run's last sample up to the quantization: far nearer it than the base does."""
    from diffusers import FluxPipeline
    pipe = FluxPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    base = render_flux(pipe, config)
    pipe.load_lora_weights(lora_path)
    with_lora = render_flux(pipe, config)
    sample = pixels([e["path"] for e in events if e["type"] == "sample"][-1])
    # measured (FLOAT_8): 0.78 of 255 from the sample on average, the base 23
    assert np.abs(with_lora - sample).mean() < 0.1 * np.abs(base - sample).mean()
# The same image drawn twice: equal on the CPU, within rounding of 8-bit pixels on CUDA.
SAME_IMAGE = 0 if RUNS_ARE_BIT_EXACT else 2


def pipeline_from(pipeline_class, folder):
    """The family's pipeline from a diffusers folder, without progress bars."""
    pipe = pipeline_class.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float64)


def train_with_events(config):
    """(result, events) of a run."""
    events = []
    result = train(config, Control(on_event=events.append))
    return result, events


def the_sample(events) -> np.ndarray:
    """The pixels of a run's one sample (it samples once, at its end)."""
    paths = [e["path"] for e in events if e["type"] == "sample"]
    assert len(paths) == 1, paths
    return pixels(paths[0])


def assert_lora_reproduces_the_sample(pipe, render, lora_path, trained_sample):
    """The LoRA file loaded into the base pipeline draws the run's sample; without it the
    image differs (the LoRA shows)."""
    base = render(pipe)
    pipe.load_lora_weights(lora_path)
    assert np.abs(render(pipe) - trained_sample).max() <= SAME_IMAGE
    assert np.abs(base - trained_sample).mean() > 1


def assert_dora_reloads(make_config, tmp_path, epochs, base_pipe, render, sample):
    """A DoRA run's DIFFUSERS_LORA file holds magnitude vectors and, in the pipeline, draws the
    run's sample."""
    config = make_config(tmp_path, epochs=epochs, lora_decompose=True, samples=[sample],
                         sample_after=epochs, sample_after_unit="EPOCH")
    result, events = train_with_events(config)
    with safe_open(result.output_path, "pt") as f:
        assert any("lora_magnitude_vector" in k for k in f.keys())
    base_pipe.load_lora_weights(result.output_path)
    assert np.abs(render(base_pipe) - the_sample(events)).max() <= SAME_IMAGE


def text_cache_entries(config) -> list[Path]:
    return sorted((Path(config.workspace_dir) / "cache" / "text").rglob("*.safetensors"))


def lora_files_of_both_formats(make_config, tmp_path) -> dict[str, dict]:
    """{format: tensors} of two one-epoch runs alike but for COMFY_LORA / DIFFUSERS_LORA."""
    return {fmt: load_file(train(make_config(tmp_path / fmt, epochs=1, output_model_format=fmt,
                                             lora_alpha=4.0)).output_path)
            for fmt in ("DIFFUSERS_LORA", "COMFY_LORA")}


def assert_comfy_deltas_are_the_diffusers_ones(comfy: dict, diffusers: dict):
    """Each `diffusion_model.<module>` LoRA of the COMFY_LORA file (alpha / rank · up @ down)
    is that module's delta in the DIFFUSERS_LORA file (which folds alpha / rank into up)."""
    for key in [k for k in comfy if k.endswith(".alpha")]:
        module = key.removeprefix("diffusion_model.").removesuffix(".alpha")
        down = comfy[f"diffusion_model.{module}.lora_down.weight"]
        up = comfy[f"diffusion_model.{module}.lora_up.weight"]
        delta = float(comfy[key]) / down.shape[0] * up.float() @ down.float()
        want = diffusers[f"transformer.{module}.lora_B.weight"].float() @ \
            diffusers[f"transformer.{module}.lora_A.weight"].float()
        torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-7)
    assert any(torch.count_nonzero(v) for k, v in comfy.items() if k.endswith("lora_up.weight"))


def fine_tune(make_config, tmp_path, output_format, monkeypatch):
    """A short fine-tune; returns (output path, the trained transformer's state dict)."""
    config = make_config(tmp_path, training_method="FINE_TUNE", epochs=1, batch_size=5,
                         learning_rate=1e-3, output_model_format=output_format,
                         output_dtype="FLOAT_32")
    return fine_tune_keeping_weights(config, monkeypatch)


def assert_changed(trained: dict, base: dict):
    """The fine-tune is in the weights: some tensor differs from the base model's."""
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def assert_another_transformer_file_is_refused(make_config, tmp_path, foreign_key: str):
    """A transformer file of another kind (one tensor named `foreign_key`) is refused naming
    transformer.model_name."""
    bad = tmp_path / "other.safetensors"
    save_file({foreign_key: torch.zeros(3, 3)}, str(bad))
    with pytest.raises(ModelLoadError, match="transformer.model_name"):
        load_family(make_config(tmp_path, transformer={"model_name": str(bad)}))


def encode(family, captions=CAPTIONS):
    with torch.no_grad():
        return family.encode_text(captions, {}, clip_skip=0, device=torch.device("cpu"), grad={})


def assert_text_encoder_training_is_refused(model_type: str, encoder: str):
    config = config_from_dict({"model_type": model_type, "text_encoder": {"train": True}})
    with pytest.raises(ConfigError,
                       match=f"text_encoder.train: {encoder} training is not supported"):
        check_supported(config)
    assert not config_from_dict({"model_type": model_type}).text_encoder.train  # off by default


def make_tiny_model(kind: str, out: Path, label: str) -> dict:
    """`python -m trainer make-tiny-model <kind> <out>`: it succeeds and names the model;
    returns the folder's model_index.json."""
    done = subprocess.run([sys.executable, "-m", "trainer", "make-tiny-model", kind, str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert label in done.stdout
    return json.loads((out / "model_index.json").read_text())


def assert_try_it_reads(lora_path, tmp_path, model_type: str) -> dict:
    """The Try it panel's reader names the family from the file: by its header, and by its
    layer names alone when the header is gone. Returns the file's tensors."""
    from trainer.try_lora import read_lora
    assert read_lora(lora_path).model_type == model_type
    tensors = load_file(lora_path)
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))  # no metadata
    assert read_lora(bare).fits == (model_type,)
    return tensors
