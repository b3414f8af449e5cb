"""Backups, exact resume, rolling count, crash safety, NaN stop."""
import pytest
import torch
from safetensors import safe_open

from trainer.backup import list_backups
from trainer.config import TimeUnit
from trainer.errors import ConfigError, TrainingError
from trainer.loop import train

from helpers import (RUNS_ARE_BIT_EXACT, poison_loss_at, read_metrics, same_trained, stop_at,
                     tiny_config)


def weights(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("extra", [
    {},
    {"ema": "CPU", "ema_update_step_interval": 1, "gradient_accumulation_steps": 2,
     "batch_size": 1, "learning_rate_scheduler": "COSINE",
     "text_encoder": {"train": True, "caption_dropout_probability": 0.5,
                      "stop_training_after_unit": "NEVER"},
     "masked_training": True, "unmasked_probability": 0.5},
], ids=["plain", "ema-accumulation-dropout-masks"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(extra, tiny_sd15_dir, tmp_path):
    whole = tiny_config(tiny_sd15_dir, tmp_path / "whole", epochs=3, backup_after_unit="NEVER",
                        **extra)
    reference = train(whole)

    parts = tiny_config(tiny_sd15_dir, tmp_path / "parts", epochs=3, backup_after_unit="NEVER",
                        **extra)
    first = train(parts, stop_at(4))
    assert first.stopped_early and first.global_step == 4
    assert [b.name for b in list_backups(tmp_path / "parts" / "ws" / "backup")] == ["step-4"]
    resumed = train(parts.model_copy(update={"continue_last_backup": True}))
    assert resumed.global_step == reference.global_step

    steps = [r["step"] for r in read_metrics(parts)]
    assert steps == list(range(1, reference.global_step + 1))  # 1..4, then 5.. (no repeats)
    # the learning rate of every part at every step, as in the uninterrupted run
    ref_lrs, lrs = ([r["lr"] for r in read_metrics(run)] for run in (whole, parts))
    assert len(lrs) == len(ref_lrs)
    for step, (got, expected) in enumerate(zip(lrs, ref_lrs), start=1):
        assert got.keys() == expected.keys(), step
        assert got == pytest.approx(expected), step
    a, b = weights(reference.output_path), weights(resumed.output_path)
    assert a.keys() == b.keys()
    for key in a:
        if RUNS_ARE_BIT_EXACT:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
        else:
            assert same_trained(a[key], b[key]), key


def test_rolling_backups_keep_the_newest(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, backup_after=1,
                         backup_after_unit="STEP", rolling_backup=True, rolling_backup_count=2)
    train(config)
    assert [b.name for b in list_backups(tmp_path / "ws" / "backup")] == ["step-5", "step-6"]


def test_backup_every_epoch_and_keep_all(tiny_sd15_dir, tmp_path):
    train(tiny_config(tiny_sd15_dir, tmp_path, epochs=3, backup_after=1,
                      backup_after_unit="EPOCH", backup_before_save=False))
    assert [b.name for b in list_backups(tmp_path / "ws" / "backup")] == [
        "step-3", "step-6", "step-9"]


def test_a_crash_mid_backup_leaves_the_previous_backup_usable(tiny_sd15_dir, tmp_path,
                                                              monkeypatch):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, backup_after=2,
                         backup_after_unit="STEP")
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if "step-4" in str(path):
            real_save(obj, path, *args, **kwargs)
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(TrainingError, match="No space left on device"):
        train(config)
    monkeypatch.setattr(torch, "save", real_save)
    root = tmp_path / "ws" / "backup"
    assert [b.name for b in list_backups(root)] == ["step-2"]
    assert not list(root.glob(".tmp-*"))           # the half-written folder is gone
    # a hard crash leaves a .tmp folder: it never counts as a backup
    (root / ".tmp-step-5-123").mkdir()
    (root / ".tmp-step-5-123" / "progress.json").write_text("{}")
    resumed = train(config.model_copy(update={"continue_last_backup": True,
                                                "backup_after_unit": TimeUnit.NEVER}))
    assert resumed.global_step == 6
    assert read_metrics(config)[2]["step"] == 3  # continued after step 2


def test_resume_with_an_incompatible_config_is_refused(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1)
    train(config)
    changed = config.model_copy(update={"continue_last_backup": True, "lora_rank": 8})
    with pytest.raises(ConfigError, match="lora_rank: 4 in the backup, 8 now"):
        train(changed)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_backup(tiny_sd15_dir, tmp_path,
                                                                monkeypatch):
    poison_loss_at(monkeypatch, 3)
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, backup_after=1,
                         backup_after_unit="STEP")
    with pytest.raises(TrainingError, match="loss became nan at step 3") as error:
        train(config)
    assert "learning rate too high" in str(error.value)
    assert [b.name for b in list_backups(tmp_path / "ws" / "backup")] == ["step-1", "step-2"]
    assert not (tmp_path / "ws" / "output" / "lora.safetensors").exists()


def test_intermediate_saves_carry_the_step(tiny_sd15_dir, tmp_path):
    result = train(tiny_config(tiny_sd15_dir, tmp_path, epochs=2, save_every=1,
                               save_every_unit="EPOCH"))
    out = tmp_path / "ws" / "output"
    assert (out / "lora-step000003.safetensors").is_file()
    assert (out / "lora.safetensors").is_file() and result.global_step == 6
