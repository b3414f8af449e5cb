"""The footer's rendering of a job's state, and the LR curve drawn before training."""
from __future__ import annotations

import pytest

from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR
from trainer.session import JobState
from ui import footer, lr_preview


def running_state(**overrides) -> JobState:
    state = JobState(status="running", message="Training", epoch=2, epochs=60, step=7,
                     total_steps=180, epoch_step=1, steps_per_epoch=3, loss=0.91,
                     smooth_loss=0.95, lr={"unet": 1e-2}, eta_seconds=65.0,
                     elapsed_seconds=3.0,
                     loss_history=[(i, 1.0 - i / 100, 1.0) for i in range(1, 8)],
                     lr_history=[(i, 1e-2) for i in range(1, 8)])
    for key, value in overrides.items():
        setattr(state, key, value)
    return state


def test_bars_read_x_of_y():
    epoch_html, step_html = footer.bars(running_state())
    assert "Epoch 3 / 60" in epoch_html and 'data-value="3"' in epoch_html
    assert "Step 7 / 180" in step_html and "width:3.9%" in step_html
    done_epoch, done_step = footer.bars(running_state(status="finished", step=180))
    assert "Epoch 60 / 60" in done_epoch and "width:100.0%" in done_epoch
    idle_epoch, idle_step = footer.bars(JobState())
    assert "Epoch – / –" in idle_epoch and "Step – / –" in idle_step


def test_status_shows_eta_loss_and_escapes_messages():
    text = footer.status_html(running_state(message="<b>Training</b>"))
    assert "1 min 05 s" in text and "0.9100" in text and "0.9500" in text
    assert "&lt;b&gt;Training&lt;/b&gt;" in text and 'data-status="running"' in text
    failed = footer.status_html(JobState(status="failed", message="The model was not found"))
    assert "Failed" in failed and "The model was not found" in failed


def test_plots_and_thinning():
    frame = footer.loss_frame(running_state())
    assert set(frame["series"]) == {"loss", "smoothed", "validation"} and len(frame) == 15
    assert frame[frame["series"] == "validation"]["loss"].isna().all()  # none measured yet
    long = running_state(loss_history=[(i, 1.0, 1.0) for i in range(1, 5001)],
                         validation_history=[(i, 0.5) for i in range(100, 5001, 100)])
    thinned = footer.loss_frame(long)
    assert len(thinned) <= 3 * (footer.MAX_PLOT_POINTS + 1)
    steps = thinned[thinned["series"] == "loss"]["step"]
    assert steps.iloc[-1] == 5000  # the newest point is always drawn
    validation = thinned[thinned["series"] == "validation"]
    assert list(validation["step"]) == list(range(100, 5001, 100))
    assert (validation["loss"] == 0.5).all()
    assert list(footer.lr_frame(running_state())["learning rate"])[:1] == [1e-2]
    # Before any step: the series are named (a plot whose colours start empty never draws).
    empty = footer.loss_frame(JobState())
    assert list(empty["series"]) == ["loss", "smoothed", "validation"]
    assert empty["loss"].isna().all()


def test_gallery_newest_first_and_download_only_when_done(tmp_path):
    images = []
    for step in (60, 120):
        path = tmp_path / f"step{step}.png"
        path.write_bytes(b"png")
        images.append({"path": str(path), "prompt": "a cat", "step": step, "epoch": 0})
    state = running_state(samples=images)
    items = footer.gallery_items(state)
    assert [caption for _, caption in items] == ["step 120 · a cat", "step 60 · a cat"]
    model = tmp_path / "lora.safetensors"
    model.write_bytes(b"x")
    model.with_suffix(".json").write_text("{}")
    assert footer.download_files(running_state(output_path=str(model))) is None
    files = footer.download_files(running_state(status="finished", output_path=str(model)))
    assert [f.rsplit("/", 1)[1] for f in files] == ["lora.safetensors", "lora.json"]


def test_the_files_shown_are_those_the_visitor_may_read(tmp_path, monkeypatch):
    import json
    import os

    from trainer.ownership import Access, Realm, Viewer
    ws = tmp_path / "ws"
    job = ws / "jobs" / "1"
    (job / "samples").mkdir(parents=True)
    (job / "job.json").write_text(json.dumps({"owner": "alice"}))
    sample, model = job / "samples" / "step1-0.png", job / "lora.safetensors"
    sample.write_bytes(b"png")
    model.write_bytes(b"x")
    state = running_state(status="finished", output_path=str(model),
                          samples=[{"path": str(sample), "prompt": "p", "step": 1}])
    realm = Realm(ws, shared=True, confine=True)
    alice, bob = Access(realm, Viewer("alice", False)), Access(realm, Viewer("bob", False))
    assert len(footer.gallery_items(state, alice)) == 1 and footer.download_files(state, alice)
    assert footer.gallery_items(state, bob) == [] and footer.download_files(state, bob) is None
    # A file outside the working folder and the temp folder (a workspace on /data) is
    # copied where gradio takes files from; a dot-file of the working folder too.
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(footer.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(footer, "_SERVE_DIR", tmp_path / "tmp" / "atelier-serve")
    copy = footer.servable(sample)
    assert copy != str(sample) and open(copy, "rb").read() == b"png"
    assert copy.startswith(str(tmp_path / "tmp"))
    (elsewhere / ".hidden.png").write_bytes(b"h")
    served = footer.servable(elsewhere / ".hidden.png")
    assert not os.path.basename(served).startswith(".")
    assert footer.servable(elsewhere / "x.png") == str(elsewhere / "x.png")


def test_snapshot_changes_with_progress():
    a = footer.Snapshot.of(running_state())
    assert a == footer.Snapshot.of(running_state())
    assert a != footer.Snapshot.of(running_state(step=8))


def demo_config(**overrides):
    data = {"concepts": [{"path": str(DEMO_DATASET_DIR)}], "epochs": 60, "batch_size": 2,
            "learning_rate": 0.01, "learning_rate_warmup_steps": 10}
    data.update(overrides)
    return config_from_dict(data, warn=lambda m: None)


def test_lr_curve_of_the_demo_settings():
    frame, caption = lr_preview.curve_frame(demo_config())
    assert "5 images per epoch → 180 optimizer steps" in caption
    assert frame["learning rate"].iloc[0] == 0 and frame["learning rate"].iloc[-1] == 0.01
    assert frame["step"].iloc[-1] == 179


def test_the_lr_preview_warns_before_start_when_the_warm_up_outlasts_the_run():
    _, caption = lr_preview.curve_frame(demo_config(epochs=4))  # 12 steps, 10 of warm-up
    assert "⚠" not in caption
    _, caption = lr_preview.curve_frame(demo_config(epochs=4, learning_rate_warmup_steps=200))
    assert "⚠" in caption and "200 steps) is longer than the whole run (12 optimizer steps)"\
        in caption and "ends at 0.00055 (5.5% of it)" in caption


def test_lr_curve_follows_schedule_repeats_and_accumulation():
    config = demo_config(learning_rate_scheduler="COSINE", learning_rate_warmup_steps=0,
                         gradient_accumulation_steps=2,
                         concepts=[{"path": str(DEMO_DATASET_DIR), "repeats": 2}])
    total, per_epoch, images = lr_preview.estimate_steps(config)
    assert (images, per_epoch, total) == (10, 3, 180)  # 10 images -> 5 batches -> 3 updates
    frame, _ = lr_preview.curve_frame(config)
    assert frame["learning rate"].iloc[0] == pytest.approx(0.01)
    assert frame["learning rate"].iloc[-1] < 1e-5


def test_lr_curve_without_images_or_formula_says_why():
    frame, caption = lr_preview.curve_frame(demo_config(concepts=[{"path": "/nowhere"}]))
    assert frame.empty and "No images" in caption
    adafactor = demo_config(learning_rate_scheduler="ADAFACTOR",
                            optimizer={"optimizer": "ADAFACTOR", "relative_step": True})
    frame, caption = lr_preview.curve_frame(adafactor)
    assert frame.empty and "Adafactor" in caption
    custom = demo_config(learning_rate_scheduler="CUSTOM",
                         custom_learning_rate_scheduler="torch.optim.lr_scheduler.StepLR",
                         scheduler_params=[{"key": "step_size", "value": "30"}])
    frame, caption = lr_preview.curve_frame(custom, allow_custom_code=False)
    assert frame.empty and "disabled" in caption
    frame, _ = lr_preview.curve_frame(custom, allow_custom_code=True)
    assert not frame.empty
