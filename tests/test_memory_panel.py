"""The memory estimate on the page (ui/memory_panel.py): the line, the warning with its levers,
"No estimate: <sentence>" for what cannot be told, the ownership rule, and its place in the
page."""
from __future__ import annotations

from trainer.config import config_from_dict
from trainer.ownership import Access, Realm, Viewer
from ui import memory_panel as P


def config(**values):
    return config_from_dict(values, warn=lambda m: None)


def test_the_panel_says_what_it_needs_and_that_there_is_no_gpu(tiny_sd15_dir):
    text = P.estimate_markdown(config(base_model_name=str(tiny_sd15_dir)), device_gb=None)
    assert text.startswith("<p id='memory-estimate-line'>ℹ️ <b>Needs about ")
    assert "GB of GPU memory (no GPU here: the estimate is for a GPU).</b>" in text
    assert "weights " in text and "activations " in text
    assert "memory-estimate-warning" not in text


def test_a_setting_that_does_not_fit_gets_the_warning_with_its_levers(tiny_sd15_dir):
    settings = config(base_model_name=str(tiny_sd15_dir), resolution="1024", batch_size=4,
                      gradient_checkpointing=False, text_encoder={"train": False})
    text = P.estimate_markdown(settings, device_gb=0.9)
    assert "⚠️ <b>Needs about " in text and "this GPU has 0.9 GB.</b>" in text
    warning = text.split("<p id='memory-estimate-warning'>")[1]
    assert warning.startswith("⚠️ It will not fit in 0.9 GB. Levers that lower it: ")
    for lever in ("gradient checkpointing on", "batch size 1", "resolution 768", "offloading"):
        assert lever in warning
    fits = P.estimate_markdown(settings, device_gb=80.0)
    assert "✅ <b>Needs about " in fits and "this GPU has 80.0 GB" in fits
    assert "memory-estimate-warning" not in fits


def test_what_cannot_be_told_is_one_sentence(tmp_path, tiny_sd15_dir):
    missing = P.estimate_markdown(config(base_model_name=str(tmp_path / "no-such-model")))
    assert missing == (f"<p id='memory-estimate-none'>No estimate: base_model_name: "
                       f"&#x27;{tmp_path / 'no-such-model'}&#x27; does not exist. Give a diffusers "
                       "model folder, a single-file .safetensors checkpoint, or a hub id.</p>")
    # a setting the engine refuses: its own sentence
    refused = P.estimate_markdown(config(base_model_name=str(tiny_sd15_dir),
                                         training_method="FINE_TUNE",
                                         unet={"weight_dtype": "FLOAT_8"}))
    assert refused.startswith("<p id='memory-estimate-none'>No estimate: unet.weight_dtype = "
                              "FLOAT_8: a fine-tuned part trains its own weights")
    assert "Traceback" not in missing + refused


def test_a_model_the_visitor_may_not_read_is_not_opened(tmp_path, tiny_sd15_dir, monkeypatch):
    opened = []
    from trainer import model_tensors
    monkeypatch.setattr(model_tensors, "read_header", lambda *args: opened.append(args) or [])
    shared = Access(Realm(tmp_path / "ws", shared=True, confine=True), Viewer("bob", False))
    text = P.estimate_markdown(config(base_model_name=str(tiny_sd15_dir)), shared)
    assert text.startswith("<p id='memory-estimate-none'>No estimate: base_model_name")
    assert opened == []


def test_the_page_shows_the_estimate_and_redraws_it_when_a_field_changes(tiny_sd15_dir):
    from ui.page import build_page

    demo = build_page()
    redraw = next(fn for fn in demo.fns.values() if fn.api_name == "memory_estimate")
    (panel,) = redraw.outputs
    assert panel.elem_id == "memory-estimate"
    assert panel.value.startswith("<p id='memory-estimate-")  # drawn at build, demo settings
    by_id = {block._id: block for block in demo.blocks.values()}
    triggers = {getattr(by_id[i], "elem_id", None) for i, event in redraw.targets
                if event == "change"}
    assert {"field-resolution", "field-batch-size", "field-base-model-name",
            "field-gradient-checkpointing", "field-unet-weight-dtype",
            "field-model-type"} <= triggers
    inputs = {getattr(i, "elem_id", None): i for i in redraw.inputs}

    def redraw_with(**values):
        data = {component: component.value for component in redraw.inputs}
        for key, value in values.items():
            data[inputs["field-" + key.replace(".", "-").replace("_", "-")]] = value
        return redraw.fn(data, None)

    text = redraw_with(base_model_name=str(tiny_sd15_dir), resolution="512")
    assert "<b>Needs about " in text and "Traceback" not in text
    bad = redraw_with(base_model_name=str(tiny_sd15_dir), resolution="12x")
    assert bad.startswith("<p id='memory-estimate-none'>No estimate: ") and "resolution" in bad
