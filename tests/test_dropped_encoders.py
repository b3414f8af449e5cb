"""A flow family's frozen text encoders hold memory only while they run, when the text cache
serves them (issue 26: "T5-XXL is never loaded while training once the cache is full"). They
are built without weights and read from the model's files when they first run (a caption the
cache has not seen, a sample), then dropped again once the caches are full (trainer/
residency.py's ReadAgain): with every caption cached T5 is read only for samples. The run
trains and samples exactly as one that keeps them (also stored FLOAT_8, and with T5's blocks
streamed).

`parking_pays` is switched on as on a GPU, so the caches fill before training as they do
there; on a CPU without it the encoders are dropped at the first epoch's end."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file
from transformers import T5EncoderModel

from trainer import loop, placement, residency
from trainer.control import Control
from trainer.data.cache import DATA_CACHE_ENV
from trainer.demo import DEMO_DATASET_DIR
from trainer.layer_offload import LayerOffload
from trainer.loop import train
from trainer.models import flow_family
from trainer.models.tiny_flow import tiny_flow_model
from trainer.placement import PartPlacement

from helpers import read_metrics, tiny_config

SAMPLE = {"prompt": "a photo of a cat", "seed": 7, "width": 64, "height": 64,
          "diffusion_steps": 2, "cfg_scale": 3.0}


@pytest.fixture
def gpu_like(monkeypatch):
    monkeypatch.setattr(residency, "parking_pays", lambda device: True)


@pytest.fixture
def watched(monkeypatch):
    """Where T5's weights are at each training step of the transformer, how often T5 runs
    and how often an encoder is read again."""
    seen = {"t5_at_steps": [], "t5_calls": 0, "reads": [], "t5_reads": 0, "order": []}
    families = []
    real_load = loop.load_family

    def load_family(config):
        families.append(real_load(config))
        return families[-1]
    monkeypatch.setattr(loop, "load_family", load_family)

    real_forward = FluxTransformer2DModel.forward

    def transformer_forward(self, *args, **kwargs):
        if self.training:  # a training step (samples run in eval mode)
            t5 = families[-1].parts["text_encoder_2"]
            seen["t5_at_steps"].append(next(t5.parameters()).device.type)
        seen["order"].append("step" if self.training else "sample")
        return real_forward(self, *args, **kwargs)
    monkeypatch.setattr(FluxTransformer2DModel, "forward", transformer_forward)

    real_t5 = T5EncoderModel.forward

    def t5_forward(self, *args, **kwargs):
        seen["t5_calls"] += 1
        seen["order"].append("t5")
        return real_t5(self, *args, **kwargs)
    monkeypatch.setattr(T5EncoderModel, "forward", t5_forward)

    real_from_pretrained = T5EncoderModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        seen["t5_reads"] += 1
        return real_from_pretrained(cls, *args, **kwargs)
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(from_pretrained))

    real_restore = residency.ReadAgain.restore

    def restore(self):
        if self.dropped:
            seen["reads"].append(type(self.module).__name__)
        return real_restore(self)
    monkeypatch.setattr(residency.ReadAgain, "restore", restore)
    return seen


def flux_config(folder, data, **overrides):
    settings = dict(model_type="FLUX_DEV_1", text_encoder={"train": False},
                    output_model_format="DIFFUSERS_LORA", concepts=[{"path": str(data)}],
                    samples=[SAMPLE], sample_after=3, sample_after_unit="EPOCH")
    return tiny_config(tiny_flow_model("flux"), folder, **{**settings, **overrides})


def run(config):
    events = []
    result = train(config, Control(on_event=events.append))
    sample = next(e["path"] for e in events if e["type"] == "sample")
    statuses = [e["message"] for e in events if e["type"] == "status"]
    return {"lora": load_file(result.output_path), "statuses": statuses,
            "losses": [m["loss"] for m in read_metrics(config) if "loss" in m],
            "sample": np.asarray(Image.open(sample))}


def test_with_a_full_text_cache_t5_holds_no_memory_while_the_run_trains(
        gpu_like, watched, tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(DEMO_DATASET_DIR, data)
    # the validation loss after each epoch: its held-out captions are cached too
    common = dict(epochs=3, validation=True, validation_split=0.4, validate_after=1,
                  validate_after_unit="EPOCH")
    first = run(flux_config(tmp_path / "first", data, **common))
    assert watched["t5_calls"] > 0

    assert watched["t5_reads"] >= 2  # captions the cache had not seen, and the sample
    watched.update(t5_at_steps=[], t5_calls=0, reads=[], t5_reads=0)
    second = run(flux_config(tmp_path / "second", data, **common))
    assert watched["t5_at_steps"] and set(watched["t5_at_steps"]) == {"meta"}
    # never read: not at the start, and not for the sample, whose prompt's encodings the
    # first run recorded (trainer/sample_prompts.py)
    assert watched["t5_reads"] == 0 and watched["reads"].count("T5EncoderModel") == 0
    assert watched["t5_calls"] == 0
    statuses = " ".join(second["statuses"])
    assert "The text_encoder and text_encoder_2 are not read yet" in statuses
    assert ("The samples' prompts were encoded before (cache): sampling leaves the "
            "text_encoder and text_encoder_2 out") in statuses
    assert second["losses"] == first["losses"]
    assert all(torch.equal(second["lora"][k], first["lora"][k]) for k in first["lora"])
    assert np.array_equal(second["sample"], first["sample"])


def test_t5_is_read_for_a_new_sample_prompt_once_and_not_for_the_next_samples(
        gpu_like, watched, tmp_path, monkeypatch):
    """With the captions cached, a run with a new sample prompt reads T5 for its first
    sampling event only: the later events replay the prompt's recorded encodings."""
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "data"
    shutil.copytree(DEMO_DATASET_DIR, data)
    run(flux_config(tmp_path / "first", data, epochs=1, sample_after=1))
    watched.update(t5_calls=0, reads=[], t5_reads=0, order=[])
    events = []
    train(flux_config(tmp_path / "second", data, epochs=3, sample_after=1,
                      samples=[{**SAMPLE, "prompt": "a photo of a dog"}]),
          Control(on_event=events.append))
    assert len([e for e in events if e["type"] == "sample"]) == 3
    assert watched["t5_reads"] == 1 and watched["t5_calls"] == 1
    # and where the caches fill first (on a GPU), before the transformer's first step: T5
    # is never on the GPU with the transformer, not even for the first samples
    assert watched["order"].index("t5") < watched["order"].index("step")
    assert "Encoded the prompts of 1 sample(s) before training: sampling needs no text " \
        "encoder" in [e["message"] for e in events if e["type"] == "status"]


@pytest.mark.parametrize("t5", [{}, {"weight_dtype": "FLOAT_8"}, {"offload_fraction": 0.5}],
                         ids=["plain", "float8", "streamed"])
def test_a_dropped_t5_read_again_trains_and_samples_exactly_as_one_kept(
        t5, gpu_like, watched, tmp_path, monkeypatch):
    """Two lines per caption, one drawn per image and epoch: later epochs draw captions the
    cache has not seen, for which T5 is read again."""
    streamed_parts = []
    real_offload_parts = placement.offload_parts

    def offload_parts(config, family, parts, device):
        streamed_parts.extend(parts)
        return real_offload_parts(config, family, parts, device)
    monkeypatch.setattr(placement, "offload_parts", offload_parts)
    moved_resident = []  # a streamed part comes back to the device without its streamed blocks
    real_move_resident = LayerOffload.move_resident

    def move_resident(self, device):
        moved_resident.append(type(self.module).__name__)
        return real_move_resident(self, device)
    monkeypatch.setattr(LayerOffload, "move_resident", move_resident)
    data = tmp_path / "data"
    shutil.copytree(DEMO_DATASET_DIR, data)
    for caption in data.glob("*.txt"):
        text = caption.read_text(encoding="utf-8").strip()
        caption.write_text(f"{text}\n{text}, seen closer", encoding="utf-8")
    common = dict(epochs=3, text_encoder_2={"train": False, **t5},
                  gradient_checkpointing=True)
    dropped = run(flux_config(tmp_path / "dropped", data, **common))
    reads = watched["reads"].count("T5EncoderModel")
    assert reads >= 2, watched["reads"]  # a caption not seen yet, and the sample
    assert any(s.startswith("Read the text_encoder_2 from the model's files")
               for s in dropped["statuses"])
    # streamed: its blocks stream each time it is read, and it comes back to the device as a
    # streamed part does (its streamed blocks stay in CPU memory)
    streamed = bool(t5.get("offload_fraction"))
    assert streamed_parts.count("text_encoder_2") == (reads if streamed else 0)
    assert (moved_resident.count("T5EncoderModel") >= reads) == streamed, moved_resident

    monkeypatch.setattr(PartPlacement, "_reader", lambda self, name: None)
    monkeypatch.setattr(flow_family, "read_later_parts", lambda config: set())
    kept = run(flux_config(tmp_path / "kept", data, **common))
    assert not any("Dropped the" in s for s in kept["statuses"])
    assert dropped["losses"] == kept["losses"]
    assert all(torch.equal(dropped["lora"][k], kept["lora"][k]) for k in kept["lora"])
    assert np.array_equal(dropped["sample"], kept["sample"])


def test_a_fine_tunes_model_folder_holds_the_dropped_t5_as_the_base_has_it(
        gpu_like, watched, tmp_path):
    """The model folder a fine-tune writes holds every part: T5 is read again for it, written
    as the base model has it, and dropped again."""
    base = tiny_flow_model("flux")
    config = tiny_config(base, tmp_path, model_type="FLUX_DEV_1", epochs=2,
                         training_method="FINE_TUNE", output_model_format="DIFFUSERS",
                         learning_rate=1e-3, text_encoder={"train": False},
                         text_encoder_2={"train": False})
    result = train(config, Control())
    assert "T5EncoderModel" in watched["reads"]
    saved = load_file(f"{result.output_path}/text_encoder_2/model.safetensors")
    released = load_file(str(base / "text_encoder_2" / "model.safetensors"))
    assert set(released) <= set(saved)  # (the export writes T5's tied embedding twice)
    assert all(torch.equal(saved[k], released[k].to(saved[k].dtype)) for k in released)
