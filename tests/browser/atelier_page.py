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
    """Type into a textbox / number field and leave it (Gradio sends the value on input).

    A field drawn a moment ago (its accordion just opened) can still be given its initial
    value by the frontend after the typing, undoing it; a user never types that fast, so the
    typing is repeated until the field keeps the value for a short while."""
    box = input_of(page, key)
    for _ in range(5):
        box.fill(str(value))
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == str(value):
            return
    raise AssertionError(f"the field {key} does not keep the value {value!r} "
                         f"(it shows {box.input_value()!r})")


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
    if callable(what):  # said at the time out: what the page shows then
        what = what()
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def wait_idle(page, timeout: float = 120) -> None:
    """Wait until no job runs on the server (tests share one server)."""
    wait_for(lambda: job_status(page) not in ("running", "stopping"), timeout,
             what="the server to be idle")


def number(text: str) -> float:
    return float(re.sub(r"[^0-9eE.+-]", "", text))


# --- The dataset section (images, captions, masks) ------------------------------------------------

def import_config_file(page, path) -> None:
    """Import an Atelier JSON config through the top bar's Import button."""
    with page.expect_file_chooser() as chooser:
        page.click("#import")
    chooser.value.set_files(str(path))
    # The first import of a fresh server redraws every field: allow a busy machine a minute.
    wait_for(lambda: "Imported" in page.locator("#topbar-report").inner_text(), 60,
             what="the import report")


def gallery_labels(page) -> list[str]:
    return page.locator("#dataset-gallery .caption-label").all_inner_texts()


def select_thumbnail(page, name: str) -> None:
    """Click the dataset gallery's thumbnail of image `name`; wait until it is open."""
    items = page.locator("#dataset-gallery button.thumbnail-item")
    labels = gallery_labels(page)
    index = next(i for i, label in enumerate(labels) if f" {name} " in f" {label} ")
    items.nth(index).click()
    wait_for(lambda: page.locator("#dataset-selected").inner_text().startswith(name),
             TIMEOUT_MS / 1000, what=f"{name} to open")


def editor_geometry(page) -> tuple[dict, float]:
    """(the mask canvas's bounding box, its zoom factor): the image is drawn centred in the
    canvas at that zoom, so image pixel (x, y) is at box centre + (x - w/2, y - h/2) * zoom."""
    editor = page.locator("#mask-editor")
    canvas = editor.locator("canvas").first
    # Mouse events reach only what is on screen, above the fixed footer: centre the canvas.
    canvas.evaluate("element => element.scrollIntoView({block: 'center'})")
    box = canvas.bounding_box()
    zoom = re.search(r"(\d+)%", editor.inner_text())
    return box, int(zoom.group(1)) / 100.0


def canvas_pixels(page):
    """What the mask canvas shows now, as an RGB numpy array (a screenshot of it)."""
    import io

    import numpy as np
    from PIL import Image
    # A clip of the page, not locator.screenshot(): that waits for the element to hold
    # still, and a WebGL canvas being drawn costs seconds of such waiting.
    box = page.locator("#mask-editor canvas").first.bounding_box()
    shot = page.screenshot(clip=box)
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)


def _drawn_and_still(page) -> bool:
    first = canvas_pixels(page)
    time.sleep(0.4)
    second = canvas_pixels(page)
    return first.std() > 10 and abs(first - second).mean() < 0.5


def wait_canvas_shows_image(page) -> None:
    """Wait until the canvas has drawn a picture (not a blank canvas) and holds still."""
    wait_for(lambda: _drawn_and_still(page), TIMEOUT_MS / 1000,
             what="the canvas to show the image")


def _to_screen(box: dict, zoom: float, image_size: tuple[int, int],
               x: float, y: float) -> tuple[float, float]:
    """Image pixel -> page position: the canvas draws the image centred at `zoom`."""
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    return cx + (x - image_size[0] / 2) * zoom, cy + (y - image_size[1] / 2) * zoom


def _brighter(page, before, x: int, y: int) -> bool:
    """Whether the canvas around (x, y) (canvas pixels) is brighter than in `before`."""
    patch = (slice(y - 3, y + 4), slice(x - 3, x + 4))
    return canvas_pixels(page)[patch].mean() > before[patch].mean() + 20


def paint_stroke(page, points: list[tuple[float, float]], image_size: tuple[int, int],
                 attempts: int = 3) -> None:
    """Drag the brush through `points` (in image pixels) and check that the paint shows (the
    canvas brighter along the stroke) and stays (a late image load would wipe it). The canvas
    loads an opened image asynchronously, so a stroke drawn too early is drawn again."""
    for _ in range(attempts):
        wait_canvas_shows_image(page)
        box, zoom = editor_geometry(page)
        before = canvas_pixels(page)
        page.mouse.move(*_to_screen(box, zoom, image_size, *points[0]))
        page.mouse.down()
        # Few moves: the editor joins consecutive points with a line of brush dabs, and each
        # move costs about a second of software WebGL drawing in headless Chromium.
        for x, y in points[1:]:
            page.mouse.move(*_to_screen(box, zoom, image_size, x, y))
        page.mouse.up()
        mx, my = _to_screen(box, zoom, image_size, *points[len(points) // 2])
        px, py = int(mx - box["x"]), int(my - box["y"])
        time.sleep(0.3)
        if _brighter(page, before, px, py):
            time.sleep(1.0)
            if _brighter(page, before, px, py):
                return
    raise AssertionError(f"the stroke did not stay on the canvas after {attempts} attempts")


# The page's tabs (ui/page.py), in their order; a hidden tab's content is not drawn.
PAGE_TABS = ("data", "training", "samples", "jobs", "tools")


def shown_tab(page) -> str | None:
    return page.evaluate("() => document.querySelector('[role=tab][aria-selected=true]')"
                         "?.id?.replace(/^tab-|-button$/g, '')")


def show_tab(page, name: str) -> None:
    page.locator(f"#tab-{name}-button").click()


# The tab an element is drawn in ("" outside the tabs); null when it is not drawn (a tab
# not opened yet has no content) or the selector is not plain CSS.
TAB_OF = """(selector) => {
    let el = null;
    try { el = document.querySelector(selector); } catch (e) { return null; }
    if (!el) return null;
    const panel = el.closest('[id^="tab-"]');
    return panel ? panel.id.replace(/^tab-/, '') : '';
}"""


def draw_every_tab(page) -> None:
    """Open each tab once, then the first: a tab never opened has no content drawn, one opened
    keeps it (hidden while another is open), so afterwards every element is somewhere."""
    for name in PAGE_TABS:
        show_tab(page, name)
        page.locator(f"#tab-{name}").first.wait_for(state="attached", timeout=TIMEOUT_MS)
    show_tab(page, PAGE_TABS[0])


def reveal(page, selector: str) -> None:
    """Bring the element onto the screen as a person would: open the tab it is drawn in. An
    element drawn outside the tabs, or not drawn at all (a hidden component), is left as it
    is."""
    tab = page.evaluate(TAB_OF, selector)
    if tab and tab in PAGE_TABS and tab != shown_tab(page):
        show_tab(page, tab)


class TabbedPage:
    """A playwright page whose `locator(selector)` first opens the tab that shows the element
    (clicking the tab's button, like a person); everything else is the page's own."""

    def __init__(self, page):
        object.__setattr__(self, "_page", page)

    def __getattr__(self, name):
        return getattr(self._page, name)

    def __setattr__(self, name, value):
        setattr(self._page, name, value)

    def locator(self, selector: str, **kwargs):
        reveal(self._page, selector)
        return self._page.locator(selector, **kwargs)

    def reload(self, *args, **kwargs):
        response = self._page.reload(*args, **kwargs)
        self._page.wait_for_selector("#job-status", timeout=30_000)
        draw_every_tab(self._page)
        return response

    def goto(self, *args, **kwargs):
        response = self._page.goto(*args, **kwargs)
        self._page.wait_for_selector("#job-status", timeout=30_000)
        draw_every_tab(self._page)
        return response

    def _on_element(name):  # noqa: N805 - builds the methods below
        def method(self, selector: str, *args, **kwargs):
            reveal(self._page, selector)
            return getattr(self._page, name)(selector, *args, **kwargs)
        method.__name__ = name
        return method

    # the page's own actions on a selector, after the same reveal
    click = _on_element("click")
    fill = _on_element("fill")
    press = _on_element("press")
    check = _on_element("check")
    uncheck = _on_element("uncheck")
    hover = _on_element("hover")
    set_input_files = _on_element("set_input_files")
    inner_text = _on_element("inner_text")
    input_value = _on_element("input_value")
    get_attribute = _on_element("get_attribute")


def new_tab(context, url: str):
    """A tab of `context` on the app, loaded, with console errors collected in `tab.errors`.
    Returned as a TabbedPage: the tests address elements by id whatever tab they are on."""
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    tab.errors = []
    tab.on("pageerror", lambda error: tab.errors.append(str(error)))
    tab.goto(url)
    tab.wait_for_selector("#start", timeout=60_000)
    tab.wait_for_selector("#job-status", timeout=30_000)
    draw_every_tab(tab)
    return TabbedPage(tab)
