"""Aspect-ratio buckets and multi-resolution: sides, counts, one bucket per batch, nothing
stretched, every listed size and only those, DDP sharding that never mixes buckets."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image

from trainer.config import TargetSize, config_from_dict
from trainer.data.buckets import (BucketBatchSampler, bucket_sizes, closest_bucket, plan_buckets,
                                  quantum_for)
from trainer.data.dataset import ImageItem, TrainDataset, collate, sample_geometry
from trainer.data.loader import DataPipeline


def items_of(sizes, repeats=1.0, resolution="", concept=0):
    return [ImageItem(Path(f"img{i}_{w}x{h}.png"), f"caption {i}", None, 1.0, concept,
                      repeats=repeats, size=(w, h), resolution=resolution)
            for i, (w, h) in enumerate(sizes)]


# --------------------------------------------------------------------------------------------
# Bucket sizes and assignment


@pytest.mark.parametrize("size, quantum", [(512, 8), (1024, 64), (64, 8), (768, 8)])
def test_buckets_have_the_target_area_and_quantised_sides(size, quantum):
    buckets = bucket_sizes(TargetSize(size, size), quantum)
    assert (size, size) in buckets
    for w, h in buckets:
        assert w % quantum == 0 and h % quantum == 0
        if min(w, h) >= 4 * quantum:  # coarse rounding of tiny sides aside
            assert abs(w * h / size**2 - 1) < 0.12, (w, h)
        assert (h, w) in buckets  # both orientations
    widest = max(w / h for w, h in buckets)
    assert 3.5 <= widest <= 4.5


def test_coarse_sides_never_change_the_area_much():
    """SDXL's 64 px steps at a small size: only the buckets near the asked area are kept."""
    assert bucket_sizes(TargetSize(64, 64), 64) == [(64, 64)]
    for target, quantum in ((512, 64), (48, 8), (1024, 64)):
        for w, h in bucket_sizes(TargetSize(target, target), quantum):
            assert 0.8 <= w * h / target**2 <= 1.25


def test_exact_size_is_its_own_only_bucket():
    assert bucket_sizes(TargetSize(768, 512, exact=True)) == [(768, 512)]


def test_quantum_follows_the_model_type():
    assert quantum_for("STABLE_DIFFUSION_15") == 8
    assert quantum_for("STABLE_DIFFUSION_XL_10_BASE") == 64


KNOWN = [
    # image (w, h), target, quantum -> bucket
    ((1000, 1000), 512, 8, (512, 512)),
    ((1536, 1024), 512, 8, (624, 416)),     # 3:2 -> 1.5 exactly
    ((1024, 1536), 512, 8, (416, 624)),     # 2:3
    ((1920, 1080), 512, 8, (680, 384)),     # 16:9 -> 1.75 bucket (1.77)
    ((1600, 1200), 512, 8, (592, 440)),     # 4:3
    ((4000, 1000), 512, 8, (1024, 256)),    # 4:1
    ((9000, 1000), 512, 8, (1024, 256)),    # 9:1: cropped to the widest bucket
    ((1536, 1024), 1024, 64, (1280, 832)),  # SDXL 3:2 (64 px sides)
    ((1024, 1024), 1024, 64, (1024, 1024)),
    ((1080, 1920), 1024, 64, (768, 1344)),  # SDXL 9:16
]


@pytest.mark.parametrize("image, target, quantum, bucket", KNOWN)
def test_images_go_to_the_bucket_of_the_closest_aspect_ratio(image, target, quantum, bucket):
    buckets = bucket_sizes(TargetSize(target, target), quantum)
    assert closest_bucket(image, buckets) == bucket
    aspect = math.log(image[0] / image[1])
    best = min(abs(math.log(w / h) - aspect) for w, h in buckets)
    assert abs(math.log(bucket[0] / bucket[1]) - aspect) == best


@pytest.mark.parametrize("image, target, quantum, bucket", KNOWN)
def test_nothing_is_stretched(image, target, quantum, bucket):
    """Scaled to cover the bucket with the image's own aspect ratio, then cropped."""
    geometry = sample_geometry(image, bucket)
    new_w, new_h = geometry.resized
    assert new_w >= bucket[0] and new_h >= bucket[1]                     # covers
    assert new_w == bucket[0] or new_h == bucket[1]                      # and no larger
    assert abs(new_w / new_h - image[0] / image[1]) < 2 / min(new_w, new_h) * image[0] / image[1] + 1e-9
    left, top, right, bottom = geometry.box
    assert (right - left, bottom - top) == bucket


def test_pixels_are_not_stretched(tmp_path):
    """A circle stays a circle: its width and height in the trained picture are equal."""
    image = Image.new("RGB", (300, 200), (0, 0, 0))
    from PIL import ImageDraw
    ImageDraw.Draw(image).ellipse((110, 60, 190, 140), fill=(255, 255, 255))  # 80x80 circle
    image.save(tmp_path / "c.png")
    item = ImageItem(tmp_path / "c.png", "", None, 1.0, 0, size=(300, 200))
    bucket = closest_bucket((300, 200), bucket_sizes(TargetSize(64, 64)))
    sample = TrainDataset([item], bucket)[0]
    white = sample["pixel_values"][0] > 0
    rows, cols = white.any(dim=1).sum().item(), white.any(dim=0).sum().item()
    assert sample["pixel_values"].shape[1:] == (bucket[1], bucket[0])
    assert abs(rows - cols) <= 1, (rows, cols)


# --------------------------------------------------------------------------------------------
# Plans, counts and the batch sampler


SIZES = [(1000, 1000)] * 5 + [(1536, 1024)] * 3 + [(1024, 1536)] * 4 + [(1920, 1080)]


def sampler_for(items, batch_size=2, resolution="512", bucketing=True, seed=0):
    dataset = TrainDataset(items, (64, 64), seed=seed)
    plan = plan_buckets(items, resolution, bucketing=bucketing, quantum=8)
    return dataset, BucketBatchSampler(dataset, plan, batch_size, seed)


def test_bucket_counts_and_one_bucket_per_batch():
    items = items_of(SIZES)
    dataset, sampler = sampler_for(items, batch_size=2)
    lines, warnings = sampler.report()
    assert lines == ["Buckets at 512 px (images per epoch): 512x512: 5, 416x624: 4, "
                     "624x416: 3, 680x384: 1"]
    assert len(warnings) == 1 and "3 bucket(s)" in warnings[0] and "No image is dropped" in warnings[0]
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 2 + 1
    seen = []
    for batch in batches:
        assert len({(w, h) for _, w, h, _ in batch}) == 1  # one bucket
        buckets = {closest_bucket(dataset.item_at(i).size, bucket_sizes(TargetSize(512, 512)))
                   for i, _, _, _ in batch}
        assert buckets == {batch[0][1:3]}
        seen += [i for i, *_ in batch]
    assert sorted(seen) == list(range(len(items)))  # every image once per epoch, none dropped


def test_batches_are_reproducible_and_reshuffled_each_epoch():
    items = items_of(SIZES)
    a = sampler_for(items, seed=3)
    b = sampler_for(items, seed=3)
    assert list(a[1]) == list(b[1])
    first = [[i for i, *_ in batch] for batch in a[1]]
    a[0].set_epoch(1)
    second = [[i for i, *_ in batch] for batch in a[1]]
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))


def test_collated_bucket_batches_stack(tmp_path):
    items = []
    for i, (w, h) in enumerate([(90, 60), (60, 90), (90, 60), (64, 64)]):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        items.append(ImageItem(tmp_path / f"{i}.png", "", None, 1.0, 0, size=(w, h)))
    dataset = TrainDataset(items, (64, 64))
    sampler = BucketBatchSampler(dataset, plan_buckets(items, "64", bucketing=True, quantum=8),
                                 2, 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    shapes = sorted(tuple(batch["pixel_values"].shape) for batch in loader)
    assert shapes == [(1, 3, 64, 64), (1, 3, 80, 56), (2, 3, 56, 80)]
    for batch in loader:
        h, w = batch["pixel_values"].shape[-2:]
        assert batch["target_size"] == [(h, w)] * len(batch["caption"])


def test_multi_resolution_yields_every_listed_size_and_only_those():
    items = items_of([(800, 800)] * 6)
    dataset, sampler = sampler_for(items, batch_size=2, resolution="384,448,512,576,640")
    sizes = Counter()
    for epoch in range(60):
        dataset.set_epoch(epoch)
        for batch in sampler:
            assert len({(w, h) for _, w, h, _ in batch}) == 1
            sizes[batch[0][1]] += 1
            assert batch[0][1] == batch[0][2]  # square images: square buckets
    assert set(sizes) == {384, 448, 512, 576, 640}
    assert min(sizes.values()) > 0.1 * sum(sizes.values())  # each drawn about 1/5 of the time


def test_multi_resolution_with_buckets_keeps_each_images_aspect_at_every_size():
    items = items_of([(1536, 1024)] * 2 + [(1000, 1000)] * 2)
    dataset, sampler = sampler_for(items, batch_size=2, resolution="512,768")
    seen = set()
    for epoch in range(30):
        dataset.set_epoch(epoch)
        for batch in sampler:
            _, w, h, _ = batch[0]
            kind = {dataset.item_at(i).size for i, *_ in batch}
            assert len(kind) == 1
            seen.add((kind.pop(), (w, h)))
    assert seen == {((1536, 1024), (624, 416)), ((1536, 1024), (944, 624)),
                    ((1000, 1000), (512, 512)), ((1000, 1000), (768, 768))}


def test_concept_resolution_override_and_bucketing_off():
    items = items_of([(1536, 1024)] * 2) + [
        ImageItem(Path("x.png"), "", None, 1.0, 1, size=(1536, 1024), resolution="256")]
    plan = plan_buckets(items, "512", bucketing=False, quantum=8)
    assert [plan.groups[g].sizes for g in plan.group_of_item] == [((512, 512),)] * 2 + [((256, 256),)]
    plan = plan_buckets(items, "512", bucketing=True, quantum=8)
    assert plan.groups[plan.group_of_item[2]].sizes == ((312, 208),)


def test_fractional_repeats_epoch_lengths_are_exact():
    """Half of the images per epoch, a different half each time: the buckets they fill, hence
    the batch count, vary; the step totals the loop plans with must still be exact."""
    items = items_of(SIZES, repeats=0.5)
    dataset, sampler = sampler_for(items, batch_size=2)
    counted = []
    for epoch in range(8):
        dataset.set_epoch(epoch)
        counted.append(len(list(sampler)))
        assert len(sampler) == counted[-1]
    assert len(set(counted)) > 1  # the case that needs per-epoch counts
    pipeline = SimpleNamespace(dataset=dataset, sampler=sampler, status=lambda m: None)
    assert DataPipeline.epoch_steps(pipeline, 8) == counted
    assert DataPipeline.epoch_steps(pipeline, 8, 2, 2) == [math.ceil(math.ceil(c / 2) / 2)
                                                           for c in counted]


@pytest.mark.parametrize("processes", [2, 3])
def test_ddp_shards_whole_batches_and_never_mixes_buckets(processes):
    """accelerate's BatchSamplerShard (what prepare() wraps the sampler in under DDP) sees no
    batch_size, so it hands out whole batches and evens the count out with whole batches."""
    items = items_of(SIZES)
    dataset, sampler = sampler_for(items, batch_size=2)
    shards = [BatchSamplerShard(sampler, processes, rank) for rank in range(processes)]
    per_rank = [list(shard) for shard in shards]
    assert len({len(batches) for batches in per_rank}) == 1  # same count on every process
    assert len(per_rank[0]) == len(shards[0]) == math.ceil(len(sampler) / processes)
    everything = [batch for batches in per_rank for batch in batches]
    for batch in everything:
        assert len({(w, h) for _, w, h, _ in batch}) == 1
    assert {i for batch in everything for i, *_ in batch} == set(range(len(items)))


def test_loader_workers_follow_the_epoch(tmp_path):
    """Persistent DataLoader workers hold a copy of the dataset; the epoch travels with each
    index, so they train the same samples as the main process."""
    for i in range(4):
        Image.effect_noise((48, 40), 60 + i).convert("RGB").save(tmp_path / f"{i}.png")
    items = [ImageItem(tmp_path / f"{i}.png", "a\nb\nc", None, 1.0, 0, repeats=0.5, size=(48, 40))
             for i in range(4)]
    dataset = TrainDataset(items, (32, 32), random_flip=True, crop="random", seed=5)
    sampler = BucketBatchSampler(dataset, plan_buckets(items, "32", bucketing=False, quantum=8),
                                 2, 5)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=1, persistent_workers=True)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        refs = list(sampler)
        for batch, ref in zip(loader, refs):
            expected = collate([dataset[r] for r in ref])
            assert torch.equal(batch["pixel_values"], expected["pixel_values"])
            assert batch["caption"] == expected["caption"]


def test_prefetch_threads_give_the_same_batches(tmp_path):
    """The sampler announces the batch after next; threads load it while the step runs. What
    arrives is exactly what loading on demand gives, epoch after epoch."""
    for i in range(6):
        Image.effect_noise((60 + 8 * i, 40), 60 + i).convert("RGB").save(tmp_path / f"{i}.png")
    items = [ImageItem(tmp_path / f"{i}.png", "one\ntwo", None, 1.0, 0, size=(60 + 8 * i, 40),
                       crop_jitter=True, random_flip=True) for i in range(6)]

    def batches(prefetch):
        dataset = TrainDataset(items, (32, 32), seed=2)
        sampler = BucketBatchSampler(dataset, plan_buckets(items, "32,40", bucketing=True,
                                                           quantum=8), 2, 2)
        if prefetch:
            dataset.enable_prefetch()
            sampler.prefetch = True
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
        out = []
        for epoch in range(3):
            dataset.set_epoch(epoch)
            out += [(b["pixel_values"], b["caption"], b["crop_top_left"]) for b in loader]
        return out, dataset

    plain, _ = batches(False)
    fetched, dataset = batches(True)
    assert len(plain) == len(fetched) > 6
    for (a, ca, ta), (b, cb, tb) in zip(plain, fetched):
        assert torch.equal(a, b) and ca == cb and ta == tb
    assert len(dataset._pending) <= 2  # only the last announcement is left unused


# --------------------------------------------------------------------------------------------
# Through the pipeline the loop uses


def test_pipeline_reports_buckets_and_counts_exact_epoch_steps(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, size in enumerate([(96, 64)] * 3 + [(64, 64)] * 2 + [(64, 96)]):
        Image.new("RGB", size, (i * 30, 90, 0)).save(folder / f"{i}.png")
    config = config_from_dict({"concepts": [{"path": str(folder), "prompt_source": "filename"}],
                               "resolution": "64", "batch_size": 2,
                               "workspace_dir": str(tmp_path / "ws")})
    from trainer.data.dataset import collect_items
    told = []
    data = DataPipeline(config, collect_items(config.concepts), status=told.append,
                        warn=told.append)
    assert "Buckets at 64 px (images per epoch): 80x56: 3, 64x64: 2, 56x80: 1" in told
    assert data.epoch_steps(3) == [2 + 1 + 1] * 3
    assert data.epoch_steps(1, num_processes=2) == [2]
    assert data.epoch_steps(1, accumulation=3) == [2]
    assert "Buckets at 64 px" in (tmp_path / "ws" / "data.log").read_text()


def test_real_run_trains_at_every_listed_size_and_only_those(tiny_sd15_dir, tmp_path,
                                                             monkeypatch):
    """Through the loop: the latents of each step have the size of a bucket of one of the
    listed resolutions; every listed resolution is used; the step count is exact."""
    import trainer.data.loader
    from trainer.control import Control
    from trainer.data.dataset import collect_items
    from trainer.demo import DEMO_DATASET_DIR
    from trainer.loop import train

    shapes = []
    original = trainer.data.loader.batch_latents

    def spy(batch, *args, **kwargs):
        latents = original(batch, *args, **kwargs)
        shapes.append(tuple(latents.shape[-2:]))
        return latents

    monkeypatch.setattr(trainer.data.loader, "batch_latents", spy)
    config = config_from_dict({
        "base_model_name": str(tiny_sd15_dir), "workspace_dir": str(tmp_path / "ws"),
        "concepts": [{"path": str(DEMO_DATASET_DIR)}], "resolution": "48,64",
        "train_dtype": "FLOAT_32", "gradient_checkpointing": False,
        "learning_rate_warmup_steps": 0, "lora_rank": 4, "batch_size": 2, "epochs": 10})
    events = []
    result = train(config, Control(on_event=events.append))
    expected = set()
    for item in collect_items(config.concepts):
        for size in (48, 64):
            w, h = closest_bucket(item.size, bucket_sizes(TargetSize(size, size)))
            expected.add((h // 8, w // 8))
    assert expected == {(6, 6), (5, 8), (8, 8), (7, 10)}
    assert set(shapes) == expected and len(shapes) == result.global_step == 30
    statuses = [e["message"] for e in events if e["type"] == "status"]
    assert "Buckets at 48 px (images per epoch): 64x40: 3, 48x48: 2" in statuses
    assert "Buckets at 64 px (images per epoch): 80x56: 3, 64x64: 2" in statuses
    progress = [e for e in events if e["type"] == "progress"]
    assert progress[-1]["total_steps"] == 30 and progress[-1]["epoch_step"] == 3


@pytest.mark.parametrize("env, expected", [
    ({}, False),                                         # the CLI: OpenMP's default policy
    ({"OMP_WAIT_POLICY": "passive"}, True),              # the app
    ({"OMP_WAIT_POLICY": "PASSIVE", "ATELIER_DATA_PREFETCH": "0"}, False),
    ({"ATELIER_DATA_PREFETCH": "1"}, True),
])
def test_prefetch_threads_only_where_openmp_threads_sleep(monkeypatch, env, expected):
    from trainer.data.loader import prefetch_threads_pay
    for key in ("OMP_WAIT_POLICY", "ATELIER_DATA_PREFETCH"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert prefetch_threads_pay() is expected
