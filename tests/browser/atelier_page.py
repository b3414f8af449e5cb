"""Small helpers that drive the Atelier page the way a person does (click, type, choose)."""
from __future__ import annotations

import re
import time

from ui.page import field_elem_id, slug

TIMEOUT_MS = 30_000


def section(page, name: str):
    return page.locator(f"#section-{slug(name)}")


def open_section(page, name: str) -> None:
    """Open an accordion (its fields are drawn only once it is open)."""
    accordion = section(page, name)
    content = accordion.locator("[data-testid=accordion-content]").first
    if not content.is_visible():
        accordion.locator("button.label-wrap").first.click()
        content.wait_for(state="visible", timeout=TIMEOUT_MS)


def field(page, key: str):
    return page.locator(f"#{field_elem_id(key)}")


def input_of(page, key: str):
    return field(page, key).locator("input, textarea").first


def set_value(page, key: str, value) -> None:
    """Type into a textbox / number field and leave it (Gradio sends the value on input)."""
    box = input_of(page, key)
    box.fill(str(value))
    box.press("Tab")


def value_of(page, key: str) -> str:
    return input_of(page, key).input_value()


def choose(page, key: str, label: str) -> None:
    """Pick an option of a config field's dropdown by its shown label."""
    pick(page, field_elem_id(key), label)


def pick(page, elem_id: str, label: str) -> None:
    """Pick an option of any dropdown (by element id) by its shown label."""
    box = page.locator(f"#{elem_id}")
    box.locator("input[role=combobox]").click()
    box.locator(f"li[role=option][aria-label='{label}']").click()


def bar_value(page, elem: str) -> tuple[int, int]:
    bar = page.locator(f"#{elem}")
    return int(bar.get_attribute("data-value")), int(bar.get_attribute("data-total"))


def job_status(page) -> str:
    return page.locator("#job-status").get_attribute("data-status")


def job_message(page) -> str:
    return page.locator("#job-message").inner_text()


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as error:  # the DOM may be mid-update
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def wait_idle(page, timeout: float = 120) -> None:
    """Wait until no job runs on the server (tests share one server)."""
    wait_for(lambda: job_status(page) not in ("running", "stopping"), timeout,
             what="the server to be idle")


def number(text: str) -> float:
    return float(re.sub(r"[^0-9eE.+-]", "", text))
