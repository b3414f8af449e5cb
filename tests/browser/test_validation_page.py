"""The validation loss in the real page (issue 27): switched on in the Training tab's
Validation section with a split of the demo's images, a tiny run measures it, and the Jobs
table shows the job's best validation loss and its step."""
from __future__ import annotations

import re

from atelier_page import field, open_section, set_value, wait_for, wait_idle

UI = 30


def test_a_run_with_validation_shows_its_best_validation_loss(page):
    wait_idle(page)
    open_section(page, "Validation")
    field(page, "validation").locator("input[type=checkbox]").check()
    set_value(page, "validation_split", "0.4")
    open_section(page, "Epochs / batch size")
    set_value(page, "output_model_destination", "")
    set_value(page, "epochs", "2")
    page.click("#start")
    notice = page.locator("#notice")
    found = wait_for(lambda: re.search(r"(?:Started|Queued as) job (\d+)", notice.inner_text()),
                     UI, what="the job's number")
    job = found.group(1)
    row = page.locator(f"#jobs-table tr[data-job-id='{job}']")
    wait_for(lambda: row.count() == 1 and row.get_attribute("data-status") == "finished", 180,
             what=f"job {job} to finish")
    # the Jobs table's "Best validation" column: a loss and the step it was measured at
    def best_cell():
        for text in row.locator("td").all_inner_texts():
            found = re.fullmatch(r"(\d+\.\d{4}) \(step (\d+)\)", text.strip())
            if found:
                return found
        return None
    best = wait_for(best_cell, UI, what="the best validation loss in the Jobs table")
    assert 0 < float(best.group(1)) < 10 and int(best.group(2)) > 0
    assert not page.errors
