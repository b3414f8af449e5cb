"""Warnings about the user's settings and data, with their numbers, before training starts:
a warm-up longer than the run, and masked training on images that have no mask."""
import shutil

import pytest

from trainer.advice import images_without_masks, warmup_longer_than_run
from trainer.control import Control
from trainer.demo import DEMO_DATASET_DIR
from trainer.loop import train

from helpers import tiny_config


def events_of(config):
    seen = []
    train(config, Control(on_event=seen.append))
    return seen


def warnings_before_training(events):
    """The warnings emitted before the first optimizer step was reported."""
    first = next(i for i, e in enumerate(events) if e["type"] == "progress")
    return [e["message"] for e in events[:first] if e["type"] == "warning"]


def test_a_warm_up_longer_than_the_run_is_named_with_its_numbers(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, learning_rate=1e-3,
                         learning_rate_warmup_steps=200, learning_rate_scheduler="CONSTANT")
    message = warmup_longer_than_run(config, 12)
    # the run: 12 steps of a 200-step warm-up end at 11/200 of the rate
    assert "200 steps" in message and "12 optimizer steps" in message
    assert "never reaches 0.001" in message and "5.5e-05 (5.5% of it)" in message
    assert "learning_rate_warmup_steps" in message


@pytest.mark.parametrize("warmup, total, warns", [
    (200, 12, True), (12, 12, True), (11, 12, False), (0, 12, False),
    (1.0, 40, True),   # a fraction of 1: the whole run is warm-up
    (0.5, 40, False),
])
def test_the_warm_up_warning_comes_exactly_when_the_rate_is_never_reached(
        tiny_sd15_dir, tmp_path, warmup, total, warns):
    config = tiny_config(tiny_sd15_dir, tmp_path, learning_rate_warmup_steps=warmup,
                         learning_rate_scheduler="COSINE")
    assert (warmup_longer_than_run(config, total) is not None) == warns


def test_schedules_that_ignore_the_warm_up_get_no_warning(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, learning_rate_warmup_steps=200,
                         learning_rate_scheduler="ADAFACTOR",
                         optimizer={"optimizer": "ADAFACTOR", "relative_step": True})
    assert warmup_longer_than_run(config, 12) is None


def test_training_warns_about_the_warm_up_before_its_first_step(tiny_sd15_dir, tmp_path):
    # 5 demo images, batch 2 (3 batches an epoch), 2 epochs: 6 steps under a 10-step warm-up
    config = tiny_config(tiny_sd15_dir, tmp_path, learning_rate_warmup_steps=10)
    warnings = warnings_before_training(events_of(config))
    assert any("10 steps) is longer than the whole run (6 optimizer steps)" in w
               for w in warnings), warnings


def test_masked_training_counts_the_images_without_a_mask(tiny_sd15_dir, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(DEMO_DATASET_DIR, folder)
    (folder / "cat-masklabel.png").unlink()
    (folder / "rocket-masklabel.png").unlink()
    config = tiny_config(tiny_sd15_dir, tmp_path, masked_training=True, epochs=1,
                         concepts=[{"path": str(folder)}])
    warnings = warnings_before_training(events_of(config))
    matching = [w for w in warnings if "have no mask" in w]
    assert len(matching) == 1, warnings
    assert "2 of 5 images have no mask" in matching[0]
    assert "'cat.jpg'" in matching[0] and "'rocket.jpg'" in matching[0]
    assert "train on the whole image" in matching[0]
    # an inpainting model inpaints a random circle of them instead
    from trainer.advice import images_without_masks
    from trainer.config import ModelType
    from trainer.data.dataset import collect_items
    inpainting = config.model_copy(update={"model_type": ModelType.STABLE_DIFFUSION_15_INPAINTING})
    message = images_without_masks(inpainting, collect_items(config.concepts))
    assert "2 of 5" in message and "inpaint a random circle" in message


def test_no_mask_warning_without_masked_training_or_with_every_mask(tiny_sd15_dir, tmp_path):
    from trainer.data.dataset import collect_items
    config = tiny_config(tiny_sd15_dir, tmp_path, masked_training=True)
    items = collect_items(config.concepts)
    assert images_without_masks(config, items) is None  # the demo has a mask for each image
    for item in items[:4]:
        item.mask_path = None
    many = images_without_masks(config, items)
    assert "4 of 5 images" in many and "and 1 more" in many
    assert images_without_masks(config.model_copy(update={"masked_training": False}),
                                items) is None
