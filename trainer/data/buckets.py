"""Aspect-ratio buckets, multi-resolution and the batch sampler that keeps one bucket per batch.

For a target size (512 = a 512x512 pixel area) the buckets are sizes of about that area at a
fixed list of aspect ratios, both orientations, sides rounded to a multiple of 8 (SD 1.5) or 64
(SDXL). An image goes to the bucket whose aspect ratio is closest to its own (compared in log
space, so 2:1 and 1:2 are equally far from 1:1); it is then scaled to cover the bucket and
cropped — never stretched. An exact WIDTHxHEIGHT target has one bucket: itself.

With a resolution list (384,512,640) every step trains at a size drawn per batch. Images are
grouped by their bucket at *every* listed size, so a batch is one bucket whatever size is drawn
for it: the group's key is the tuple of its buckets.

`BucketBatchSampler` yields, per epoch, batches of `(sample index, width, height, epoch)`. It exposes no
`batch_size` (batches vary in size: a bucket's last batch may be partial), which tells
accelerate's `BatchSamplerShard` to shard whole batches under DDP and never to mix buckets.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.config import TargetSize, parse_resolution

# Width:height ratios of the landscape buckets (OneTrainer's list plus 4:3, the camera ratio);
# each is mirrored for portraits. Beyond 4:1 images are cropped to the 4:1 bucket.
ASPECT_RATIOS = (1.0, 1.25, 4 / 3, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)

SD15_QUANTUM = 8
MIN_AREA_SHARE = 0.8  # a bucket's area stays within 80%..125% of the target's
SDXL_QUANTUM = 64


def quantum_for(model_type) -> int:
    """Bucket sides are multiples of this: the family's (trainer/models/registry.py): 64 for
    SDXL, 8 for SD 1.5, 16 for the transformers that pack 2x2 latent pixels into a token."""
    from trainer.models.registry import facts
    return facts(model_type).bucket_quantum


def _round_to(value: float, quantum: int) -> int:
    return max(quantum, int(round(value / quantum)) * quantum)


def bucket_sizes(target: TargetSize | tuple[int, int], quantum: int = SD15_QUANTUM,
                 ratios: Sequence[float] = ASPECT_RATIOS) -> list[tuple[int, int]]:
    """The (width, height) buckets of a target: about its pixel area, one per aspect ratio and
    orientation, sides multiples of `quantum`, sorted from tallest to widest, no duplicates.
    An exact target (WIDTHxHEIGHT) is its own single bucket."""
    target = TargetSize(*target) if not isinstance(target, TargetSize) else target
    if target.exact:
        return [(target.width, target.height)]
    area = target.width * target.height
    sizes = {(_round_to(target.width, quantum), _round_to(target.height, quantum))}
    for ratio in ratios:
        for r in (ratio, 1 / ratio):
            size = (_round_to(math.sqrt(area * r), quantum), _round_to(math.sqrt(area / r), quantum))
            # Rounding to coarse steps (64 px at small sizes) can miss the area badly: such a
            # bucket would train at another resolution than asked, so it is left out.
            if MIN_AREA_SHARE <= size[0] * size[1] / area <= 1 / MIN_AREA_SHARE:
                sizes.add(size)
    return sorted(sizes, key=lambda wh: (wh[0] / wh[1], wh[0]))


def closest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to that of `size` = (width, height)."""
    aspect = math.log(size[0] / size[1])
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


@dataclass(frozen=True)
class Group:
    """Images batched together: one bucket per target size of their resolution list."""
    sizes: tuple[tuple[int, int], ...]   # (width, height) at each listed target, in list order
    targets: tuple[TargetSize, ...]

    def label(self) -> str:
        return "/".join(f"{w}x{h}" for w, h in dict.fromkeys(self.sizes))


@dataclass
class BucketPlan:
    """Which group every item belongs to, and what the run should be told about it."""
    groups: list[Group]
    group_of_item: list[int]
    cropped_extreme: list[int]     # items more elongated than the widest bucket
    upscaled: list[int]            # items smaller than their bucket at the largest target


def plan_buckets(items: Sequence, default_resolution: str, *, bucketing: bool,
                 quantum: int) -> BucketPlan:
    """Group `items` (objects with `size` (w, h) and `resolution` ('' = default)) by bucket."""
    groups: dict[Group, int] = {}
    group_of_item, extreme, upscaled = [], [], []
    widest = max(ASPECT_RATIOS)
    for index, item in enumerate(items):
        targets = tuple(parse_resolution(getattr(item, "resolution", "") or default_resolution))
        width, height = item.size
        if bucketing:
            sizes = tuple(closest_bucket((width, height), bucket_sizes(t, quantum))
                          for t in targets)
            if max(width / height, height / width) > widest * 1.05 and not all(
                    t.exact for t in targets):
                extreme.append(index)
        else:
            sizes = tuple((t.width, t.height) for t in targets)
        largest = max(sizes, key=lambda wh: wh[0] * wh[1])
        if width < largest[0] or height < largest[1]:
            upscaled.append(index)
        group = Group(sizes, targets)
        group_of_item.append(groups.setdefault(group, len(groups)))
    return BucketPlan(list(groups), group_of_item, extreme, upscaled)


def _entropy(value: int) -> int:
    return int(value) % (1 << 64)


class BucketBatchSampler:
    """Batches of one bucket each, shuffled, reproducible from (seed, epoch).

    Reads the current epoch's samples from `dataset` (its `epoch` and `item_index(i)`), so the
    dataset's `set_epoch` drives both. Every batch gets a size drawn from its group's list (one
    draw per batch). Yields lists of `(sample index, width, height, epoch)`: the epoch travels
    with the index so that DataLoader workers' copies of the dataset follow it.
    """

    def __init__(self, dataset, plan: BucketPlan, batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.plan = plan
        self.max_batch_size = int(batch_size)  # not `batch_size`: see the module docstring
        self.seed = int(seed)
        # Announce the next batch to the dataset (single process, no worker processes: under
        # DDP this process trains only every n-th batch).
        self.prefetch = False

    def _by_group(self) -> dict[int, list[int]]:
        members: dict[int, list[int]] = {}
        for sample in range(len(self.dataset)):
            group = self.plan.group_of_item[self.dataset.item_index(sample)]
            members.setdefault(group, []).append(sample)
        return dict(sorted(members.items()))

    def batches(self) -> list[list[tuple[int, int, int]]]:
        """This epoch's batches, in training order."""
        epoch = _entropy(self.dataset.epoch)
        order_rng = np.random.default_rng([_entropy(self.seed), epoch, 0xB0C4E7])
        size_rng = np.random.default_rng([_entropy(self.seed), epoch, 0x512E5])
        chunks: list[tuple[int, list[int]]] = []
        for group, samples in self._by_group().items():
            samples = [samples[i] for i in order_rng.permutation(len(samples))]
            for start in range(0, len(samples), self.max_batch_size):
                chunks.append((group, samples[start:start + self.max_batch_size]))
        result = []
        for position in order_rng.permutation(len(chunks)):
            group, samples = chunks[position]
            sizes = self.plan.groups[group].sizes
            width, height = sizes[int(size_rng.integers(len(sizes)))]
            result.append([(sample, width, height, epoch) for sample in samples])
        return result

    def __iter__(self):
        batches = self.batches()
        for number, batch in enumerate(batches):
            if self.prefetch and number + 1 < len(batches):
                # The loader reads one batch ahead; announce the one after it.
                self.dataset.prefetch(batches[number + 1])
            yield batch

    def __len__(self) -> int:
        return sum(math.ceil(len(s) / self.max_batch_size) for s in self._by_group().values())

    def report(self) -> tuple[list[str], list[str]]:
        """(status lines, warning lines) about the buckets of the current epoch."""
        plan, items = self.plan, self.dataset.items
        members = self._by_group()
        lines, warnings = [], []
        # Buckets per target size, counted in samples of one epoch (repeats included).
        per_target: dict[TargetSize, Counter] = {}
        for group, samples in members.items():
            for target, size in zip(plan.groups[group].targets, plan.groups[group].sizes):
                per_target.setdefault(target, Counter())[size] += len(samples)
        for target, counts in per_target.items():
            name = (f"{target.width}x{target.height}" if target.exact else f"{target.width} px")
            listed = ", ".join(f"{w}x{h}: {n}" for (w, h), n in
                               sorted(counts.items(), key=lambda kv: -kv[1]))
            lines.append(f"Buckets at {name} (images per epoch): {listed}")
        partial = [(plan.groups[g].label(), len(s) % self.max_batch_size, len(s))
                   for g, s in members.items() if len(s) % self.max_batch_size]
        if partial and self.max_batch_size > 1:
            shown = "; ".join(f"{label}: {n} image(s) in a batch of {rest}"
                              for label, rest, n in partial[:6])
            warnings.append(
                f"{len(partial)} bucket(s) do not fill their last batch of {self.max_batch_size} "
                f"(a batch never mixes buckets), so those images train in a smaller batch: "
                f"{shown}{' …' if len(partial) > 6 else ''}. No image is dropped.")
        if plan.cropped_extreme:
            names = ", ".join(f"'{items[i].image_path.name}'" for i in plan.cropped_extreme[:3])
            warnings.append(f"{len(plan.cropped_extreme)} image(s) are more elongated than the "
                            f"widest bucket (4:1), e.g. {names}; they are cropped to it.")
        if plan.upscaled:
            names = ", ".join(f"'{items[i].image_path.name}'" for i in plan.upscaled[:3])
            warnings.append(f"{len(plan.upscaled)} image(s) are smaller than their training "
                            f"size, e.g. {names}; they are upscaled (softer detail).")
        return lines, warnings
