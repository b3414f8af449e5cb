"""The disk caches across runs (issue 26): a second run on the same data reads every latent
and every T5 output from `<workspace>/cache/` (the VAE and the text encoders are never
called), and a changed caption re-encodes exactly that caption; runs in folders of their own
(the app's jobs) share one cache folder, pruned least recently used first."""
from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextModel, T5EncoderModel

from trainer.control import Control
from trainer.data import cache as cache_module
from trainer.data.cache import DATA_CACHE_ENV, DATA_CACHE_GB_ENV
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


def test_runs_in_folders_of_their_own_share_one_cache_kept_under_its_cap(
        encoded, tiny_sd15_dir, tmp_path, monkeypatch):
    """The app runs each job in a new folder and points its jobs at one cache folder
    (DATA_CACHE_ENV): a later job on the same data encodes nothing; the folder is pruned to
    DATA_CACHE_GB_ENV when a run starts."""
    shared = tmp_path / "owner-cache"
    monkeypatch.setenv(DATA_CACHE_ENV, str(shared))
    statuses: list[str] = []
    control = Control(on_event=lambda event: statuses.append(event.get("message", "")))

    def run(folder: str):
        config = tiny_config(tiny_sd15_dir, tmp_path / folder, text_encoder={"train": False},
                             epochs=1, batch_size=5, aspect_ratio_bucketing=False)
        train(config, control)
        assert not (tmp_path / folder / "ws" / "cache").exists()  # nothing in the job folder

    run("job-1")
    assert encoded["VAE"] == 5 and encoded["CLIP"] >= 5
    assert len(list((shared / "latents").rglob("*.safetensors"))) == 5
    assert list((shared / "text").rglob("*.safetensors"))
    encoded.update(T5=0, CLIP=0, VAE=0)
    run("job-2")
    assert encoded == {"T5": 0, "CLIP": 0, "VAE": 0}
    assert not any(line.startswith("Removed") for line in statuses)  # under the 5 GB default

    monkeypatch.setenv(DATA_CACHE_GB_ENV, "0")
    run("job-3")
    assert any(line.startswith("Removed") and str(shared) in line for line in statuses)
    assert encoded["VAE"] == 5  # its entries were pruned before it started


def entry(root, kind, name, size, age_seconds):
    path = root / kind / name[:2] / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    stamp = time.time() - age_seconds
    os.utime(path, (stamp, stamp))
    return path


def test_prune_removes_the_entries_used_least_recently_first(tmp_path):
    from safetensors.torch import save_file
    oldest = entry(tmp_path, "latents", "aa1", 1000, 300)
    old_text = entry(tmp_path, "text", "bb1", 1000, 200)
    newer = entry(tmp_path, "latents", "cc1", 1000, 100)
    read_back = tmp_path / "latents" / "dd" / "dd1.safetensors"  # old, but read just now
    read_back.parent.mkdir(parents=True)
    save_file({"mean": torch.zeros(4)}, str(read_back))
    os.utime(read_back, (time.time() - 1000,) * 2)
    assert cache_module._load(read_back) is not None
    writing = entry(tmp_path, "latents", ".ee1.123.tmp", 5000, 50)  # another run writes it
    crashed = entry(tmp_path, "text", ".ff1.456.tmp", 5000, 3 * 24 * 3600)
    quantized = entry(tmp_path, "quantized", "gg1", 9000, 5000)  # not a data cache
    old_prompts = entry(tmp_path, "prompts", "hh1", 1000, 250)  # trainer/sample_prompts.py

    removed, freed = cache_module.prune(tmp_path, 1500)  # 1000 + a small entry fit
    assert removed == 4 and freed == 3000 + 5000
    assert not oldest.exists() and not old_text.exists() and not crashed.exists()
    assert not old_prompts.exists()
    assert newer.exists() and read_back.exists() and writing.exists() and quantized.exists()
    assert cache_module.prune(tmp_path, 10**9) == (0, 0)
