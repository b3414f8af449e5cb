"""Warnings about the user's own settings and data, worked out before training starts, with
the numbers that make them actionable. The loop emits them (so the CLI prints them and the page
lists them); the page's LR preview shows the warm-up one before Start is even pressed."""
from __future__ import annotations

from typing import Sequence

from trainer.config import LearningRateScheduler, TrainConfig
from trainer.optim.schedules import warmup_steps

NAMES_SHOWN = 3


def warmup_longer_than_run(config: TrainConfig, total_steps: int) -> str | None:
    """A warm-up of at least the whole run never lets the learning rate reach its value."""
    if total_steps <= 0 or config.learning_rate_scheduler in (LearningRateScheduler.CUSTOM,
                                                              LearningRateScheduler.ADAFACTOR):
        return None  # these schedules do not use learning_rate_warmup_steps
    warm = warmup_steps(config.learning_rate_warmup_steps, total_steps)
    if warm < total_steps:
        return None
    peak = (total_steps - 1) / warm  # the last update, still in the warm-up ramp
    return (f"The warm-up (learning_rate_warmup_steps {config.learning_rate_warmup_steps:g} = "
            f"{warm} steps) is longer than the whole run ({total_steps} optimizer steps): the "
            f"learning rate never reaches {config.learning_rate:g}; it ends at "
            f"{config.learning_rate * peak:.2g} ({peak:.1%} of it). Lower the warm-up (a value "
            f"≤ 1 is a fraction of the run, e.g. 0.1) or train for more steps.")


def images_without_masks(config: TrainConfig, items: Sequence) -> str | None:
    """With masked training on, images with no mask train on the whole image: say how many."""
    if not config.masked_training:
        return None
    bare = [item.image_path for item in items if item.mask_path is None]
    if not bare:
        return None
    names = ", ".join(f"'{path.name}'" for path in bare[:NAMES_SHOWN])
    more = f" and {len(bare) - NAMES_SHOWN} more" if len(bare) > NAMES_SHOWN else ""
    # An inpainting model learns (and is weighted) inside its conditioning mask, which for
    # these images is a random circle (trainer/inpainting.py).
    instead = ("learn to inpaint a random circle each epoch" if config.model_type.is_inpainting
               else "train on the whole image")
    return (f"masked_training is on, but {len(bare)} of {len(items)} images have no mask "
            f"(<image name>-masklabel.png beside the image) and {instead}: {names}{more}.")
