"""What one visitor may ask of a shared server (issue 23): limits per job and per user.

A local server has none (`ServerLimits()`); a shared one (`--listen`, `--share`, a Space)
starts with `ServerLimits.shared_defaults()`, each changeable with an app.py option, and the
page shows them. Each limit refuses with one sentence naming it and the option that sets it.
Dataset and workspace quotas are `trainer.data.imports.ImportLimits` (uploads and every other
write into a dataset).
"""
from __future__ import annotations

from dataclasses import dataclass


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
