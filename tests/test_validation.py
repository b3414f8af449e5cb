"""The validation loss (issue 27): measured on images the run never trains on, at fixed noise
and timesteps, so that it moves only when the weights do."""
from __future__ import annotations

import shutil

import pytest
import torch
from helpers import BLACK_MASKS, black_masked_folder, read_metrics, tiny_config

from trainer.batch_loss import BatchLoss
from trainer.config import ConfigError
from trainer.data.dataset import ImageItem
from trainer.demo import DEMO_DATASET_DIR
from trainer.errors import DatasetError
from trainer.loop import train
from trainer.validation import (SEED_SALT, VALIDATION_TIMESTEPS, Validation,
                                check_validation_cadence)
from trainer.validation_split import held_out_count, split_items


def unmasked_copy(tmp_path, stems=("cat", "coffee"), name="held"):
    """Some demo images with their captions, without their masks."""
    folder = tmp_path / name
    folder.mkdir()
    for stem in stems:
        for suffix in (".jpg", ".txt"):
            shutil.copy(DEMO_DATASET_DIR / f"{stem}{suffix}", folder / f"{stem}{suffix}")
    return folder


def validation_records(config):
    return [r for r in read_metrics(config) if "validation_loss" in r]


class Spy:
    """Each measurement's values (measured twice in a row), whether gradients were on during
    it, and the images of every training batch."""

    def __init__(self, monkeypatch):
        self.measured, self.grad_seen, self.trained_on = [], [], set()
        import trainer.validation as module
        real_measure, real_masked = Validation.measure, module.masked_sample_loss
        real_loss = BatchLoss.__call__

        def measure(validation, *args):
            first = real_measure(validation, *args)
            self.measured.append((first, real_measure(validation, *args)))
            return first

        def masked(per_pixel, *args, **kwargs):  # the error of the validation's prediction
            self.grad_seen.append(torch.is_grad_enabled() or per_pixel.requires_grad)
            return real_masked(per_pixel, *args, **kwargs)

        def loss(batch_loss, batch, grad):
            self.trained_on.update(batch["image_path"])
            return real_loss(batch_loss, batch, grad)

        monkeypatch.setattr(Validation, "measure", measure)
        monkeypatch.setattr(module, "masked_sample_loss", masked)
        monkeypatch.setattr(BatchLoss, "__call__", loss)


# --- which images ----------------------------------------------------------------------------

def test_the_split_holds_out_the_same_images_for_the_same_seed(tmp_path):
    class Concept:
        def __init__(self, kind):
            self.type, self.path = kind, "x"
    concepts = [Concept("STANDARD"), Concept("VALIDATION"), Concept("PRIOR_PREDICTION")]
    items = [ImageItem(tmp_path / f"{c}-{i}.png", "", None, 1.0, c) for c in range(3)
             for i in range(10)]
    train_a, held_a = split_items(items, concepts, 0.3, seed=1)
    train_b, held_b = split_items(items, concepts, 0.3, seed=1)
    _, held_other = split_items(items, concepts, 0.3, seed=2)
    assert held_a == held_b and held_a != held_other
    assert sum(i.concept_index == 0 for i in held_a) == 3            # 30 % of a standard one
    assert sum(i.concept_index == 1 for i in held_a) == 10           # all of a validation one
    assert not [i for i in held_a if i.concept_index == 2]           # a prior one is trained
    assert not set(map(id, train_a)) & set(map(id, held_a))
    assert [held_out_count(n, 0.5) for n in (0, 1, 2, 3, 10)] == [0, 0, 1, 2, 5]
    assert held_out_count(4, 0.99) == 3 and held_out_count(10, 0.01) == 1


@pytest.mark.parametrize("overrides, error, message", [
    ({"validation": True}, ConfigError, "validation: no image to validate on"),
    ({"concepts": [{"path": str(DEMO_DATASET_DIR), "type": "VALIDATION"}]}, DatasetError,
     "every enabled concept is a VALIDATION concept"),
])
def test_nothing_to_validate_or_to_train_is_refused(tiny_sd15_dir, tmp_path, overrides, error,
                                                    message):
    with pytest.raises(error, match=message):
        train(tiny_config(tiny_sd15_dir, tmp_path, **overrides))


def test_a_clock_cadence_is_refused_on_several_processes(tmp_path):
    config = tiny_config(tmp_path, tmp_path, validation=True, validate_after_unit="MINUTE")
    check_validation_cadence(config, 1)
    with pytest.raises(ConfigError, match="validate_after_unit MINUTE with 2 processes"):
        check_validation_cadence(config, 2)


# --- the measurement ---------------------------------------------------------------------------

def test_same_weights_same_number_and_never_trained_on(tiny_sd15_dir, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    held = unmasked_copy(tmp_path)
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=3, validation=True,
                         concepts=[{"path": str(DEMO_DATASET_DIR)},
                                   {"path": str(held), "type": "VALIDATION"}])
    result = train(config)
    records = validation_records(config)
    assert [r["step"] for r in records] == [3, 6, 9]  # every epoch (the default cadence)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(first == second for first, second in spy.measured)  # same weights, same number
    values = [r["validation_loss"] for r in records]
    assert len(set(values)) == 3                                    # the weights moved
    assert result.best_validation == (min(values), records[values.index(min(values))]["step"])
    assert spy.grad_seen and not any(spy.grad_seen)                 # never a gradient
    assert not {str(p) for p in held.iterdir()} & spy.trained_on    # never a training batch
    assert spy.trained_on                                           # (which did happen)


def test_cadence_in_steps_and_the_split_list(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, validation=True,
                         validation_split=0.4, validate_after=2, validate_after_unit="STEP")
    result = train(config)
    assert [r["step"] for r in validation_records(config)] == list(range(2, result.global_step
                                                                          + 1, 2))
    listed = (tmp_path / "ws" / "validation_split.txt").read_text().split()
    assert len(listed) == 2 and all(p.startswith(str(DEMO_DATASET_DIR)) for p in listed)


def test_masked_validation_uses_the_masks(tiny_sd15_dir, tmp_path):
    """Images whose masks are all black, unmasked weight 0: masked, their loss is exactly 0;
    the same images unmasked are not."""
    data = black_masked_folder(tmp_path)
    common = dict(epochs=1, validation=True, validation_split=0.3,
                  concepts=[{"path": str(data)}])
    masked = tiny_config(tiny_sd15_dir, tmp_path / "m", **common, **BLACK_MASKS)
    plain = tiny_config(tiny_sd15_dir, tmp_path / "p", **common)
    train(masked), train(plain)
    assert validation_records(masked)[0]["validation_loss"] == 0.0
    assert validation_records(plain)[0]["validation_loss"] > 0.01


def test_several_concepts_each_and_the_mean_over_images(tiny_sd15_dir, tmp_path):
    one = unmasked_copy(tmp_path, ("cat",), "one")
    two = unmasked_copy(tmp_path, ("coffee", "rocket"), "two")
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, validation=True,
                         concepts=[{"path": str(DEMO_DATASET_DIR)},
                                   {"path": str(one), "type": "VALIDATION"},
                                   {"path": str(two), "type": "VALIDATION"}])
    train(config)
    record = validation_records(config)[0]
    assert set(record) == {"step", "epoch", "validation_loss", "validation_loss/one",
                           "validation_loss/two"}
    mean = (record["validation_loss/one"] + 2 * record["validation_loss/two"]) / 3
    assert record["validation_loss"] == pytest.approx(mean, rel=1e-12)


def test_the_ema_weights_are_measured(tiny_sd15_dir, tmp_path, monkeypatch):
    from trainer.ema import WeightEMA
    applied, seen = [], []
    real_applied = WeightEMA.applied

    def spied_applied(ema):
        applied.append(True)
        return real_applied(ema)

    real_measure = Validation.measure

    def measure(validation, *args):
        seen.append(len(applied))
        return real_measure(validation, *args)

    monkeypatch.setattr(WeightEMA, "applied", spied_applied)
    monkeypatch.setattr(Validation, "measure", measure)
    held = unmasked_copy(tmp_path)
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, validation=True, ema="GPU",
                         concepts=[{"path": str(DEMO_DATASET_DIR)},
                                   {"path": str(held), "type": "VALIDATION"}])
    train(config)
    assert seen == [1, 2]  # each measurement inside its own EMA swap (saves come after)


def test_the_loss_is_the_diffusion_loss_at_the_fixed_noise_and_timesteps(tiny_sd15_dir,
                                                                          tmp_path, monkeypatch):
    """One image, a run whose weights never move (its training images' masks are black), so
    the measured model is the base model: the number is computed again here with diffusers'
    own UNet, text encoder, VAE and scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    seen = {}
    real = Validation.batch_losses

    def spied(validation, batch, number):
        seen.update(batch=batch, number=number,
                    timesteps=validation.timesteps(tuple(s // 8 for s in
                                                         batch["pixel_values"].shape[-2:])))
        return real(validation, batch, number)

    monkeypatch.setattr(Validation, "batch_losses", spied)
    held = unmasked_copy(tmp_path, ("cat",))
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, validation=True,
                         latent_caching=False, text_encoder={"train": False}, **BLACK_MASKS,
                         concepts=[{"path": str(black_masked_folder(tmp_path))},
                                   {"path": str(held), "type": "VALIDATION"}])
    train(config)
    measured = validation_records(config)[0]["validation_loss"]

    vae = AutoencoderKL.from_pretrained(tiny_sd15_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    encoder = CLIPTextModel.from_pretrained(tiny_sd15_dir, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15_dir, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(tiny_sd15_dir, subfolder="scheduler")
    batch = seen["batch"]
    with torch.no_grad():
        dist = vae.encode(batch["pixel_values"]).latent_dist
        generator = torch.Generator().manual_seed(config.seed + SEED_SALT + seen["number"])
        latents = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)) \
            * vae.config.scaling_factor
        ids = tokenizer(batch["caption"], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        text = encoder(ids).last_hidden_state
        losses = []
        for k, t in enumerate(seen["timesteps"]):
            seed = (config.seed * 1_000_003 + 0 * VALIDATION_TIMESTEPS + k + SEED_SALT) % (1 << 63)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
            timesteps = t.expand(1)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, text).sample
            losses.append(((prediction - noise) ** 2).mean())
    assert measured == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)
    # the timesteps are spread over the run's (uniform) distribution
    assert seen["timesteps"].tolist() == sorted(seen["timesteps"].tolist())
    assert 50 < seen["timesteps"][0] < 250 and 750 < seen["timesteps"][-1] < 950


def test_the_job_record_keeps_the_best_validation_and_an_older_database_upgrades(tmp_path):
    """A job database of schema 1 (without the validation columns) opens as it is, its jobs
    kept, and gains the columns; a validation event writes the best loss and its step."""
    import sqlite3

    from trainer.jobs import store as store_module
    from trainer.jobs.queue import JobQueue
    from trainer.jobs.store import JobStore
    old_schema = store_module.SCHEMA.replace("    best_validation_loss REAL,\n", "").replace(
        "    best_validation_step INTEGER,\n", "")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    conn = sqlite3.connect(workspace / store_module.DB_NAME)
    conn.execute(f"PRAGMA application_id={store_module.APPLICATION_ID}")
    conn.executescript(old_schema)
    conn.execute("INSERT INTO jobs (owner, status, position, config, created_at) VALUES "
                 "('', 'finished', 1, '{}', 1.0)")
    conn.commit(), conn.close()
    store = JobStore(workspace)
    assert store.notice == "" and [j.id for j in store.all()] == [1]
    queue = JobQueue.__new__(JobQueue)
    queue.store = store
    queue._record_event(1, {"type": "validation", "step": 6, "epoch": 2,
                            "values": {"validation_loss": 0.25}, "best": (0.2, 4)})
    job = store.get(1)
    assert (job.best_validation_loss, job.best_validation_step) == (0.2, 4)


def test_two_processes_measure_the_same_number_as_one(tiny_sd15_dir, tmp_path):
    """Under `accelerate launch` (2 CPU processes) each process measures every other batch and
    the sums are reduced: the same validation loss as one process. The weights must be the
    same in both runs for that, so they never move here (black masks on the trained images);
    the validation images have no masks."""
    import json

    from test_cli import launch_two_processes, write_config
    held = unmasked_copy(tmp_path, ("cat", "coffee", "rocket"))
    settings = dict(batch_size=1, epochs=1, validation=True, **BLACK_MASKS,
                    text_encoder={"train": False},
                    concepts=[{"path": str(black_masked_folder(tmp_path))},
                              {"path": str(held), "type": "VALIDATION"}])
    measured = {}
    for processes in (1, 2):
        folder = tmp_path / str(processes)
        folder.mkdir()
        config = write_config(folder, tiny_sd15_dir, **settings)
        if processes == 1:
            from trainer.config import load_config
            train(load_config(config, warn=lambda m: None))
        else:
            done = launch_two_processes(config, port=29581)
            assert done.returncode == 0, done.stderr[-3000:]
        records = [json.loads(line) for line in
                   (folder / "ws" / "metrics.jsonl").read_text().splitlines()]
        measured[processes] = [r["validation_loss"] for r in records if "validation_loss" in r]
    assert len(measured[1]) == 1
    assert measured[2] == pytest.approx(measured[1], rel=1e-9)


@pytest.mark.parametrize("family", ["sdxl", "flux", "chroma", "sd35", "z_image"])
def test_every_family_measures_it(family, request, tmp_path, monkeypatch):
    """The other families, with their own objectives (flow matching's timesteps and dynamic
    shift, SDXL's second encoder): the measurement is a finite number, the same twice."""
    from test_regularization import FAMILIES
    if family == "z_image":
        settings = {"base": request.getfixturevalue("tiny_z_image_dir"), "model_type": "Z_IMAGE",
                    "text_encoder": {"train": False}}
    else:
        settings = FAMILIES[family](request)
    spy = Spy(monkeypatch)
    config = tiny_config(settings.pop("base"), tmp_path, epochs=1, validation=True,
                         validation_split=0.4, output_model_format="DIFFUSERS_LORA", **settings)
    train(config)
    (record,) = validation_records(config)
    assert 0 < record["validation_loss"] < 100
    assert all(first == second for first, second in spy.measured)
