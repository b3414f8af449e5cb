"""Two logged-in users of one shared server, each in their own browser (headless Chromium, two
contexts), against `python app.py --listen --auth alice:pw1,bob:pw2` (issue 23): alice uploads
a dataset and trains a tiny demo job on it; then every panel of alice's page shows her job,
dataset, LoRA and samples, and no panel of bob's page shows any of it."""
from __future__ import annotations

import zipfile

import pytest
from atelier_page import new_tab, open_section, set_value, wait_for

from trainer.demo import DEMO_DATASET_DIR

UI = 60          # seconds a page update may take on a busy machine
TRAINING = 300   # the tiny demo job: 1 epoch of 5 images and a sample, start-up included
USERS = {"alice": "pw1", "bob": "pw2"}
DATASET = "alices-photos"
SECRET = "alice-secret"  # her LoRA's name, found nowhere else on the server
OUTPUT = f"{SECRET}.safetensors"


@pytest.fixture
def two_user_server(start_app, port, tmp_path):
    """(url, workspace) of `app.py --listen --auth alice:pw1,bob:pw2` on a fresh workspace."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    logins = ",".join(f"{user}:{password}" for user, password in USERS.items())
    start_app(tmp_path / "server.log", port, "--listen", "--auth", logins, "--workspace",
              str(workspace))
    return f"http://127.0.0.1:{port}/", workspace


def logged_in_tab(chromium, url: str, user: str):
    """A browser context of its own (its own cookies) signed in as `user`, on the page."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    response = context.request.post(url + "login",
                                    form={"username": user, "password": USERS[user]})
    assert response.ok, f"login of {user}: {response.status} {response.text()}"
    tab = new_tab(context, url)
    return context, tab


def reload(tab) -> None:
    tab.reload()
    tab.wait_for_selector("#start", timeout=60_000)
    tab.wait_for_selector("#job-status", timeout=30_000)


def options(tab, elem_id: str) -> list[str]:
    """The choices of a dropdown, as its list shows them (opened, read, closed)."""
    box = tab.locator(f"#{elem_id} input[role=combobox]")
    box.click()
    shown = tab.locator(f"#{elem_id} li[role=option]")
    try:
        shown.first.wait_for(timeout=2_000)
    except Exception:  # an empty dropdown opens no list
        pass
    labels = [shown.nth(i).get_attribute("aria-label") or shown.nth(i).inner_text()
              for i in range(shown.count())]
    box.press("Escape")
    return labels


def shown_text(tab, selector: str) -> str:
    """The text of an element, "" when the page does not draw it (a hidden component)."""
    element = tab.locator(selector)
    return element.inner_text() if element.count() else ""


def upload_dataset(tab, archive) -> None:
    open_section(tab, "datasets")
    name = tab.locator("#datasets-name input")
    name.fill(DATASET)
    name.press("Enter")
    tab.locator("#datasets-files input[type=file]").set_input_files(str(archive))
    # (the file list draws the name's stem and its extension apart)
    wait_for(lambda: archive.stem in tab.locator("#datasets-files").inner_text(), UI,
             what="the zip uploaded")
    tab.click("#datasets-add")
    message = tab.locator("#datasets-message")
    wait_for(lambda: f"to '{DATASET}'" in message.inner_text(), UI, what="the upload report")
    assert "Added 15 file(s)" in message.inner_text()
    tab.click("#datasets-use")
    wait_for(lambda: "added to the Data table" in message.inner_text(), UI, what="the concept")


def train_tiny_demo(tab, workspace) -> int:
    """Start the demo settings for 1 epoch with a sample after it; returns the job id.
    (The output named in the workspace: a user's own job folder receives it.)"""
    open_section(tab, "Epochs / batch size")
    set_value(tab, "epochs", "1")
    set_value(tab, "sample_after", "1")
    set_value(tab, "output_model_destination", str(workspace / "demo" / "output" / OUTPUT))
    tab.click("#start")
    rows = tab.locator("#jobs-table tr[data-job-id]")
    try:
        wait_for(lambda: rows.count() == 1, UI, what="alice's job in her table")
    except AssertionError as error:
        raise AssertionError(f"{error}; the notice: {tab.locator('#notice').inner_text()}")
    job_id = int(rows.first.get_attribute("data-job-id"))
    wait_for(lambda: rows.first.get_attribute("data-status") in ("finished", "failed"),
             TRAINING, what="the job to end")
    assert rows.first.get_attribute("data-status") == "finished", \
        tab.locator("#jobs-table").inner_text()
    return job_id


def test_each_user_sees_only_their_own_work_in_every_panel(chromium, two_user_server,
                                                           tmp_path):
    url, workspace = two_user_server
    archive = tmp_path / "upload" / "alice-trip.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as out:
        for file in sorted(DEMO_DATASET_DIR.iterdir()):
            out.write(file, f"trip/{file.name}")
    alice_context, alice = logged_in_tab(chromium, url, "alice")
    bob_context, bob = logged_in_tab(chromium, url, "bob")
    try:
        upload_dataset(alice, archive)
        folder = workspace / "datasets" / DATASET
        assert (folder / ".owner").read_text() == "alice"
        job_id = train_tiny_demo(alice, workspace)

        # Both pages opened afresh: what each shows is what the server gives that user.
        reload(alice)
        reload(bob)

        # Datasets panel: listed when the page opens (no Refresh), for alice only.
        open_section(alice, "datasets")
        open_section(bob, "datasets")
        wait_for(lambda: DATASET in alice.locator("#datasets-table").inner_text(), UI,
                 what="alice's dataset listed on load")
        assert DATASET in options(alice, "datasets-name")
        assert DATASET not in bob.locator("#datasets-table").inner_text()
        assert DATASET not in options(bob, "datasets-name")

        # Jobs panel: alice's job is hers alone.
        alice_row = alice.locator(f"#jobs-table tr[data-job-id='{job_id}']")
        wait_for(lambda: alice_row.count() == 1, UI, what="alice's job after a reload")
        assert alice_row.get_attribute("data-status") == "finished"
        assert bob.locator("#jobs-table tr[data-job-id]").count() == 0
        assert f"Job {job_id}" not in " ".join(options(bob, "jobs-choice"))

        # Footer: alice's finished job, its samples and its LoRA; nothing of it for bob.
        wait_for(lambda: alice.locator("#gallery img").count() >= 1, UI,
                 what="alice's samples")
        # (file lists draw a name's stem and its extension apart)
        wait_for(lambda: SECRET in alice.locator("#download").inner_text(), UI,
                 what="alice's download")
        assert bob.locator("#job-status").get_attribute("data-status") not in (
            "finished", "running")
        assert bob.locator("#gallery img").count() == 0
        assert SECRET not in shown_text(bob, "#download")

        # The job's own view (samples, files) opens for alice.
        open_section(alice, "jobs")
        alice.locator("#jobs-choice input[role=combobox]").click()
        alice.locator(f"#jobs-choice li[role=option][aria-label='Job {job_id}']").click()
        alice.click("#jobs-open")
        wait_for(lambda: alice.locator("#jobs-gallery img").count() >= 1, UI,
                 what="the job's samples")
        wait_for(lambda: SECRET in alice.locator("#jobs-files").inner_text(), UI,
                 what="the job's files")

        # Try it and Publish list the LoRAs each may use: alice's for her, none for bob.
        for panel, elem in (("try", "try-lora"), ("publish", "publish-output")):
            open_section(alice, panel)
            open_section(bob, panel)
            wait_for(lambda elem=elem: any(SECRET in o for o in options(alice, elem)), UI,
                     what=f"alice's LoRA in {elem} after a reload")
            assert not any(SECRET in o for o in options(bob, elem)), elem

        # Nothing of alice's anywhere in bob's page text.
        text = bob.locator("body").inner_text()
        assert DATASET not in text and SECRET not in text
        assert not alice.errors and not bob.errors
    finally:
        alice_context.close()
        bob_context.close()
