"""A visitor whose images are on their own machine: upload a zip in the page, see the dataset,
make it a concept in one click, and delete it after confirming (headless Chromium, the real
page)."""
from __future__ import annotations

import zipfile

from atelier_page import open_section, wait_for, wait_idle

from trainer.demo import DEMO_DATASET_DIR

UI = 60  # seconds: an upload and its checks on a busy machine


def test_an_uploaded_zip_becomes_a_dataset_and_a_concept(page, atelier_server, tmp_path):
    _, workspace = atelier_server
    archive = tmp_path / "my photos.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for file in sorted(DEMO_DATASET_DIR.iterdir()):
            out.write(file, f"trip/{file.name}")
    wait_idle(page)  # a job an earlier test started (the page may have opened while it ran)
    open_section(page, "datasets")
    assert "GB per dataset" in page.locator("#datasets-limits").inner_text()  # limits shown
    name = page.locator("#datasets-name input")
    name.fill("holiday")
    name.press("Enter")
    page.locator("#datasets-files input[type=file]").set_input_files(str(archive))
    # (the file list draws a name's stem and its extension apart, on one line or two)
    wait_for(lambda: "my photos" in page.locator("#datasets-files").inner_text(), UI,
             what="the zip uploaded")
    page.click("#datasets-add")
    message = page.locator("#datasets-message")
    wait_for(lambda: "Added 15 file(s) to 'holiday'" in message.inner_text(), UI,
             what="the upload report")
    assert "holiday" in page.locator("#datasets-table").inner_text()
    folder = workspace / "datasets" / "holiday" / "trip"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in DEMO_DATASET_DIR.iterdir())

    page.click("#datasets-use")
    wait_for(lambda: "added to the Data table" in message.inner_text(), UI, what="the concept")
    # the concept summary counts the images of its subfolders
    wait_for(lambda: "`holiday`: 5 images" in page.locator("#concepts-info").inner_text()
             or "holiday: 5 images" in page.locator("#concepts-info").inner_text(), UI,
             what="the concept summary")

    page.click("#datasets-delete")
    wait_for(lambda: page.locator("#datasets-confirm").is_visible(), UI, what="the confirm")
    assert folder.is_dir()  # nothing deleted before the confirmation
    page.click("#datasets-confirm-delete")
    wait_for(lambda: "Deleted dataset 'holiday'" in message.inner_text(), UI, what="deleted")
    assert not (workspace / "datasets" / "holiday").exists()
    assert not page.errors
