"""The Jobs panel in a real browser: Start queues jobs with their positions shown, a queued job
is cancelled, a finished one is opened (curves, config, outputs) and its settings loaded."""
from __future__ import annotations

import re

from atelier_page import open_section, pick, set_value, value_of, wait_for, wait_idle

UI = 30


def notice_job(page, pattern: str) -> int:
    notice = page.locator("#notice")
    try:
        found = wait_for(lambda: re.search(pattern, notice.inner_text()), UI,
                         what=f"the notice '{pattern}'")
    except AssertionError as error:
        raise AssertionError(f"{error}; the notice says: {notice.inner_text()!r}") from None
    return int(found.group(1))


def row(page, job_id: int):
    return page.locator(f"#jobs-table tr[data-job-id='{job_id}']")


def row_is(page, job_id: int, status: str, position: str | None = None) -> bool:
    r = row(page, job_id)
    return (r.count() == 1 and r.get_attribute("data-status") == status
            and (position is None or r.get_attribute("data-position") == position))


def test_queue_two_cancel_one_and_open_a_finished_one(page):
    wait_idle(page)
    open_section(page, "Epochs / batch size")
    set_value(page, "output_model_destination", "")  # each job writes into its own folder
    set_value(page, "epochs", "3000")
    page.click("#start")
    running = notice_job(page, r"Started job (\d+)")
    set_value(page, "epochs", "2")
    page.click("#start")
    first = notice_job(page, r"Queued as job (\d+), position 1 ")
    page.click("#start")
    second = notice_job(page, r"Queued as job (\d+), position 2 ")

    wait_for(lambda: row_is(page, running, "running") and row_is(page, first, "queued", "1")
             and row_is(page, second, "queued", "2"), UI, what="the queue in the table")

    pick(page, "jobs-choice", f"Job {first}")
    page.click("#jobs-cancel")
    wait_for(lambda: row_is(page, first, "stopped") and row_is(page, second, "queued", "1"),
             UI, what="the cancelled job and the new position")
    assert "before it ran" in page.locator("#jobs-message").inner_text()

    page.click("#stop")  # the footer follows the running job: Stop ends it
    wait_for(lambda: row_is(page, running, "stopped"), 90, what="the running job to stop")
    wait_for(lambda: row_is(page, second, "finished"), 120, what="the queued job to finish")
    assert row_is(page, first, "stopped")  # the cancelled one never ran
    cells = row(page, second).locator("td").all_inner_texts()
    assert "6 / 6" in cells and "lora.safetensors" in cells[-1]

    pick(page, "jobs-choice", f"Job {second}")
    page.click("#jobs-open")
    detail = page.locator("#jobs-detail")
    wait_for(lambda: detail.is_visible() and f"Job {second}" in
             page.locator("#jobs-summary").inner_text(), UI,
             what=lambda: f"the opened job ({page.locator('#jobs-message').inner_text()!r}, "
                          f"page errors {page.errors})")
    assert "finished" in page.locator("#jobs-summary").inner_text()
    # (the code view draws only its first lines; Load below shows the rest is the job's)
    wait_for(lambda: '"model_type": "STABLE_DIFFUSION_15"' in
             page.locator("#jobs-config").inner_text(), UI, what="the job's config")
    files = page.locator("#jobs-files td.filename")
    wait_for(lambda: files.count() == 2, UI, what="the job's output files")
    assert {files.nth(i).get_attribute("aria-label") for i in range(2)} == {
        "lora.safetensors", "lora.json"}  # the LoRA and its config
    wait_for(lambda: page.locator("#jobs-loss canvas, #jobs-loss svg").count() > 0, UI,
             what="the loss curve")

    set_value(page, "epochs", "9")
    page.click("#jobs-load")
    wait_for(lambda: value_of(page, "epochs") == "2", UI, what="the job's settings loaded")
    assert "settings of job" in page.locator("#jobs-message").inner_text()
    assert not page.errors
