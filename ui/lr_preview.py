"""The learning-rate curves of the current settings, drawn before training starts: one per
parameter group the run will have (text encoders, UNet, embeddings), each the schedule's
factor times that group's own learning rate.

Total steps are estimated as the loop counts them: images of the enabled concepts x repeats per
epoch, divided into batches, then into accumulation groups, times the epochs. Images are counted,
not decoded (a corrupt file the loop would skip makes the estimate a little long). Only folders
the visitor may read are counted (`concept_images`): on a shared server the preview is no way
to learn what another user's folder, or any folder on the disk, holds.
"""
from __future__ import annotations

import math

import pandas as pd

from trainer.advice import warmup_longer_than_run
from trainer.config import TrainConfig, TrainingMethod
from trainer.errors import AtelierError
from trainer import limits
from trainer.optim.schedules import lr_curve
from trainer.ownership import Access
from ui.files import readable
from ui.tables import count_images

MAX_POINTS = 400


def concept_images(concept, index: int, access: Access | None = None) -> int | None:
    """The image files of concept number `index` (0-based) without decoding them; None when
    its folder does not exist. ConfigError naming the concept when the visitor may not read
    its folder: then nothing is looked at (not even whether it exists)."""
    readable(concept.path, f"concepts[{index}].path", access)
    return count_images(concept.path, concept.include_subdirectories)


def epoch_images(concepts, access: Access | None = None) -> int:
    """Images one epoch visits, with repeats (as the dataset expands them); only folders the
    visitor may read are counted (ConfigError naming the first other one)."""
    return limits.epoch_images(concepts, lambda c, i: concept_images(c, i, access))


def estimate_steps(config: TrainConfig, access: Access | None = None) -> tuple[int, int, int]:
    """(total optimizer steps, steps per epoch, images per epoch): the engine's estimate
    (the one a shared server's step limit is checked with), counting only readable folders."""
    return limits.estimate_steps(config, lambda c, i: concept_images(c, i, access))


GROUP_LABELS = {"text_encoder": "text encoder", "text_encoder_2": "text encoder 2",
                "unet": "UNet", "embeddings": "embeddings"}


def parameter_groups(config: TrainConfig) -> dict[str, float]:
    """The run's parameter groups (as the loop builds them) and their learning rates."""
    groups = {}
    if config.training_method != TrainingMethod.EMBEDDING:
        parts = ["text_encoder", "unet"] + (["text_encoder_2"] if config.model_type.is_sdxl
                                            else [])
        for part in parts:
            if getattr(config, part).train:
                groups[GROUP_LABELS[part]] = config.part_learning_rate(part)
    if any(e.train for e in config.additional_embeddings):
        groups[GROUP_LABELS["embeddings"]] = config.part_learning_rate("embeddings")
    return groups or {"base": config.learning_rate}


def curve_frame(config: TrainConfig, allow_custom_code: bool = False,
                access: Access | None = None) -> tuple[pd.DataFrame, str]:
    """(a DataFrame of step / learning rate / group, a one-line caption). `access`: whose
    folders may be counted (None: the visitor of a server without a login)."""
    try:
        total, per_epoch, images = estimate_steps(config, access)
    except AtelierError as error:  # a concept folder the visitor may not read
        return empty_frame(), f"No preview: {error}"
    if total == 0:
        return empty_frame(), ("No images found in the enabled concepts yet; the curve needs "
                               "the step count.")
    try:
        values = lr_curve(config, total, steps_per_epoch=per_epoch,
                          allow_custom_code=allow_custom_code)
    except (AtelierError, ValueError) as error:  # e.g. CUSTOM on a shared server
        return empty_frame(), f"No preview: {error}"
    if not values:
        return empty_frame(), ("No preview: with the ADAFACTOR schedule Adafactor sets the "
                               "learning rate itself, from the gradients.")
    stride = max(1, math.ceil(total / MAX_POINTS))
    steps = list(range(0, total, stride))
    if steps[-1] != total - 1:
        steps.append(total - 1)
    # The schedule scales every group's LR by the same factor (values are the base LR's).
    frames = [pd.DataFrame({"step": steps,
                            "learning rate": [values[s] * lr / config.learning_rate
                                              for s in steps],
                            "group": name})
              for name, lr in parameter_groups(config).items()]
    frame = pd.concat(frames, ignore_index=True)
    caption = (f"{images} images per epoch → {total} optimizer steps "
               f"({config.epochs} epochs, batch {config.batch_size}, "
               f"accumulation {config.gradient_accumulation_steps}).")
    scheduler = config.learning_rate_scheduler.value
    if scheduler == "REX" and config.learning_rate_warmup_steps > 0:
        caption += " Warmup is not recommended with REX."
    if (warning := warmup_longer_than_run(config, total)) is not None:
        caption += " ⚠ " + warning
    return frame, caption


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({"step": pd.Series([], dtype="int64"),
                         "learning rate": pd.Series([], dtype="float64"),
                         "group": pd.Series([], dtype="object")})
