"""Samples across the run and runs compared, in a real browser (issue 27): two tiny jobs that
differ only in their learning rate; the grid of the followed job (a row per prompt, a column
per sampling point) survives a reload and downloads as one PNG; Jobs → Open shows a job's grid;
Compare overlays both jobs' curves, shows exactly `learning_rate` among the settings, and their
grids side by side."""
from __future__ import annotations

import re

from atelier_page import choose, open_section, pick, set_value, wait_for, wait_idle

UI = 30


def notice_job(page, pattern: str) -> int:
    notice = page.locator("#notice")
    found = wait_for(lambda: re.search(pattern, notice.inner_text()), UI,
                     what=f"the notice '{pattern}'")
    return int(found.group(1))


def finished(page, job_id: int) -> bool:
    row = page.locator(f"#jobs-table tr[data-job-id='{job_id}']")
    return row.count() == 1 and row.get_attribute("data-status") == "finished"


def train_job(page, learning_rate: str) -> int:
    """A 2-epoch job of the demo preset sampling after each epoch (2 columns, 1 prompt)."""
    wait_idle(page)
    open_section(page, "Epochs / batch size")
    set_value(page, "output_model_destination", "")  # each job writes into its own folder
    set_value(page, "epochs", "2")
    open_section(page, "Sampling")
    set_value(page, "sample_after", "1")
    choose(page, "sample_after_unit", "EPOCH")
    set_value(page, "learning_rate", learning_rate)
    page.click("#start")
    job = notice_job(page, r"(?:Started|Queued as) job (\d+)")
    wait_for(lambda: finished(page, job), 180, what=f"job {job} to finish")
    return job


def test_grid_reload_download_open_and_compare_two_jobs(page, chromium, atelier_server):
    first = train_job(page, "0.001")
    grid = "#sample-grid img"
    wait_for(lambda: page.locator(grid).count() == 2, UI, what="the grid's two cells")
    assert "step" in page.locator("#sample-grid-header").inner_text()

    # a reload shows the same grid (drawn from the job's folder, not the browser's memory)
    page.reload()
    wait_for(lambda: page.locator(grid).count() == 2, UI, what="the grid after a reload")

    page.click("#sample-grid-download")
    wait_for(lambda: ".png" in page.locator("#sample-grid-file").inner_text(), UI,
             what="the grid's PNG to download")

    second = train_job(page, "0.002")
    pick(page, "jobs-choice", f"Job {first}")
    page.click("#jobs-open")
    wait_for(lambda: f"Job {first}" in page.locator("#jobs-summary").inner_text()
             and "sample-grid" in page.locator("#jobs-files").inner_text(), UI,
             what=lambda: "the opened job's grid picture among its files ("
                          + repr(page.locator("#jobs-files").inner_text()[:300]) + ")")

    open_section(page, "Compare jobs")
    page.click("#compare-refresh")
    for job in (first, second):
        box = page.locator("#compare-jobs")
        box.locator("input[role=combobox]").click()
        box.locator("li[role=option]", has_text=f"Job {job} ").first.click()
    chosen = page.locator("#compare-jobs")
    wait_for(lambda: all(f"Job {job} " in chosen.inner_text() for job in (first, second)), UI,
             what="both jobs chosen")
    table = page.locator("#compare-settings")
    for attempt in range(3):  # a click on a busy machine can land before the choice is sent
        page.click("#compare-run")
        try:
            wait_for(lambda: table.locator("tr[data-key]").count() == 1, UI,
                     what="the settings that differ")
            break
        except AssertionError:
            if attempt == 2:
                raise AssertionError("no settings table: "
                                     + page.locator("#compare-message").inner_text()
                                     + " | " + table.inner_text()[:400]) from None
    assert table.locator("tr[data-key='learning_rate']").count() == 1
    wait_for(lambda: page.locator("#compare-plot canvas, #compare-plot svg").count() > 0, UI,
             what="the overlaid curves")
    for n in (0, 1):
        wait_for(lambda n=n: page.locator(f"#compare-grid-{n} img").count() == 2, UI,
                 what=f"grid {n} of the comparison")
    assert not page.errors
