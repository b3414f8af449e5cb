"""The disk caches across runs (issue 26): a second run on the same data reads every latent
and every T5 output from `<workspace>/cache/` (the VAE and the text encoders are never
called), and a changed caption re-encodes exactly that caption."""
from __future__ import annotations

import shutil

import pytest
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, T5EncoderModel

from trainer.control import Control
from trainer.demo import DEMO_DATASET_DIR
from trainer.loop import train
from trainer.models.tiny_flow import tiny_flow_model

from helpers import tiny_config


@pytest.fixture
def encoded(monkeypatch):
    """How many captions each text encoder encoded, and images the VAE encoded."""
    counts = {"T5": 0, "CLIP": 0, "VAE": 0}

    def counting(cls, name, what):
        real = getattr(cls, name)

        def spy(self, *args, **kwargs):
            first = args[0] if args else next(iter(kwargs.values()))
            counts[what] += first.shape[0]
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, spy)
    counting(T5EncoderModel, "forward", "T5")
    counting(CLIPTextModel, "forward", "CLIP")
    counting(AutoencoderKL, "encode", "VAE")
    return counts


def test_a_second_run_reads_the_caches_and_a_changed_caption_is_encoded_alone(
        encoded, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DEMO_DATASET_DIR, data)
    config = tiny_config(tiny_flow_model("flux"), tmp_path, model_type="FLUX_DEV_1",
                         text_encoder={"train": False}, output_model_format="DIFFUSERS_LORA",
                         concepts=[{"path": str(data)}], epochs=1, batch_size=5,
                         aspect_ratio_bucketing=False)
    train(config, Control())
    first = dict(encoded)
    assert first["T5"] >= 5 and first["CLIP"] >= 5 and first["VAE"] == 5, first

    encoded.update(T5=0, CLIP=0, VAE=0)
    train(config, Control())
    assert encoded == {"T5": 0, "CLIP": 0, "VAE": 0}

    caption = data / "cat.txt"
    caption.write_text("a photo of a grey cat on a sofa", encoding="utf-8")
    train(config, Control())
    assert encoded == {"T5": 1, "CLIP": 1, "VAE": 0}
