"""The whole remote workflow in headless Chromium, on a shared server (paths confined to the
workspace, as on a Space): a visitor uploads a zip of their photos, captions them with a
(tiny) captioning model, paints a mask, trains the demo settings on them, tries the LoRA
beside its base model, and downloads it."""
from __future__ import annotations

import zipfile

import numpy as np
from atelier_page import (bar_value, gallery_labels, job_message, job_status, open_section,
                          paint_stroke, pick, select_thumbnail, set_value, wait_for, wait_idle)
from PIL import Image

from trainer.captions.tiny import build_tiny_blip
from trainer.demo import DEMO_DATASET_DIR
from trainer.ownership import ANONYMOUS, user_folder_name

UI = 60  # seconds a page update may take on a busy machine (waits end as soon as it shows)
CAT = (192, 128)  # cat.jpg's size


def test_upload_caption_mask_train_try_and_download(shared_page, shared_server, tmp_path):
    page, (_, workspace) = shared_page, shared_server
    # A visitor's own models live in their user folder (the anonymous visitor's, here: a
    # shared server without a login); the rest of the workspace is the server's own.
    captioner = build_tiny_blip(workspace / "users" / user_folder_name(ANONYMOUS) / "models"
                                / "captioner")
    # The visitor's photos: images and masks, no captions, and no mask for the cat.
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for file in sorted(DEMO_DATASET_DIR.iterdir()):
            if file.suffix != ".txt" and file.name != "cat-masklabel.png":
                out.write(file, file.name)

    # 1. Upload: a new dataset, made a concept of the Data table.
    open_section(page, "datasets")
    name = page.locator("#datasets-name input")
    name.fill("mine")
    name.press("Enter")
    page.locator("#datasets-files input[type=file]").set_input_files(str(archive))
    # (the file list draws a name's stem and its extension apart, on one line or two)
    wait_for(lambda: "photos" in page.locator("#datasets-files").inner_text(), UI,
             what=lambda: f"the upload: {page.locator('#datasets-files').inner_text()!r}")
    page.click("#datasets-add")
    message = page.locator("#datasets-message")
    wait_for(lambda: "Added 9 file(s) to 'mine'" in message.inner_text(), UI, what="the report")
    folder = workspace / "datasets" / "mine"
    page.click("#datasets-use")
    wait_for(lambda: "added to the Data table" in message.inner_text(), UI, what="the concept")

    # 2. Caption it with the captioning model in the workspace.
    open_section(page, "dataset")
    pick(page, "dataset-concept", str(folder))
    wait_for(lambda: len(gallery_labels(page)) == 5 and str(folder) in
             page.locator("#dataset-info").inner_text(), UI, what="the dataset's gallery")
    open_section(page, "auto-captions")
    # A box drawn a moment ago (its accordion just opened) can still get its initial value
    # from the frontend after the typing: type again until both boxes keep what was typed.
    boxes = {"#caption-model input": str(captioner), "#caption-prefix input": "ohwx"}

    def typed() -> bool:
        for selector, text in boxes.items():
            box = page.locator(selector)
            if box.input_value() != text:
                box.fill(text)
                box.press("Tab")
                return False
        return True
    wait_for(typed, UI, what="the caption settings to keep their values")
    page.click("#caption-run")
    outcome = page.locator("#caption-message")
    wait_for(lambda: outcome.locator(".atelier-ok, .atelier-error").count(), 2 * UI,
             what="the caption run")
    assert "Captioned 5 images" in outcome.inner_text()
    captions = sorted(folder.glob("*.txt"))
    assert len(captions) == 5 and all(p.read_text().startswith("ohwx, ") for p in captions)

    # 3. Paint the cat's mask.
    select_thumbnail(page, "cat.jpg")
    paint_stroke(page, [(40, 64), (95, 64), (150, 64)], CAT)
    page.click("#mask-save")
    wait_for(lambda: "Saved cat-masklabel.png" in page.locator("#dataset-message").inner_text(),
             UI, what="the saved mask")
    with Image.open(folder / "cat-masklabel.png") as mask:
        assert (np.asarray(mask)[64, 45:146] == 255).all()

    # 4. Train the demo settings (a few epochs) on the demo photos and the uploaded ones.
    wait_idle(page)
    open_section(page, "Epochs / batch size")
    set_value(page, "epochs", 3)
    page.click("#start")
    # A busy machine may take a while to take the click (the page's events queue up).
    wait_for(lambda: job_status(page) in ("running", "stopping", "finished", "failed"),
             2 * UI, what="the job to start")
    wait_for(lambda: job_status(page) not in ("running", "stopping"), 300, what="the run")
    assert job_status(page) == "finished", job_message(page)
    assert bar_value(page, "epoch-bar") == (3, 3)
    assert bar_value(page, "step-bar")[1] == 15  # 10 images, batch 2, 3 epochs

    # 5. Try the LoRA it wrote beside the base model.
    open_section(page, "try")
    page.click("#try-refresh")
    wait_for(lambda: "demo-lora.safetensors" in page.locator("#try-lora input").input_value(),
             UI, what="the new LoRA listed first")
    page.locator("#try-prompt textarea").fill("ohwx, a photo of a cat")
    steps = page.locator("#try-steps input")
    steps.fill("3")
    steps.press("Tab")
    page.click("#try-generate")
    wait_for(lambda: "demo-lora.safetensors at strength 1" in
             page.locator("#try-message").inner_text(), 2 * UI, what="the two images")
    for elem in ("#try-without img", "#try-with img"):  # the images load after the message
        wait_for(lambda: page.locator(elem).first.is_visible(), UI, what=elem)

    # 6. Download it.
    link = page.locator("#download a[href*='demo-lora.safetensors']").first
    link.wait_for(timeout=UI * 1000)
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    # On a shared server a visitor's output lands in their job's own folder.
    written = list((workspace / "jobs").glob("*/output/demo-lora.safetensors"))
    assert len(written) == 1 and saved.read_bytes() == written[0].read_bytes()
    assert not page.errors
