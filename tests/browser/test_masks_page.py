"""The dataset section in headless Chromium, against a real `python app.py`: pick an image of
a concept folder, paint its mask on the canvas, save it, and edit its caption.

The concept folder is a copy of the demo dataset in the server's workspace (the shipped one is
never written), set by importing a config that names it, as a user would.
"""
from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pytest
from atelier_page import (
    gallery_labels,
    import_config_file,
    open_section,
    paint_stroke,
    select_thumbnail,
    wait_for,
)
from PIL import Image

from trainer.demo import DEMO_DATASET_DIR

UI = 30  # seconds a page update may take on a busy machine (waits end as soon as it shows)
CAT = (192, 128)  # cat.jpg's size


@pytest.fixture
def dataset_page(page, atelier_server, tmp_path, screenshot_dir):
    """The page with its concept set to a fresh copy of the demo dataset (cat.jpg unmasked),
    the dataset section open. Returns (page, folder)."""
    _, workspace = atelier_server
    # never a user's own folder (the screenshot server's workspace is the repository's own)
    name = "my-photos-screenshot" if screenshot_dir else f"dataset-{uuid.uuid4().hex[:6]}"
    folder = workspace / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(DEMO_DATASET_DIR, folder)
    (folder / "cat-masklabel.png").unlink()
    # The README's screenshots show the path as a user types it, relative to where the app
    # runs (the repository, whose workspace/ the screenshot server uses), not this machine's.
    shown = f"workspace/{name}" if screenshot_dir else str(folder)
    config = tmp_path / "concept.json"
    config.write_text(json.dumps({"concepts": [{"path": shown}]}))
    import_config_file(page, config)
    open_section(page, "dataset")
    wait_for(lambda: shown in page.locator("#dataset-info").inner_text()
             and len(gallery_labels(page)) == 5, 2 * UI, what="the gallery of the copied dataset")
    yield page, folder
    shutil.rmtree(folder, ignore_errors=True)


def test_paint_a_mask_save_it_and_edit_the_caption(dataset_page, screenshot_dir):
    page, folder = dataset_page
    assert any(label.startswith("✗ no mask · cat.jpg") for label in gallery_labels(page))
    select_thumbnail(page, "cat.jpg")
    assert page.locator("#dataset-caption textarea").input_value() == "a photo of a cat"

    # A horizontal stroke through the middle of the image, from x=40 to x=150 at y=64.
    paint_stroke(page, [(40, 64), (95, 64), (150, 64)], CAT)
    page.click("#mask-save")
    wait_for(lambda: "Saved cat-masklabel.png" in page.locator("#dataset-message").inner_text(),
             UI, what="the save message")

    with Image.open(folder / "cat-masklabel.png") as saved:
        assert saved.mode == "L" and saved.size == CAT
        mask = np.asarray(saved)
    assert set(np.unique(mask)) <= {0, 255}
    assert (mask[64, 45:146] == 255).all()                  # the stroke's band is white
    assert mask[:12, :].max() == 0 and mask[-12:, :].max() == 0   # far from it: black
    assert mask[:, :8].max() == 0 and mask[:, -8:].max() == 0
    rows = np.flatnonzero(mask.max(axis=1))
    assert rows.min() > 15 and rows.max() < 113             # a band, not the whole image
    wait_for(lambda: any(label.startswith("✓ mask · cat.jpg")
                         for label in gallery_labels(page)), UI, what="the gallery mark")

    if screenshot_dir:
        page.add_style_tag(content="#footer { display: none !important; }")
        page.locator("#section-dataset").screenshot(
            path=str(screenshot_dir / "screenshot-masks.png"))
        page.add_style_tag(content="#footer { display: flex !important; }")

    # The caption: edited, saved beside the image, shown in the gallery.
    box = page.locator("#dataset-caption textarea")
    box.fill("a tabby cat, close-up")
    page.click("#caption-save")
    wait_for(lambda: "Saved the caption" in page.locator("#dataset-message").inner_text(), UI,
             what="the caption message")
    assert (folder / "cat.txt").read_text(encoding="utf-8") == "a tabby cat, close-up\n"
    wait_for(lambda: any("a tabby cat, close-up" in label for label in gallery_labels(page)),
             UI, what="the new caption in the gallery")
    assert not page.errors


def test_an_existing_mask_opens_in_the_canvas_and_saves_unchanged(dataset_page):
    page, folder = dataset_page
    before = np.asarray(Image.open(folder / "astronaut-masklabel.png"))
    assert len(np.unique(before)) > 2  # a soft mask: grey edges must survive the round trip
    select_thumbnail(page, "astronaut.jpg")
    assert "has a mask" in page.locator("#dataset-selected").inner_text()
    page.click("#mask-save")
    wait_for(lambda: "Saved astronaut-masklabel.png"
             in page.locator("#dataset-message").inner_text(), UI, what="the save message")
    after = np.asarray(Image.open(folder / "astronaut-masklabel.png"))
    assert after.shape == before.shape and np.array_equal(after, before)

    # Invert in the canvas, then save: the file holds the inverse.
    page.click("#mask-invert")
    wait_for(lambda: "Inverted" in page.locator("#dataset-message").inner_text(), UI,
             what="the invert message")
    page.click("#mask-save")
    wait_for(lambda: "Saved astronaut" in page.locator("#dataset-message").inner_text(), UI,
             what="the second save")
    inverted = np.asarray(Image.open(folder / "astronaut-masklabel.png"))
    assert np.array_equal(inverted, 255 - before)
    assert not page.errors


def test_automatic_masks_preview_and_apply_to_the_folder(dataset_page):
    page, folder = dataset_page
    select_thumbnail(page, "cat.jpg")
    open_section(page, "auto-masks")
    page.locator("#auto-mask-method label", has_text="Colour key").click()
    wait_for(lambda: page.locator("#auto-mask-color").is_visible()
             and not page.locator("#auto-mask-prompt").is_visible(), UI,
             what="the colour-key fields")
    page.click("#auto-mask-preview")
    wait_for(lambda: "cat.jpg: would write a new mask" in
             page.locator("#auto-mask-note").inner_text(), UI, what="the preview note")
    assert not (folder / "cat-masklabel.png").exists()  # a preview writes nothing

    page.click("#auto-mask-apply")  # mode: create only missing masks
    message = page.locator("#auto-mask-message")
    wait_for(lambda: "Wrote 1 mask" in message.inner_text(), 60, what="the run's summary")
    assert "skipped 4" in message.inner_text() and "has a mask" in message.inner_text()
    assert "canvas now shows the new mask of cat.jpg" in message.inner_text()
    with Image.open(folder / "cat-masklabel.png") as mask:
        assert mask.mode == "L" and mask.size == CAT
    wait_for(lambda: any(label.startswith("✓ mask · cat.jpg") for label in gallery_labels(page))
             and "has a mask" in page.locator("#dataset-selected").inner_text(), UI,
             what="the gallery and the open image to show the new mask")

    # A bad setting is named, and nothing runs.
    page.locator("#auto-mask-method label", has_text="Text prompt").click()
    page.click("#auto-mask-apply")
    wait_for(lambda: "prompt: empty" in message.inner_text(), UI, what="the prompt error")
    assert not page.errors
