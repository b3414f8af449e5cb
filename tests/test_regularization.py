"""Keeping what the base model knew (issue 28): PRIOR_PREDICTION concepts (the base model's own
prediction, adapters off, is the target), REGULARIZATION concepts (kohya's class images at
prior_loss_weight, balanced against the others) and masked prior preservation."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import read_metrics, tiny_config
from PIL import Image
from safetensors import safe_open

from trainer import limits
from trainer.batch_loss import BatchLoss
from trainer.config import ConfigError, check_supported
from trainer.data.dataset import ImageItem, epoch_indices
from trainer.demo import DEMO_DATASET_DIR
from trainer.loop import train
from trainer.loss import masked_prior_loss
from trainer.models.tiny_flow import tiny_flow_model
from trainer.regularization import regularization_epoch

SUBJECT = ("cat", "astronaut")  # the images learned; the other three are the "class"


def split_demo(tmp_path):
    """The demo dataset in two folders: the subject (cat, astronaut) and the rest."""
    folders = {"subject": tmp_path / "subject", "others": tmp_path / "others"}
    for folder in folders.values():
        folder.mkdir()
    for path in DEMO_DATASET_DIR.iterdir():
        stem = path.name.split("-")[0].split(".")[0]
        shutil.copy(path, folders["subject" if stem in SUBJECT else "others"] / path.name)
    return folders


def concepts(folders, other_type, repeats=1.0):
    return [{"path": str(folders["subject"])},
            {"path": str(folders["others"]), "type": other_type, "repeats": repeats}]


# --- the epoch: kohya's balance ---------------------------------------------------------------

def test_regularization_takes_as_many_as_the_others_in_turn():
    reg = [10, 11, 12, 13, 14]
    epochs = [regularization_epoch(reg, 3, seed=1, epoch=e) for e in range(5)]
    assert all(len(e) == 3 for e in epochs)
    seen = [i for e in epochs for i in e]
    assert sorted(seen[:5]) == reg                 # every one before any comes twice
    assert seen[5:10] == seen[:5]                  # then the same order again
    assert regularization_epoch(reg, 3, seed=1, epoch=2) == epochs[2]   # seeded
    assert regularization_epoch([], 3, seed=1, epoch=0) == []


def test_an_epoch_holds_as_many_regularization_images_as_others(tmp_path):
    items = [ImageItem(tmp_path / f"s{i}.png", "", None, 1.0, 0, repeats=3, size=(8, 8))
             for i in range(2)]
    items += [ImageItem(tmp_path / f"r{i}.png", "", None, 1.0, 1, repeats=7, size=(8, 8),
                        regularization=True) for i in range(10)]
    for epoch in range(3):
        chosen = epoch_indices(items, seed=5, epoch=epoch)
        regular = [i for i in chosen if items[i].regularization]
        assert len(chosen) == 12 and len(regular) == 6  # 2 images x 3 repeats, and 6 reg
    # the engine's step estimate (the LR curve, a server's limits) counts the same
    config = tiny_config(tmp_path, tmp_path, concepts=[
        {"path": str(DEMO_DATASET_DIR), "repeats": 3},
        {"path": str(DEMO_DATASET_DIR), "type": "REGULARIZATION", "repeats": 7}])
    assert limits.epoch_images(config.concepts) == 2 * 15


def test_regularization_rows_weigh_prior_loss_weight_times_their_concept_weight(tmp_path):
    config = tiny_config(tmp_path, tmp_path, prior_loss_weight=0.25, concepts=[
        {"path": str(DEMO_DATASET_DIR), "loss_weight": 2.0},
        {"path": str(DEMO_DATASET_DIR), "type": "REGULARIZATION", "loss_weight": 3.0}])
    loss = BatchLoss(config, None, None, torch.device("cpu"), torch.Generator())
    batch = {"concept_index": [1, 0, 1], "loss_weight": torch.tensor([3.0, 2.0, 3.0])}
    assert loss.sample_weights(batch).tolist() == [0.75, 2.0, 0.75]
    assert batch["loss_weight"].tolist() == [3.0, 2.0, 3.0]  # the batch's own is untouched


# --- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"training_method": "FINE_TUNE",
      "concepts": [{"path": "x"}, {"path": "y", "type": "PRIOR_PREDICTION"}]},
     "concepts[1].type = PRIOR_PREDICTION needs a LoRA"),
    ({"masked_prior_preservation_weight": 0.5},
     "masked_prior_preservation_weight holds the area outside each mask"),
    ({"training_method": "EMBEDDING", "masked_training": True,
      "masked_prior_preservation_weight": 0.5},
     "masked_prior_preservation_weight needs a LoRA"),
    ({"concepts": [{"path": "x", "type": "REGULARIZATION"}]},
     "every enabled concept is a REGULARIZATION one"),
])
def test_settings_without_meaning_are_refused_by_key(tmp_path, overrides, message):
    config = tiny_config(tmp_path, tmp_path, **overrides)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_supported(config)


# --- masked prior preservation, by hand ---------------------------------------------------------

def test_masked_prior_loss_weights_the_area_outside_the_mask():
    per_pixel = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.05]]]])
    # outside = 1 - clamp(mask, 0.1, 1) = [0, 0.9, 0.5, 0.9]
    plain = masked_prior_loss(per_pixel, mask, unmasked_weight=0.1, normalize=False, weight=2)
    assert plain.tolist() == pytest.approx([2 * (0 + 1.8 + 1.5 + 3.6) / 4])
    normal = masked_prior_loss(per_pixel, mask, unmasked_weight=0.1, normalize=True, weight=2)
    assert normal.tolist() == pytest.approx([2 * (0 + 1.8 + 1.5 + 3.6) / 4 / (2.3 / 4)])
    inside = masked_prior_loss(per_pixel, torch.ones_like(mask), unmasked_weight=0.1,
                               normalize=True, weight=2)
    assert inside.tolist() == [0.0]


# --- the engine ----------------------------------------------------------------------------------

FAMILIES = {  # every family, with its text encoders' adapters where it trains them
    "sd15": lambda request: {"base": request.getfixturevalue("tiny_sd15_dir")},
    "sdxl": lambda request: {"base": request.getfixturevalue("tiny_sdxl_dir"),
                             "model_type": "STABLE_DIFFUSION_XL_10_BASE",
                             "text_encoder_2": {"train": True,
                                                "stop_training_after_unit": "NEVER"}},
    "flux": lambda request: {"base": tiny_flow_model("flux"), "model_type": "FLUX_DEV_1"},
    "chroma": lambda request: {"base": tiny_flow_model("chroma"), "model_type": "CHROMA_1",
                               "text_encoder": {"train": False}},
    "sd35": lambda request: {"base": tiny_flow_model("sd35"),
                             "model_type": "STABLE_DIFFUSION_35"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_prior_prediction_at_a_zero_lora_is_exactly_zero(family, request, tmp_path):
    """Only prior images: the target is the model's own prediction with the adapters off,
    which a LoRA that starts at zero reproduces exactly, so nothing is ever learned."""
    settings = FAMILIES[family](request)
    config = tiny_config(settings.pop("base"), tmp_path, epochs=2,
                         output_model_format="DIFFUSERS_LORA", **settings,
                         concepts=[{"path": str(DEMO_DATASET_DIR), "type": "PRIOR_PREDICTION"}])
    result = train(config)
    assert [r["loss"] for r in read_metrics(config)] == [0.0] * result.global_step
    with safe_open(result.output_path, "pt") as f:
        ups = [f.get_tensor(k) for k in f.keys() if "lora_B" in k or "lora_up" in k]
    assert ups and all(not u.any() for u in ups)


class Recorder:
    """Records what the batch loss computes at each step (its inputs to the error and its
    result), through spies on the engine's own functions."""

    def __init__(self, monkeypatch):
        import trainer.batch_loss as module
        self.steps: list[dict] = []
        real_call, real_prior = BatchLoss.__call__, BatchLoss.prior_prediction
        real_pixel, real_mask = module.pixel_loss, BatchLoss.loss_mask

        def call(loss_self, batch, grad):
            self.steps.append({"batch": batch, "errors": []})
            out = real_call(loss_self, batch, grad)
            self.steps[-1]["loss"] = out.detach()
            return out

        def prior(loss_self, *args):
            out = real_prior(loss_self, *args)
            self.steps[-1]["prior"] = out.detach().clone()
            return out

        def pixel(prediction, target, **kwargs):
            self.steps[-1]["errors"].append((prediction.detach().clone(),
                                             target.detach().clone()))
            return real_pixel(prediction, target, **kwargs)

        def mask(loss_self, *args):
            out = real_mask(loss_self, *args)
            self.steps[-1]["mask"] = out
            return out

        monkeypatch.setattr(BatchLoss, "__call__", call)
        monkeypatch.setattr(BatchLoss, "prior_prediction", prior)
        monkeypatch.setattr(module, "pixel_loss", pixel)
        monkeypatch.setattr(BatchLoss, "loss_mask", mask)


def test_batch_loss_equals_a_hand_computation(tiny_sd15_dir, tmp_path, monkeypatch):
    """Standard and prior rows in one batch, masks, masked prior preservation: at a step where
    the LoRA is no longer zero, the engine's loss is the formula computed here from the
    prediction, the noise target and the base model's prediction."""
    folders = split_demo(tmp_path)
    record = Recorder(monkeypatch)
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=3, batch_size=4,
                         concepts=concepts(folders, "PRIOR_PREDICTION"),
                         masked_training=True, unmasked_probability=0.0, unmasked_weight=0.2,
                         masked_prior_preservation_weight=0.5, aspect_ratio_bucketing=False)
    train(config)
    step = next(s for s in reversed(record.steps[1:])  # after the first update
                if set(s["batch"]["concept_index"]) == {0, 1})
    (prediction, target), (_, prior) = step["errors"]
    assert torch.equal(prior, step["prior"])
    rows = [i for i, c in enumerate(step["batch"]["concept_index"]) if c == 1]
    others = [i for i in range(prediction.shape[0]) if i not in rows]
    assert rows and others
    assert torch.equal(target[rows], prior[rows])          # prior rows: the base's prediction
    assert not torch.allclose(target[others], prior[others])  # standard rows: the noise
    assert not torch.allclose(prediction, prior)           # the LoRA has moved
    inside = step["mask"].clamp(min=0.2)
    main = ((prediction - target) ** 2).mean(1, keepdim=True)
    held = ((prediction - prior) ** 2).mean(1, keepdim=True)
    expected = ((main * inside).mean((1, 2, 3)) + 0.5 * (held * (1 - inside)).mean((1, 2, 3)))
    assert step["loss"].item() == pytest.approx(expected.mean().item(), rel=1e-5)


def render_after(config):
    """The run's sample at its last step, as an int array."""
    events = []
    from trainer.control import Control
    train(config, Control(on_event=events.append))
    path = [e for e in events if e["type"] == "sample"][-1]["path"]
    return np.asarray(Image.open(path), dtype=np.int16)


PRIOR_REPEATS = 2.0


def render_base(model_dir, sample):
    """The base model's image of `sample`, drawn as the engine draws samples (DDIM)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(sample["prompt"], width=sample["width"], height=sample["height"],
                 num_inference_steps=sample["diffusion_steps"], guidance_scale=sample["cfg_scale"],
                 generator=torch.Generator("cpu").manual_seed(sample["seed"])).images[0]
    return np.asarray(image, dtype=np.int16)


def test_prior_concept_keeps_the_base_model_on_held_out_prompts(tiny_sd15_dir, tmp_path):
    """The same LoRA run with and without the other images as a PRIOR_PREDICTION concept:
    the sample of a prompt of that class moves away from the base model's image less with
    them, their images seen twice an epoch. (Measured: 0.53 of the change without them; 0.77
    with the images seen once.)"""
    folders = split_demo(tmp_path)
    sample = {"prompt": "a photo of a dog", "seed": 3, "width": 64, "height": 64,
              "diffusion_steps": 4, "cfg_scale": 3.0}
    common = dict(epochs=6, samples=[sample], sample_after=6, sample_after_unit="EPOCH")
    base = render_base(tiny_sd15_dir, sample)
    alone = render_after(tiny_config(tiny_sd15_dir, tmp_path / "alone",
                                     concepts=[{"path": str(folders["subject"])}], **common))
    kept = render_after(tiny_config(tiny_sd15_dir, tmp_path / "kept",
                                    concepts=concepts(folders, "PRIOR_PREDICTION", PRIOR_REPEATS),
                                    **common))
    moved_alone = np.abs(alone - base).mean()
    moved_kept = np.abs(kept - base).mean()
    print(f"held-out change: alone {moved_alone:.2f}, with prior {moved_kept:.2f}, "
          f"ratio {moved_kept / moved_alone:.2f}")
    assert moved_alone > 2
    assert moved_kept < 0.7 * moved_alone


def test_regularization_concept_trains_at_its_weight(tiny_sd15_dir, tmp_path, monkeypatch):
    """A REGULARIZATION concept's rows reach the loss at prior_loss_weight: with weight 0 the
    run is the standard images' loss alone (each batch's mean over all its rows)."""
    folders = split_demo(tmp_path)
    record = Recorder(monkeypatch)
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, batch_size=4,
                         concepts=concepts(folders, "REGULARIZATION"), prior_loss_weight=0.0,
                         aspect_ratio_bucketing=False)
    result = train(config)
    assert result.global_step == 1  # 2 subject images and 2 of the others: one batch of 4
    step = record.steps[0]
    assert sorted(step["batch"]["concept_index"]) == [0, 0, 1, 1]
    (prediction, target), = step["errors"]
    errors = ((prediction - target) ** 2).mean((1, 2, 3))
    standard = torch.tensor([c == 0 for c in step["batch"]["concept_index"]])
    assert step["loss"].item() == pytest.approx((errors * standard).mean().item(), rel=1e-5)


# --- OneTrainer's files ---------------------------------------------------------------------------

def test_onetrainer_prior_prediction_and_masked_preservation_import(tmp_path):
    """OneTrainer's Export (its own code wrote it) of a LoRA with a PRIOR_PREDICTION concept and
    masked prior preservation 0.5: both mean here what they meant there."""
    from onetrainer_files import path
    from trainer.config import load_config
    config = load_config(path("sd15_lora_prior_prediction.exported"), warn=lambda m: None)
    assert [c.type.value for c in config.concepts] == ["STANDARD", "PRIOR_PREDICTION"]
    assert config.masked_training and config.masked_prior_preservation_weight == 0.5
    check_supported(config)


def test_onetrainer_masked_preservation_it_ignored_is_left_out_with_a_note(tmp_path):
    """OneTrainer applies the weight only with masked training on: the same Export with masked
    training switched off (the one change) imports without it, saying so."""
    import json

    from onetrainer_files import raw
    from trainer.config import load_config
    data = raw("sd15_lora_prior_prediction.exported")
    data["masked_training"] = False
    (tmp_path / "c.json").write_text(json.dumps(data))
    notes: list[str] = []
    config = load_config(tmp_path / "c.json", warn=notes.append)
    assert config.masked_prior_preservation_weight == 0.0
    assert any("masked_prior_preservation_weight 0.5: OneTrainer uses it only" in n for n in notes)
