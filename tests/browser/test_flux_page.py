"""Flux.1 in the page, in headless Chromium: choosing the family changes the sections (a
Transformer section instead of the UNet's, T5 named, its Train switch off, the flow settings
and their timestep preview), and the tiny Flux trains to the end with a sample shown."""
from __future__ import annotations

import time

from atelier_page import (bar_value, choose, field, job_message, job_status, open_section,
                          section, set_value, value_of, wait_for, wait_idle)

from trainer.models.tiny_flow import build_tiny_flow_model

UI = 60  # seconds a page update may take on a busy machine (waits end as soon as it shows)


def test_choose_flux_and_train_the_tiny_model_with_a_sample(page, atelier_server):
    _, workspace = atelier_server
    model = build_tiny_flow_model("flux", workspace / "tiny-flux")
    wait_idle(page)
    assert section(page, "UNet").is_visible() and not section(page, "Transformer").is_visible()
    choose(page, "model_type", "Flux.1")
    wait_for(lambda: section(page, "Transformer").is_visible()
             and not section(page, "UNet").is_visible(), UI, what="the Transformer section")
    wait_for(lambda: "(T5)" in section(page, "Text encoder 2").locator(
        "button.label-wrap").inner_text(), UI, what="T5 named")
    open_section(page, "Text encoder 2")
    assert not field(page, "text_encoder_2.train").locator("input").is_checked()
    # the demo's KOHYA_LORA fits Flux too (kohya's fused-layer names): it stays
    assert value_of(page, "output_model_format") == "KOHYA_LORA"
    open_section(page, "Noise and loss")
    wait_for(lambda: "shift" in page.locator("#timestep-curve-caption").inner_text(), UI,
             what="the timestep preview")

    open_section(page, "Model")
    set_value(page, "base_model_name", str(model))
    open_section(page, "Epochs / batch size")
    set_value(page, "epochs", 4)
    open_section(page, "Sampling")
    set_value(page, "sample_after", 4)
    page.click("#start")
    wait_for(lambda: job_status(page) == "running", 30, what="the job to start")
    deadline = time.monotonic() + 300
    while job_status(page) in ("running", "stopping") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_status(page) == "finished", job_message(page)
    assert bar_value(page, "step-bar") == (12, 12)
    wait_for(lambda: page.locator("#gallery img").count() >= 1, UI, what="a sample image")
    assert (workspace / "demo" / "output" / "demo-lora.safetensors").is_file()
    assert not page.errors
