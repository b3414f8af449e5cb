"""Try it in the real page: a LoRA trained into the server's workspace is listed first, and
Generate shows the image without and with it (headless Chromium)."""
from __future__ import annotations

from atelier_page import open_section, wait_for

from helpers import tiny_config

UI = 90  # seconds: the first try loads the base model


def test_a_trained_lora_is_drawn_beside_its_base_model(page, atelier_server):
    from trainer.loop import train
    _, workspace = atelier_server
    config = tiny_config(workspace / "tiny-sd15", workspace / "try-run", epochs=1,
                         output_model_destination=str(workspace / "try-run" / "mine.safetensors"))
    train(config)
    open_section(page, "try")
    page.click("#try-refresh")
    lora = page.locator("#try-lora input")
    wait_for(lambda: "try-run/mine.safetensors" in lora.input_value(), UI, what="the LoRA listed")
    wait_for(lambda: page.locator("#try-width input").input_value() == "64", UI,
             what="its training size")
    page.locator("#try-prompt textarea").fill("a photo of a cat")
    steps = page.locator("#try-steps input")
    steps.fill("3")
    steps.press("Tab")
    page.click("#try-generate")
    message = page.locator("#try-message")
    wait_for(lambda: "mine.safetensors at strength 1" in message.inner_text(), UI,
             what="the images")
    for elem in ("#try-without img", "#try-with img"):  # the images load after the message
        wait_for(lambda: page.locator(elem).first.is_visible(), UI, what=elem)
    assert not page.errors
