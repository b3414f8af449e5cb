"""What one visitor may ask of a shared server (issue 23): limits per job and per user.

A local server has none (`ServerLimits()`); a shared one (`--listen`, `--share`, a Space)
starts with `ServerLimits.shared_defaults()`, each changeable with an app.py option, and the
page shows them. Each limit refuses with one sentence naming it and the option that sets it.
Dataset and workspace quotas are `trainer.data.imports.ImportLimits` (uploads and every other
write into a dataset).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerLimits:
    max_steps_per_job: int | None = None   # optimizer steps of one job (epochs x steps/epoch)
    max_jobs_per_user: int | None = None   # a user's running + queued jobs
    try_max_size: int | None = None        # Try it: width and height, pixels
    try_max_steps: int | None = None       # Try it: diffusion steps
    max_caption_chars: int | None = None   # a caption after any edit

    @classmethod
    def shared_defaults(cls) -> "ServerLimits":
        # Sized for one GPU shared by a few people: a long LoRA run is a few thousand
        # steps; 1536 px and 60 steps cover every SD 1.5 / SDXL try.
        return cls(max_steps_per_job=50_000, max_jobs_per_user=4, try_max_size=1536,
                   try_max_steps=60, max_caption_chars=2_000)


# The app.py option of each limit, named in refusals.
LIMIT_OPTIONS = {"max_steps_per_job": "--max-steps-per-job",
                 "max_jobs_per_user": "--max-jobs-per-user",
                 "try_max_size": "--try-max-size", "try_max_steps": "--try-max-steps",
                 "max_caption_chars": "--max-caption-chars"}


# -- the steps a job will train (what max_steps_per_job is compared with) ----------------------

def count_images(folder: str, subfolders: bool = False) -> int:
    """Image files in `folder` (and its subfolders, hidden ones left out, when asked), as
    training lists them; 0 when it is not a folder. Not decoded: this is an estimate. Links
    are not followed into other folders. Call it on a folder the caller may read."""
    from trainer.data.images import is_image_file
    root = Path(folder).expanduser()
    if not root.is_dir():
        return 0
    count = 0
    for current, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if subfolders else []
        count += sum(1 for name in files if is_image_file(Path(current) / name))
    return count


def epoch_images(concepts, count=None) -> int:
    """Samples one epoch visits: each enabled concept's images x its repeats, a fractional
    repeat taking that share of the images (at least one), as the dataset expands them;
    REGULARIZATION concepts add as many as the others take.
    `count(concept, index)` counts a concept's images (None: not a folder); by default
    `count_images` of its folder (the page's count checks who may read it first)."""
    total, counted, regularization = 0, {}, 0
    for index, concept in enumerate(concepts):
        if not concept.enabled or concept.repeats <= 0:
            continue
        where = (concept.path, bool(concept.include_subdirectories))
        if where not in counted:  # one folder named by many concepts is walked once
            counted[where] = (count(concept, index) if count is not None
                              else count_images(*where)) or 0
        n = counted[where]
        if getattr(concept.type, "value", concept.type) == "REGULARIZATION":
            regularization += n  # as many as the others take, whatever their repeats
            continue
        whole = int(math.floor(concept.repeats))
        extra = int(math.floor((concept.repeats - whole) * n + 0.5))
        if n and whole == 0 and extra == 0:
            extra = 1
        total += n * whole + extra
    return total * 2 if regularization else total


def estimate_steps(config, count=None) -> tuple[int, int, int]:
    """(total optimizer steps, steps per epoch, samples per epoch) of `config` on one
    process: samples divided into batches, batches into accumulation groups, times epochs.
    `count`: as for `epoch_images`."""
    images = epoch_images(config.concepts, count)
    batches = math.ceil(images / config.batch_size) if images else 0
    per_epoch = math.ceil(batches / config.gradient_accumulation_steps) if batches else 0
    return per_epoch * config.epochs, per_epoch, images


def refuse_over(value: int | float, limit: int | None, what: str, key: str) -> None:
    """ConfigError when `value` is above the limit `key` (None: no limit), naming the limit
    and the option that sets it."""
    from trainer.errors import ConfigError
    if limit is not None and value > limit:
        raise ConfigError(f"{what} {value:,} is above this server's limit of {limit:,} "
                          f"({LIMIT_OPTIONS[key]}).")
