"""The background job: starts at once, state readable any time, graceful stop, one at a time."""
import time
from pathlib import Path

import pytest

from trainer.config import config_from_dict
from trainer.demo import DEMO_DATASET_DIR
from trainer.session import JobAlreadyRunning, TrainingSession


def long_config(model_dir, tmp_path, **extra):
    data = {"base_model_name": str(model_dir), "workspace_dir": str(tmp_path / "ws"),
            "concepts": [{"path": str(DEMO_DATASET_DIR)}], "resolution": "64",
            "train_dtype": "FLOAT_32", "gradient_checkpointing": False,
            "learning_rate": 1e-3, "learning_rate_warmup_steps": 0, "lora_rank": 4,
            "batch_size": 1, "epochs": 1000}
    data.update(extra)
    return config_from_dict(data)


def wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_start_returns_at_once_stop_is_graceful_and_saves(tiny_sd15_dir, tmp_path):
    session = TrainingSession()
    assert session.job_config() is None
    began = time.monotonic()
    config = long_config(tiny_sd15_dir, tmp_path)
    session.start(config)
    assert time.monotonic() - began < 1.0
    assert session.state().status == "running"
    assert session.job_config() is config  # what a page opened now shows
    wait_for(lambda: session.state().step >= 3)

    with pytest.raises(JobAlreadyRunning, match="already running"):
        session.start(long_config(tiny_sd15_dir, tmp_path / "second"))

    at_stop = session.state().step
    session.stop()
    assert session.wait(60)
    state = session.state()
    assert state.status == "stopped", state.message
    assert at_stop <= state.step <= at_stop + 1          # ends within one step
    assert state.total_steps == 5000 and state.steps_per_epoch == 5
    assert Path(state.output_path).is_file()
    assert "Stopped at step" in state.message and state.output_path in state.message
    assert len(state.loss_history) == state.step and state.lr_history
    # the session is free again
    session.start(long_config(tiny_sd15_dir, tmp_path / "third", epochs=1))
    assert session.wait(60) and session.state().status == "finished"


def test_state_reports_progress_samples_and_finish(tiny_sd15_dir, tmp_path):
    session = TrainingSession()
    session.start(long_config(
        tiny_sd15_dir, tmp_path, epochs=2, sample_after=1, sample_after_unit="EPOCH",
        samples=[{"prompt": "a cat", "width": 64, "height": 64, "diffusion_steps": 2}]))
    assert session.wait(120)
    state = session.state()
    assert state.status == "finished", state.message
    assert (state.step, state.total_steps, state.epoch, state.epochs) == (10, 10, 1, 2)
    assert state.loss is not None and state.smooth_loss is not None and state.eta_seconds == 0
    assert [s["epoch"] for s in state.samples] == [1, 2]
    assert all(Path(s["path"]).is_file() for s in state.samples)


def test_failure_is_a_message_not_a_crash(tmp_path):
    session = TrainingSession()
    session.start(long_config(tmp_path / "no-such-model", tmp_path))
    assert session.wait(60)
    state = session.state()
    assert state.status == "failed"
    assert "no-such-model" in state.error and "Traceback" not in state.error


def test_sample_and_save_on_request(tiny_sd15_dir, tmp_path):
    session = TrainingSession()
    session.start(long_config(tiny_sd15_dir, tmp_path, samples=[
        {"prompt": "a cat", "width": 64, "height": 64, "diffusion_steps": 2}]))
    wait_for(lambda: session.state().step >= 1)
    session.request("sample")
    session.request("save")
    wait_for(lambda: session.state().samples and session.state().output_path)
    session.stop()
    assert session.wait(60)


def test_an_ended_job_keeps_its_duration(tiny_sd15_dir, tmp_path):
    from ui.footer import format_seconds, status_html
    session = TrainingSession()
    began = time.monotonic()
    session.start(long_config(tiny_sd15_dir, tmp_path, epochs=8))  # 40 steps: over a second
    assert session.wait(120)
    took = time.monotonic() - began
    state = session.state()
    assert state.status == "finished" and 1.0 <= state.elapsed_seconds <= took
    time.sleep(0.3)
    assert session.state().elapsed_seconds == state.elapsed_seconds  # frozen at the end
    shown = status_html(state)
    assert f'data-fact="Elapsed">{format_seconds(state.elapsed_seconds)}<' in shown
    assert 'data-fact="Elapsed">0 s<' not in shown
