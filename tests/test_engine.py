"""The engine end to end on the tiny SD 1.5 model: real training, real files, real reloads."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from trainer.backup import list_backups
from trainer.control import Control
from trainer.errors import ConfigError, DatasetError, ModelLoadError, TrainingError
from trainer.loop import train
from trainer.metrics import PendingSteps

from helpers import (BLACK_MASKS, black_masked_folder, poison_loss_at, read_metrics,
                     same_trained, tiny_config, train_sampling_at_the_end)


def test_tiny_lora_loss_falls(tiny_sd15_dir, tmp_path):
    # 5 images, batch 2 -> 3 steps an epoch; 60 epochs = 180 steps (DESIGN: ~150 steps lower
    # the loss by a quarter on the tiny model).
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=60)
    result = train(config)
    records = read_metrics(config)
    assert result.global_step == 180 and len(records) == 180
    first = np.mean([r["loss"] for r in records[:30]])
    last = np.mean([r["loss"] for r in records[-30:]])
    assert last < 0.85 * first, (first, last)
    assert set(records[0]["lr"]) == {"text_encoder", "unet"}


@pytest.fixture(scope="module")
def trained_lora(tiny_sd15_dir, tmp_path_factory):
    """A short run that samples at its last step, so the trained pipeline's image is on disk."""
    return train_sampling_at_the_end(tiny_config, tiny_sd15_dir, tmp_path_factory.mktemp("lora"))


def test_saved_lora_has_only_kohya_keys_and_configured_alpha(trained_lora):
    config, result, _, _ = trained_lora
    with safe_open(result.output_path, "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
        alphas = {k: f.get_tensor(k) for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
                        for k in keys)
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in keys)
    assert all(float(a) == 3.0 for a in alphas.values())
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "3.0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(metadata["atelier_config"]) == json.loads(config.to_json())
    beside = json.loads(open(result.output_path.replace(".safetensors", ".json")).read())
    assert beside == json.loads(config.to_json())


def _render(pipe, sample):
    generator = torch.Generator("cpu").manual_seed(sample["seed"])
    image = pipe(sample["prompt"], width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"], guidance_scale=sample["cfg_scale"],
                 generator=generator).images[0]
    return np.asarray(image, dtype=np.int16)


def test_lora_reloads_in_diffusers_and_gives_the_trained_image(trained_lora, tiny_sd15_dir):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    _, result, events, sample = trained_lora
    samples = [e for e in events if e["type"] == "sample"]
    assert samples and samples[-1]["step"] == result.global_step
    trained = np.asarray(Image.open(samples[-1]["path"]), dtype=np.int16)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    base = _render(pipe, sample)
    pipe.load_lora_weights(result.output_path)
    reloaded = _render(pipe, sample)

    assert np.abs(reloaded - trained).max() <= 2        # the trained model's image
    assert np.abs(reloaded - base).mean() > 2           # and not the base model's


def test_events_report_progress(trained_lora):
    _, result, events, _ = trained_lora
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["step"] for e in progress] == list(range(1, result.global_step + 1))
    last = progress[-1]
    assert last["total_steps"] == 12 and last["steps_per_epoch"] == 3 and last["eta_seconds"] == 0
    assert last["epoch_step"] == 3 and last["epoch"] == 3
    assert {"loss", "smooth_loss", "lr"} <= set(last)


def test_same_seed_same_run(tiny_sd15_dir, tmp_path):
    a = train(tiny_config(tiny_sd15_dir, tmp_path / "a", epochs=1))
    b = train(tiny_config(tiny_sd15_dir, tmp_path / "b", epochs=1))
    with safe_open(a.output_path, "pt") as fa, safe_open(b.output_path, "pt") as fb:
        for key in fa.keys():
            assert same_trained(fa.get_tensor(key), fb.get_tensor(key)), key


def test_per_part_learning_rates_and_frozen_text_encoder(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, learning_rate=1e-3,
                         unet={"learning_rate": 5e-4},
                         text_encoder={"train": False})
    result = train(config)
    records = read_metrics(config)
    assert records[-1]["lr"] == {"unet": 5e-4}
    with safe_open(result.output_path, "pt") as f:
        assert not [k for k in f.keys() if k.startswith("lora_te_")]


def test_text_encoder_stops_after_n_steps(tiny_sd15_dir, tmp_path):
    """'Stop training after 2 STEP': the TE adapter is the same after step 2 as at the end."""
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2,
                         text_encoder={"train": True, "stop_training_after": 2,
                                       "stop_training_after_unit": "STEP"})
    short = tiny_config(tiny_sd15_dir, tmp_path / "short", epochs=1,
                        text_encoder={"train": True, "stop_training_after": 2,
                                      "stop_training_after_unit": "STEP"})
    long_run = train(config)
    # one epoch = 3 steps, so the short run's TE is also frozen after step 2
    short_run = train(short)
    with safe_open(long_run.output_path, "pt") as fl, safe_open(short_run.output_path, "pt") as fs:
        te = [k for k in fl.keys() if k.startswith("lora_te_")]
        unet = [k for k in fl.keys() if k.startswith("lora_unet_") and "lora_up" in k]
        assert te and all(same_trained(fl.get_tensor(k), fs.get_tensor(k)) for k in te)
        assert any(not same_trained(fl.get_tensor(k), fs.get_tensor(k)) for k in unet)


def test_masked_training_with_black_masks_learns_nothing(tiny_sd15_dir, tmp_path):
    """All-black masks, unmasked weight 0, never unmasked: the loss is exactly 0 everywhere,
    so the LoRA stays at its zero-effect init (lora_up all zeros)."""
    folder = black_masked_folder(tmp_path)
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, concepts=[{"path": str(folder)}],
                         **BLACK_MASKS)
    result = train(config)
    with safe_open(result.output_path, "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if k.endswith("lora_up.weight")]
    assert ups and all(torch.count_nonzero(u) == 0 for u in ups)
    # the same data unmasked does learn
    unmasked = train(tiny_config(tiny_sd15_dir, tmp_path / "u", epochs=2,
                                 concepts=[{"path": str(folder)}]))
    with safe_open(unmasked.output_path, "pt") as f:
        assert any(torch.count_nonzero(f.get_tensor(k)) for k in f.keys()
                   if k.endswith("lora_up.weight"))


def test_bfloat16_trains_on_cpu(tiny_sd15_dir, tmp_path):
    result = train(tiny_config(tiny_sd15_dir, tmp_path, epochs=1, train_dtype="BFLOAT_16"))
    assert result.global_step == 3


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine trains on its GPU")
def test_float16_is_refused_on_cpu_with_reason(tiny_sd15_dir, tmp_path):
    with pytest.raises(TrainingError, match="FLOAT_16 needs a CUDA GPU"):
        train(tiny_config(tiny_sd15_dir, tmp_path, train_dtype="FLOAT_16"))


def test_missing_model_path_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="nope-model"):
        train(tiny_config(tmp_path / "nope-model", tmp_path))


def test_empty_folder_names_it(tiny_sd15_dir, tmp_path):
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty-folder"):
        train(tiny_config(tiny_sd15_dir, tmp_path, concepts=[{"path": str(empty)}]))


def test_corrupt_image_among_good_ones_is_skipped_with_a_warning(tiny_sd15_dir, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (80, 64), (200, 10, 10)).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    events = []
    result = train(tiny_config(tiny_sd15_dir, tmp_path, epochs=1,
                               concepts=[{"path": str(folder)}]), Control(events.append))
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert any("broken.jpg" in w for w in warnings)
    assert result.global_step == 1


def test_batch_larger_than_dataset_is_refused(tiny_sd15_dir, tmp_path):
    with pytest.raises(DatasetError, match="batch_size 50"):
        train(tiny_config(tiny_sd15_dir, tmp_path, batch_size=50))


def test_nothing_to_train_is_refused(tiny_sd15_dir, tmp_path):
    with pytest.raises(ConfigError, match="Nothing to train"):
        train(tiny_config(tiny_sd15_dir, tmp_path, unet={"train": False},
                          text_encoder={"train": False}))


# --- What keeps host reads out of the step: losses reported in batches ---------------------------

def test_pending_steps_read_back_in_order():
    pending = PendingSteps(interval=3600)
    for step in range(1, 4):
        pending.add({"step": step}, torch.tensor(step / 10))
    assert not pending.due() and len(pending) == 3
    flushed = pending.flush()
    assert [(r["step"], round(v, 6)) for r, v in flushed] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert pending.flush() == [] and not pending.due()
    every_step = PendingSteps(interval=0)
    every_step.add({"step": 1}, torch.tensor(1.0))
    assert every_step.due()


def test_deferred_reports_log_every_step_and_stop_at_a_nan_before_its_backup(
        tiny_sd15_dir, tmp_path, monkeypatch):
    """With the GPU's deferred reporting (forced here on the CPU), every step is still logged
    once and in order, and a NaN loss ends the run with its step before a backup keeps it."""
    real_init = PendingSteps.__init__
    monkeypatch.setattr(PendingSteps, "__init__", lambda self, interval: real_init(self, 3600))
    events = []
    config = tiny_config(tiny_sd15_dir, tmp_path / "ok", epochs=2)
    train(config, Control(on_event=events.append))
    steps = [e["step"] for e in events if e["type"] == "progress"]
    assert steps == list(range(1, 7)) == [r["step"] for r in read_metrics(config)]
    times = [e["time"] for e in events if e["type"] == "progress"]
    assert times == sorted(times)

    poison_loss_at(monkeypatch, 3)
    config = tiny_config(tiny_sd15_dir, tmp_path / "nan", epochs=2, backup_after=2,
                         backup_after_unit="STEP")
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        train(config)
    assert [b.name for b in list_backups(tmp_path / "nan" / "ws" / "backup")] == ["step-2"]
