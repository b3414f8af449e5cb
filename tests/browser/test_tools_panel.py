"""The Tools section in the real page (headless Chromium): upload a LoRA, inspect it, resize it
to a lower rank, and download the result."""
from __future__ import annotations

from atelier_page import open_section, wait_for
from safetensors.torch import load_file
from test_lora_tools import LoraMaker

UI = 60  # seconds: an upload, and the first call that imports the tools, on a busy machine


def test_upload_inspect_resize_and_download_a_lora(page, atelier_server, tmp_path):
    _, workspace = atelier_server
    made = LoraMaker(tmp_path, {"sd15": workspace / "tiny-sd15"})("sd15", "lora")
    open_section(page, "tools")
    page.locator("#tools-upload input[type=file]").set_input_files(str(made))
    # (the file list draws a name's stem and its extension apart, on one line or two)
    wait_for(lambda: made.stem in page.locator("#tools-upload").inner_text(), UI,
             what=lambda: f"the LoRA uploaded: {page.locator('#tools-upload').inner_text()!r}")

    page.click("#tools-inspect")
    report = page.locator("#tools-report textarea")
    wait_for(lambda: "Stable Diffusion 1.5" in report.input_value(), UI, what="the report")
    assert "rank 4, alpha 2" in report.input_value()

    rank = page.locator("#tools-rank input")
    rank.fill("2")
    rank.press("Tab")
    page.click("#tools-resize")
    message = page.locator("#tools-message")
    wait_for(lambda: "at rank 2" in message.inner_text(), UI, what="the resize")
    link = page.locator("#tools-result a").first
    link.wait_for(timeout=UI * 1000)
    downloaded = tmp_path / "downloaded.safetensors"
    downloaded.write_bytes(page.request.get(link.get_attribute("href")).body())
    tensors = load_file(str(downloaded))
    downs = [t for k, t in tensors.items() if k.endswith("lora_down.weight")]
    assert downs and {t.shape[0] for t in downs} == {2}
    assert (workspace / "lora-tools" / f"{made.stem}-rank2.safetensors").is_file()
    assert not page.errors
