"""Latent and text caching: reuse on a second run, exact invalidation when one image or one mask
is touched, the same training with and without the cache, correctness under random crop/flip
and multi-line captions."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer.config import config_from_dict
from trainer.control import Control
from trainer.data.cache import CacheStats, LatentCache, TextCache, batch_latents, file_stamp
from trainer.data.dataset import (ImageItem, TrainDataset, collate, latent_mask, sample_geometry)
from trainer.demo import DEMO_DATASET_DIR
from trainer.loop import train

from helpers import RUNS_ARE_BIT_EXACT


def run(model_dir, workspace, data, **overrides):
    """A 1-epoch tiny run; returns (status messages, result)."""
    values = {
        "base_model_name": str(model_dir), "workspace_dir": str(workspace),
        "concepts": [{"path": str(data)}], "resolution": "64", "train_dtype": "FLOAT_32",
        "gradient_checkpointing": False, "learning_rate": 1e-2,
        "learning_rate_warmup_steps": 0, "lora_rank": 4, "batch_size": 2, "epochs": 1,
        "text_encoder": {"train": False},
    }
    values.update(overrides)
    events = []
    result = train(config_from_dict(values), Control(on_event=events.append))
    return [e["message"] for e in events if e["type"] == "status"], result


def cache_report(messages):
    """(reused, encoded) from the first 'Latent cache after epoch 1' status."""
    for message in messages:
        found = re.search(r"Latent cache after epoch 1: (\d+) sample\(s\) reused, (\d+) encoded",
                          message)
        if found:
            return int(found.group(1)), int(found.group(2))
    raise AssertionError(f"no cache report in {messages}")


def entries(workspace, kind="latents"):
    return sorted((Path(workspace) / "cache" / kind).rglob("*.safetensors"))


def touch(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


@pytest.fixture()
def demo_copy(tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(DEMO_DATASET_DIR, folder)
    return folder


def test_second_run_reuses_and_touching_an_image_or_mask_reencodes_only_it(
        tiny_sd15_dir, tmp_path, demo_copy):
    workspace = tmp_path / "ws"
    messages, _ = run(tiny_sd15_dir, workspace, demo_copy)
    assert cache_report(messages) == (0, 5)
    assert len(entries(workspace)) == 5
    assert len(entries(workspace, "text")) == 5  # five different captions, frozen encoder
    assert any("text cache: 0 reused, 5 encoded" in m for m in messages)

    messages, _ = run(tiny_sd15_dir, workspace, demo_copy)
    assert cache_report(messages) == (5, 0)
    assert any("text cache: 5 reused, 0 encoded" in m for m in messages)
    assert len(entries(workspace)) == 5
    assert "5 sample(s) reused" in (workspace / "data.log").read_text()

    touch(demo_copy / "cat.jpg")
    messages, _ = run(tiny_sd15_dir, workspace, demo_copy)
    assert cache_report(messages) == (4, 1)
    assert len(entries(workspace)) == 6

    touch(demo_copy / "coffee-masklabel.png")
    messages, _ = run(tiny_sd15_dir, workspace, demo_copy)
    assert cache_report(messages) == (4, 1)

    # another training size is another entry; the old ones stay valid
    messages, _ = run(tiny_sd15_dir, workspace, demo_copy, resolution="48")
    assert cache_report(messages) == (0, 5)
    messages, _ = run(tiny_sd15_dir, workspace, demo_copy)
    assert cache_report(messages) == (5, 0)


def lora_tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_cached_training_trains_what_uncached_training_trains(tiny_sd15_dir, tmp_path):
    """Mean and std are cached, so each step still draws mean + std·ε from the same generator:
    the cache changes the speed, not the run (up to float rounding of batched convolutions)."""
    _, plain = run(tiny_sd15_dir, tmp_path / "off", DEMO_DATASET_DIR, epochs=3,
                   latent_caching=False)
    assert not (tmp_path / "off" / "cache").exists()  # switched off: nothing written
    _, filling = run(tiny_sd15_dir, tmp_path / "on", DEMO_DATASET_DIR, epochs=3)
    messages, warm = run(tiny_sd15_dir, tmp_path / "on", DEMO_DATASET_DIR, epochs=3)
    assert cache_report(messages) == (5, 0)
    reference = lora_tensors(plain.output_path)
    for result in (filling, warm):
        trained = lora_tensors(result.output_path)
        assert trained.keys() == reference.keys()
        for key, value in reference.items():
            # Adam divides by the gradients' running RMS, so rounding-level differences of
            # tiny gradients show in single weights; the tensors as a whole agree closely.
            difference = (trained[key] - value).norm() / value.norm().clamp(min=1e-12)
            assert difference < (1e-3 if RUNS_ARE_BIT_EXACT else 5e-3), (key, float(difference))


# --------------------------------------------------------------------------------------------
# Keys


def _item(tmp_path, name="a", mask=True, size=(48, 40)):
    Image.effect_noise(size, 70).convert("RGB").save(tmp_path / f"{name}.png")
    mask_path = None
    if mask:
        mask_path = tmp_path / f"{name}-masklabel.png"
        Image.new("L", size, 200).save(mask_path)
    return ImageItem(tmp_path / f"{name}.png", "x", mask_path, 1.0, 0, size=size)


def test_key_covers_file_size_crop_flip_vae_and_dtype(tmp_path):
    item = _item(tmp_path)
    cache = LatentCache(tmp_path / "c", ["vae", 1], "torch.float32", 8)
    base = sample_geometry(item.size, (32, 32))
    key = cache.key(item, base)
    assert key == cache.key(item, sample_geometry(item.size, (32, 32)))
    variants = [
        cache.key(item, sample_geometry(item.size, (32, 32), flip=True)),
        cache.key(item, sample_geometry(item.size, (40, 32))),
        cache.key(item, sample_geometry(item.size, (32, 32), crop="random",
                                        rng=np.random.default_rng(4))),
        LatentCache(tmp_path / "c", ["vae", 2], "torch.float32", 8).key(item, base),
        LatentCache(tmp_path / "c", ["vae", 1], "torch.bfloat16", 8).key(item, base),
        cache.key(ImageItem(item.image_path, "x", None, 1.0, 0, size=item.size), base),
    ]
    assert key not in variants and len(set(variants)) == len(variants)
    touch(item.mask_path)
    assert cache.key(item, base) != key
    assert cache.key(ImageItem(tmp_path / "gone.png", "", None, 1.0, 0, size=(8, 8)), base) is None


def test_damaged_entry_is_re_encoded_not_fatal(tmp_path):
    cache = LatentCache(tmp_path, "vae", "f32", 8)
    cache.store("ab" * 32, torch.ones(4, 2, 2), torch.ones(4, 2, 2), None)
    assert cache.load("ab" * 32)["mean"].shape == (4, 2, 2)
    cache.path("ab" * 32).write_bytes(b"broken")
    later = LatentCache(tmp_path, "vae", "f32", 8)  # the next run finds the damage
    assert later.load("ab" * 32) is None and not later.path("ab" * 32).exists()


def test_entries_stay_in_memory_within_the_budget_and_workers_start_empty(tmp_path):
    import pickle
    entry_bytes = 2 * 4 * 2 * 2 * 4  # mean and std, 4x2x2 float32
    cache = LatentCache(tmp_path, "vae", "f32", 8, memory_bytes=2 * entry_bytes)
    keys = [f"{i:02d}" * 32 for i in range(3)]
    for i, key in enumerate(keys):
        cache.store(key, torch.full((4, 2, 2), float(i)), torch.ones(4, 2, 2), None)
        cache.load(key)
    # the newest two are held; reading them again touches no file
    for key in keys:
        cache.path(key).rename(cache.path(key).with_suffix(".moved"))
    assert cache.load(keys[1])["mean"][0, 0, 0] == 1 and cache.load(keys[2]) is not None
    assert cache.load(keys[0]) is None  # evicted first (least recently used), and gone on disk
    worker = pickle.loads(pickle.dumps(cache))  # a DataLoader worker's copy: files only
    assert worker.load(keys[2]) is None and cache.load(keys[2]) is not None
    cache.path(keys[2]).with_suffix(".moved").rename(cache.path(keys[2]))
    assert worker.load(keys[2]) is not None and not worker._memory


class FakeVAE(torch.nn.Module):
    """An 8x 'encoder' (average pooling) with a per-pixel std, so what is stored and reused is
    checkable by hand."""

    class config:
        scaling_factor = 0.5
        block_out_channels = (1, 1, 1, 1)

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def encode(self, pixels):
        self.calls += len(pixels)
        mean = torch.nn.functional.avg_pool2d(pixels, 8)
        std = 0.1 + mean.abs()
        dist = type("Dist", (), {"mean": mean, "std": std})
        return type("Out", (), {"latent_dist": dist})


def test_cache_is_right_under_random_crop_and_flip(tmp_path):
    """Every reused entry holds exactly the latents and mask of the crop and flip the sample
    draws now; new crops are encoded, repeated ones reused."""
    items = []
    for name in "ab":
        item = _item(tmp_path, name, size=(40, 32))
        Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (32, 1))).save(item.mask_path)
        item.crop_jitter = item.random_flip = True
        item.repeats = 4
        items.append(item)
    dataset = TrainDataset(items, (32, 32), seed=1)
    cache = LatentCache(tmp_path / "cache", "fake", "f32", 8)
    vae, stats = FakeVAE(), CacheStats()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            ref = (index, 32, 32, epoch)
            dataset.latent_cache = None
            fresh = dataset[ref]
            expected_mean = torch.nn.functional.avg_pool2d(fresh["pixel_values"][None], 8)[0]
            dataset.latent_cache = cache
            sample = dataset[ref]
            assert sample["crop_top_left"] == fresh["crop_top_left"]
            assert torch.equal(sample["mask"], latent_mask(fresh["mask"], (32, 32), 8))
            if "latent_mean" in sample:
                assert torch.equal(sample["latent_mean"], expected_mean)
            batch_latents(collate([sample]), vae, torch.Generator().manual_seed(0), "cpu",
                          cache, stats)
    assert stats.reused > 10 and stats.encoded > 10, stats
    assert vae.calls == stats.encoded
    assert len(list(cache.folder.rglob("*.safetensors"))) == stats.encoded


def test_mixed_batch_draws_like_the_uncached_vae(tmp_path):
    """Half cached, half encoded: the latents equal `latent_dist.sample(generator)` of the
    whole batch with the same generator."""
    items = [_item(tmp_path, n, mask=False, size=(32, 32)) for n in "abcd"]
    dataset = TrainDataset(items, (32, 32))
    cache = LatentCache(tmp_path / "cache", "fake", "f32", 8)
    vae = FakeVAE()
    dataset.latent_cache = cache
    first = collate([dataset[(i, 32, 32, 0)] for i in (0, 2)])
    batch_latents(first, vae, None, "cpu", cache)  # caches 0 and 2
    mixed = collate([dataset[(i, 32, 32, 0)] for i in range(4)])
    assert mixed["latent_index"] == [0, 2] and mixed["pixel_index"] == [1, 3]
    got = batch_latents(mixed, vae, torch.Generator().manual_seed(9), "cpu", cache)
    dataset.latent_cache = None
    pixels = collate([dataset[(i, 32, 32, 0)] for i in range(4)])["pixel_values"]
    dist = vae.encode(pixels).latent_dist
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, (dist.mean + dist.std * noise) * 0.5)


# --------------------------------------------------------------------------------------------
# Text


class FakeFamily:
    """Conditioning that spells the caption; `original_size` depends on the batch."""

    text_cache_keys = ("encoder_hidden_states",)

    def __init__(self):
        self.encoded: list[str] = []

    def encode_text(self, captions, batch, *, clip_skip, device, grad):
        self.encoded += captions
        codes = [[float(ord(c)) for c in caption.ljust(12)[:12]] for caption in captions]
        out = {"encoder_hidden_states": torch.tensor(codes)[:, None, :] + clip_skip}
        out.update(self.batch_conditioning(batch, device))
        return out

    def batch_conditioning(self, batch, device):
        return {"original_size": torch.tensor(batch["original_size"], dtype=torch.float32)}


def test_text_cache_keys_by_caption_line_and_keeps_batch_conditioning(tmp_path):
    family = FakeFamily()
    cache = TextCache(tmp_path / "text", ["te", 1], keys=family.text_cache_keys)

    def condition(captions, sizes, store=cache):
        batch = {"caption": captions, "original_size": sizes}
        return store.conditioning(family, captions, batch, clip_skip=0, device="cpu", grad={})

    # multi-line caption files give one line per sample: each line is its own entry
    out = condition(["first way", "second way", "first way"], [(1, 2), (3, 4), (5, 6)])
    fresh = family.encode_text(["first way", "second way", "first way"],
                               {"original_size": [(1, 2), (3, 4), (5, 6)]}, clip_skip=0,
                               device="cpu", grad={})
    assert torch.equal(out["encoder_hidden_states"], fresh["encoder_hidden_states"])
    assert out["original_size"].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert family.encoded[:2] == ["first way", "second way"]  # each caption encoded once
    family.encoded.clear()
    out = condition(["second way", ""], [(7, 8), (9, 9)])  # "" = caption dropout
    assert family.encoded == [""]
    assert out["original_size"].tolist() == [[7, 8], [9, 9]]  # never cached
    # a new process (empty memory) reads the disk; another identity does not
    family.encoded.clear()
    condition(["first way"], [(1, 1)], TextCache(tmp_path / "text", ["te", 1],
                                                 keys=family.text_cache_keys))
    assert family.encoded == []
    condition(["first way"], [(1, 1)], TextCache(tmp_path / "text", ["te", 2],
                                                 keys=family.text_cache_keys))
    assert family.encoded == ["first way"]
    assert file_stamp(tmp_path / "nothing") is None
