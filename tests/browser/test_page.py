"""The page in headless Chromium, against a real `python app.py`: sections and tooltips, the
optimizer dialog, presets and import, bad input, the demo training to the end, reload and
Stop.

Tests share one server, so each waits for it to be idle before starting a job.
"""
from __future__ import annotations

import json
import time

import pytest
from atelier_page import (bar_value, choose, field, input_of, job_message, job_status,
                          open_section, pick, section, set_value, value_of, wait_for,
                          wait_idle)

from ui import fields as F
from ui import optimizers
from ui.page import DIALOG_KEYS

UI = 30  # seconds a page update may take on a busy machine (waits end as soon as it shows)
SD15_LORA = {"model_type": "STABLE_DIFFUSION_15", "training_method": "LORA",
             "peft_type": "LORA", "learning_rate_scheduler": "CONSTANT",
             "lora_layer_preset": "attn-only", "quantization.layer_filter_preset": "full",
             "validation": False}


def test_page_loads_with_every_section_and_tooltip(page, screenshot_dir):
    shown = [s for s in F.sections() if F.section_applies(s, SD15_LORA)]
    for name in ["Model", "Data", *shown, "Sampling", F.BACKUP_SECTION, "Progress"]:
        assert section(page, name).is_visible(), name
    assert not section(page, "Text encoder 2").is_visible()  # SD 1.5 has one text encoder

    # Every field (of SD 1.5 LoRA) with its label and its tooltip, once its section is open.
    for name in [*shown, F.BACKUP_SECTION]:
        open_section(page, name)
    for key, spec in F.SPECS.items():
        if key in DIALOG_KEYS or not F.applies(spec, SD15_LORA):
            continue
        box = field(page, key)
        assert box.is_visible(), key
        assert spec.label in box.inner_text(), key
        assert spec.info[:40] in box.locator(".info-text").inner_text(), key

    # Footer: always on screen, at the bottom of the viewport.
    for elem in ("start", "stop", "sample-now", "backup-now", "save-now", "epoch-bar",
                 "step-bar", "job-status"):
        assert page.locator(f"#{elem}").is_visible(), elem
    footer_box = page.locator("#footer").bounding_box()
    assert footer_box["y"] + footer_box["height"] >= 1000 - 2

    # The LR curve of the demo settings is drawn before any training.
    assert "180 optimizer steps" in page.locator("#lr-curve-caption").inner_text()
    assert page.locator("#lr-curve canvas, #lr-curve svg").count() > 0

    if screenshot_dir:
        page.set_viewport_size({"width": 1400, "height": 1500})
        page.goto(page.url)
        page.wait_for_selector("#job-status")
        time.sleep(3)
        page.screenshot(path=str(screenshot_dir / "screenshot-rest.png"))
    assert not page.errors


def test_only_fields_of_the_chosen_model_and_method_are_shown(page):
    choose(page, "training_method", "Fine-tune")
    wait_for(lambda: not section(page, "LoRA").is_visible(), UI, what="LoRA section hidden")
    choose(page, "model_type", "SDXL 1.0")
    wait_for(lambda: section(page, "Text encoder 2").is_visible(), UI, what="TE2 shown")
    label = section(page, "Text encoder").locator("button.label-wrap").inner_text()
    assert "Text encoder 1" in label
    # Hidden fields keep their values: they are in the exported config.
    page.click("#export")
    link = page.locator("#export-file a").first
    link.wait_for(timeout=20_000)
    exported = json.loads(page.request.get(link.get_attribute("href")).text())
    assert exported["training_method"] == "FINE_TUNE" and exported["lora_rank"] == 4
    # the LoRA format no longer fits: the method's own default took its place
    assert exported["output_model_format"] == "ORIGINAL_SINGLE_FILE"
    choose(page, "training_method", "LoRA")
    choose(page, "model_type", "SD 1.5")
    wait_for(lambda: section(page, "LoRA").is_visible()
             and not section(page, "Text encoder 2").is_visible(), UI, what="SD 1.5 LoRA view")
    wait_for(lambda: value_of(page, "output_model_format") == "KOHYA_LORA", UI,
             what="the LoRA format back")
    # The layer filter is there for the custom layer choice only.
    open_section(page, "LoRA")
    assert not field(page, "layer_filter").is_visible()
    choose(page, "lora_layer_preset", "custom")
    wait_for(lambda: field(page, "layer_filter").is_visible(), UI, what="the layer filter")
    choose(page, "lora_layer_preset", "attn-only")
    wait_for(lambda: not field(page, "layer_filter").is_visible(), UI, what="filter hidden")


def dialog_value(page, name: str) -> float:
    return float(value_of(page, f"optimizer.{name}"))


def test_optimizer_dialog_edits_persist_per_optimizer(page):
    dialog = page.locator("#optimizer-dialog")
    assert not dialog.is_visible()
    page.click("#optimizer-more")
    dialog.wait_for(state="visible")
    assert "ADAMW parameters" in dialog.inner_text()
    for param in optimizers.schema("ADAMW"):  # AdamW's parameters, defaults and tooltips
        box = field(page, f"optimizer.{param.name}")
        assert box.is_visible() and param.label in box.inner_text()
        assert param.tooltip[:30] in box.locator(".info-text").inner_text()
        if param.kind == "bool":  # a checkbox
            assert input_of(page, f"optimizer.{param.name}").is_checked() == param.default
        else:
            assert float(value_of(page, f"optimizer.{param.name}")) == pytest.approx(
                param.default)
    assert not field(page, "optimizer.momentum").is_visible()  # SGD's, not AdamW's
    assert dialog_value(page, "weight_decay") == pytest.approx(0.01)
    set_value(page, "optimizer.weight_decay", "0.05")
    page.click("#optimizer-close")
    dialog.wait_for(state="hidden")
    wait_for(lambda: "0.05" in page.locator("#optimizer-summary").inner_text(), UI,
             what="summary shows the edit")

    choose(page, "optimizer.optimizer", "LION")
    page.click("#optimizer-more")
    dialog.wait_for(state="visible")
    wait_for(lambda: "LION parameters" in dialog.inner_text(), UI, what="Lion's dialog")
    assert dialog_value(page, "beta2") == pytest.approx(0.99)  # Lion's own defaults
    assert dialog_value(page, "weight_decay") == 0
    set_value(page, "optimizer.beta2", "0.95")
    page.click("#optimizer-close")

    choose(page, "optimizer.optimizer", "ADAMW")
    page.click("#optimizer-more")
    wait_for(lambda: dialog_value(page, "weight_decay") == pytest.approx(0.05), UI,
             what="AdamW's edit remembered")
    assert dialog_value(page, "beta2") == pytest.approx(0.999)
    page.click("#optimizer-close")
    choose(page, "optimizer.optimizer", "LION")
    page.click("#optimizer-more")
    wait_for(lambda: dialog_value(page, "beta2") == pytest.approx(0.95), UI,
             what="Lion's edit remembered")

    # Restore defaults brings Lion's own defaults back.
    page.click("#optimizer-restore")
    wait_for(lambda: dialog_value(page, "beta2") == pytest.approx(0.99), UI,
             what="defaults restored")
    set_value(page, "optimizer.beta2", "0.97")
    page.click("#optimizer-close")

    choose(page, "optimizer.optimizer", "PRODIGY")  # Prodigy tells the user how to set LR
    wait_for(lambda: "learning rate to" in page.locator("#optimizer-hint").inner_text(), UI,
             what="Prodigy hint")

    # The edits travel with the exported config.
    page.click("#export")
    link = page.locator("#export-file a").first
    link.wait_for(timeout=20_000)
    exported = json.loads(page.request.get(link.get_attribute("href")).text())
    assert exported["optimizer"]["optimizer"] == "PRODIGY"
    assert exported["optimizer_defaults"]["ADAMW"]["weight_decay"] == pytest.approx(0.05)
    assert exported["optimizer_defaults"]["LION"]["beta2"] == pytest.approx(0.97)
    assert not page.errors


def test_presets_load_save_and_import(page, tmp_path):
    # Load a built-in preset: its values fill the page, the page's concepts stay.
    pick(page, "preset", "SD 1.5 masked LoRA")
    page.click("#preset-load")
    wait_for(lambda: "Loaded preset" in page.locator("#topbar-report").inner_text(), UI,
             what="the load report")
    open_section(page, "Masked training")
    assert field(page, "masked_training").locator("input").is_checked()
    assert value_of(page, "resolution") == "512"
    # the table is drawn again with the page's concepts (it may lag the report on a busy
    # machine: its rows were briefly empty in a CI run)
    wait_for(lambda: "trainer/demo/dataset" in page.locator("#table-concepts").inner_text(),
             UI, what="the page's concepts in the table after the load")

    # Save it as the user's own preset: it joins the dropdown.
    page.locator("#preset-name input, #preset-name textarea").first.fill("masked test")
    page.click("#preset-save")
    wait_for(lambda: "Saved preset" in page.locator("#topbar-report").inner_text(), UI,
             what="the save report")
    pick(page, "preset", "masked test (saved)")  # the saved preset is a choice now

    # Import a OneTrainer config: unknown keys reported, known ones applied.
    onetrainer = tmp_path / "onetrainer.json"
    onetrainer.write_text(json.dumps({
        "__version": 6, "debug_mode": False, "cache_dir": "cache", "learning_rate": 0.0007,
        "resolution": "640", "optimizer": {"optimizer": "LION", "fused": True},
        "masked_training": False}))
    with page.expect_file_chooser() as chooser:
        page.click("#import")
    chooser.value.set_files(str(onetrainer))
    report = page.locator("#topbar-report")
    wait_for(lambda: "Imported a OneTrainer config" in report.inner_text(), 20,
             what="the import report")
    assert "debug_mode" in report.inner_text() and "optimizer.fused" in report.inner_text()
    assert value_of(page, "resolution") == "640"
    assert value_of(page, "optimizer.optimizer") == "LION"
    assert not page.errors


def test_bad_field_value_shows_its_message(page):
    wait_idle(page)
    open_section(page, "Main settings")
    set_value(page, "resolution", "512x")
    page.click("#start")
    notice = page.locator("#notice")
    wait_for(lambda: "resolution" in notice.inner_text(), UI, what="the resolution message")
    assert "512x" in notice.inner_text()
    assert "Traceback" not in notice.inner_text()
    assert job_status(page) in ("idle", "finished", "stopped", "failed")  # nothing started

    # A number out of its range: Gradio's check, naming the field, in an error toast.
    set_value(page, "resolution", "64")
    open_section(page, "LoRA")
    set_value(page, "lora_rank", "0")
    page.click("#start")
    toast = page.locator("[data-testid=toast-body]")
    wait_for(lambda: "lora_rank" in str(toast.all_inner_texts()), UI,
             what="the range error toast")
    assert "below the minimum 1" in str(toast.all_inner_texts())
    set_value(page, "lora_rank", "4")

    # A combination the engine refuses is refused before the job starts, with its message.
    choose(page, "output_model_format", "DIFFUSERS")
    page.click("#start")
    wait_for(lambda: "output_model_format" in notice.inner_text(), UI, what="the refusal")
    choose(page, "output_model_format", "KOHYA_LORA")

    # A run that fails (a model that does not exist) shows its message, not a stack trace.
    set_value(page, "base_model_name", "/nonexistent/model-folder")
    page.click("#start")
    wait_for(lambda: job_status(page) == "failed", 60, what="the run to fail")
    assert "nonexistent" in job_message(page)
    assert "Traceback" not in page.locator("#job-status").inner_text()
    assert page.locator("#start").is_enabled()  # the page stays usable


def test_demo_trains_to_the_end_with_samples(page, screenshot_dir):
    """With no input: Start trains the demo preset to the end, progress rising, samples shown."""
    wait_idle(page)
    page.click("#start")
    wait_for(lambda: job_status(page) == "running", 30, what="the job to start")
    steps = []
    shot = False
    deadline = time.monotonic() + 300
    while job_status(page) in ("running", "stopping") and time.monotonic() < deadline:
        step, total = bar_value(page, "step-bar")
        steps.append(step)
        if (screenshot_dir and not shot and total and step >= total * 0.45
                and page.locator("#gallery img").count()):
            page.set_viewport_size({"width": 1400, "height": 1300})
            page.locator("#section-sampling").scroll_into_view_if_needed()
            page.evaluate("document.querySelector('#section-sampling').scrollIntoView()")
            time.sleep(1.5)
            page.screenshot(path=str(screenshot_dir / "screenshot-training.png"))
            shot = True
        time.sleep(0.5)
    assert job_status(page) == "finished", job_message(page)
    step, total = bar_value(page, "step-bar")
    assert step == total == 180
    assert bar_value(page, "epoch-bar") == (60, 60)
    assert len(set(steps)) >= 3 and steps == sorted(steps)  # it rose, step by step
    assert "Finished 180 steps" in job_message(page)
    wait_for(lambda: page.locator("#gallery img").count() >= 1, UI, what="a sample image")
    wait_for(lambda: ".safetensors" in page.locator("#download").inner_text(), UI,
             what="the download link")
    assert page.locator("[data-fact='Loss']").inner_text() != "–"
    assert not page.errors


def test_reload_reattaches_and_stop_saves(page, chromium, atelier_server):
    wait_idle(page)
    open_section(page, "Epochs / batch size")
    set_value(page, "epochs", "5000")  # long enough to reload and stop mid-run
    page.click("#start")
    wait_for(lambda: bar_value(page, "step-bar")[1] == 15000
             and bar_value(page, "step-bar")[0] >= 3, 90, what="a few steps of the new job")

    page.reload()  # the job belongs to the server: the page finds it again
    page.wait_for_selector("#job-status")
    wait_for(lambda: job_status(page) == "running", UI, what="re-attached status")
    first = bar_value(page, "step-bar")
    assert first[0] >= 3 and first[1] == 15000
    wait_for(lambda: bar_value(page, "step-bar")[0] > first[0], 30, what="progress after reload")
    assert page.locator("#stop").is_enabled()
    # The reloaded page shows the running job's settings, not the defaults.
    wait_for(lambda: "settings of the running job" in page.locator("#topbar-report").inner_text(),
             UI, what="the running job's settings")
    open_section(page, "Epochs / batch size")
    assert value_of(page, "epochs") == "5000"
    page.click("#sample-now")
    wait_for(lambda: "sample will be drawn" in page.locator("#notice").inner_text(), UI,
             what="Sample now taken")

    # A second browser sees the same job. Its Start would queue a job (issue 15), but one
    # writing the running job's output file is refused before it is queued.
    other = chromium.new_page(viewport={"width": 1200, "height": 900})
    other.goto(atelier_server[0])
    other.wait_for_selector("#job-status")
    wait_for(lambda: job_status(other) == "running", UI, what="second tab attached")
    other.locator("#start").click()
    wait_for(lambda: "output_model_destination" in other.locator("#notice").inner_text(), UI,
             what="second Start refused")
    other.close()

    page.click("#stop")
    wait_for(lambda: job_status(page) == "stopped", 60, what="the stop")
    message = job_message(page)
    assert "Stopped at step" in message and "saved to" in message
    assert ".safetensors" in message.split("saved to", 1)[1]
    wait_for(lambda: ".safetensors" in page.locator("#download").inner_text(), UI,
             what="the download of the stopped run")
    assert not page.errors


# Every word of an element's text on one line (a word broken inside has two line boxes) and
# nothing cut off at the element's edge.
WORDS_WHOLE = """(el) => {
    const broken = [];
    const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        for (const match of node.textContent.matchAll(/\\S+/g)) {
            const range = document.createRange();
            range.setStart(node, match.index);
            range.setEnd(node, match.index + match[0].length);
            const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
            if (tops.size > 1) broken.push(match[0]);
        }
    }
    const cut = el.scrollWidth > el.clientWidth + 1;
    return {broken, cut};
}"""


def test_table_column_titles_never_break_inside_a_word(page):
    """At 1440 px (the issue's width) each column title of the Concepts and Sample prompts
    tables keeps its words whole, and none is cut off."""
    page.set_viewport_size({"width": 1440, "height": 1000})
    page.wait_for_timeout(500)
    for table in ("#table-concepts", "#table-samples"):
        heads = page.locator(f"{table} thead th")
        assert heads.count() > 3, table
        for i in range(heads.count()):
            head = heads.nth(i)
            if not head.inner_text().strip():
                continue
            result = head.evaluate(WORDS_WHOLE)
            assert not result["broken"] and not result["cut"], (table, head.inner_text(),
                                                                 result)
