"""Backups, exact resume, rolling count, crash safety, NaN stop; no pickle (issue 23)."""
import copy
import json
import math
import struct
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import trainer.backup
import trainer.loop
from trainer.backup import list_backups, read_backup
from trainer.config import Optimizer, TimeUnit
from trainer.errors import ConfigError, TrainingError
from trainer.loop import train
from trainer.optim.registry import build_optimizer
from trainer.state_files import StateFileError, read_state, write_state

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
    real_write = trainer.backup.write_state

    def failing_write(folder, name, tree):
        real_write(folder, name, tree)  # the file is written, then the disk fills up
        if "step-4" in str(folder) and name == "state":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.backup, "write_state", failing_write)
    with pytest.raises(TrainingError, match="No space left on device"):
        train(config)
    monkeypatch.setattr(trainer.backup, "write_state", real_write)
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


# --- no pickle: the state files (issue 23) ---------------------------------------------------

def same_tree(a, b, where="(top)"):
    """Equal values of equal types all the way down; tensors equal bit for bit."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            same_tree(x, y, f"{where}/{index}")
    elif isinstance(a, float):
        assert struct.pack(">d", a) == struct.pack(">d", b), (where, a, b)  # nan, -0.0 too
    else:
        assert a == b, (where, a, b)


def optimizer_after_steps(name, steps, params=None):
    """Two parameter groups (one big enough for 8-bit state), `steps` updates with fixed
    gradients."""
    torch.manual_seed(0)
    params = params or [torch.nn.Parameter(torch.randn(64, 80)),
                        torch.nn.Parameter(torch.randn(8))]
    values = {"momentum": 0.9} if name == Optimizer.SGD else {}
    optimizer = build_optimizer(name, values, [
        {"params": [params[0]], "lr": 1e-2, "name": "unet"},
        {"params": [params[1]], "lr": 1e-2, "name": "text_encoder"}])
    for step in range(steps):
        for index, param in enumerate(params):
            param.grad = torch.sin(torch.arange(param.numel()) * (step + index + 1.0)
                                   ).reshape(param.shape)
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize("name", list(Optimizer), ids=lambda o: o.value)
def test_every_optimizers_state_comes_back_exactly_and_steps_on_the_same(name, tmp_path):
    optimizer, params = optimizer_after_steps(name, 2)
    saved = optimizer.state_dict()
    write_state(tmp_path, "optimizer", saved)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json",
                                                          "optimizer.safetensors"]
    loaded = read_state(tmp_path, "optimizer")
    same_tree(saved, loaded)  # tuples (betas, Adafactor's eps), None, bools, ints, tensors

    # a fresh optimizer on copies of the weights, given the state, takes the same next step
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh, _ = optimizer_after_steps(name, 0, copies)
    fresh.load_state_dict(loaded)
    for opt, weights in ((optimizer, params), (fresh, copies)):
        for index, param in enumerate(weights):
            param.grad = torch.cos(torch.arange(param.numel()) * (index + 1.0)
                                   ).reshape(param.shape)
        opt.step()
    for original, copy in zip(params, copies):
        assert torch.equal(original, copy)
    same_tree(optimizer.state_dict(), fresh.state_dict())


def test_values_json_cannot_hold_come_back_as_the_same_type_and_value(tmp_path):
    shared = torch.arange(4.0)
    tree = {
        "param_groups": [{"betas": (0.9, 0.999), "beta3": None, "growth_rate": math.inf,
                          "floor": -math.inf, "nan": math.nan, "zero": -0.0, "decouple": True,
                          "k": 3, "weight_sum": 0.125, "lr_max": -1.0, "train_mode": False,
                          "big": 2 ** 70, "params": [0, 1]}],
        "state": {0: {"z": torch.ones(2, 3, dtype=torch.bfloat16), "step": torch.tensor(3.0)},
                  1: {"mask": torch.tensor([True, False]), "empty": torch.empty(0, 2),
                      "strided": torch.arange(6).reshape(2, 3).t()}},
        "milestones": Counter({30: 1, 80: 2}), "ordered": OrderedDict(b=1, a=2),
        "keys": {(1, 2): "tuple key", None: "none key", 1.5: "float key"},
        "$t": "a key that looks like the format's tag",
        "numpy": [np.float32(0.1), np.int64(-3), np.uint8(255), np.bool_(True)],
        "dtype": torch.float16, "size": torch.Size([2, 3]),
        "aliases": [shared, shared],
    }
    write_state(tmp_path, "state", tree)
    loaded = read_state(tmp_path, "state")
    same_tree(tree, loaded)
    assert loaded["aliases"][0] is loaded["aliases"][1]  # stored once, one tensor again
    # the tensors file is an ordinary safetensors file with flattened keys
    with safe_open(tmp_path / "state.safetensors", "pt") as f:
        assert {"state/0/z", "state/1/strided", "aliases/0"} <= set(f.keys())
        assert torch.equal(f.get_tensor("state/1/strided"), tree["state"][1]["strided"])


def test_torch_lr_schedulers_resume_from_their_state(tmp_path):
    """A CUSTOM schedule's state: MultiStepLR keeps a Counter, ReduceLROnPlateau inf,
    SequentialLR the states of its schedulers."""
    def build(kind):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = torch.optim.lr_scheduler
        return optimizer, {
            "multistep": lambda: sched.MultiStepLR(optimizer, [2, 4, 4], gamma=0.5),
            "plateau": lambda: sched.ReduceLROnPlateau(optimizer, patience=0),
            "onecycle": lambda: sched.OneCycleLR(optimizer, max_lr=1.0, total_steps=20),
            "sequential": lambda: sched.SequentialLR(optimizer, [
                sched.LinearLR(optimizer, 0.1, total_iters=3),
                sched.CosineAnnealingWarmRestarts(optimizer, 3)], milestones=[3]),
        }[kind]()

    for kind in ("multistep", "plateau", "onecycle", "sequential"):
        runs = []
        for resumed in (False, True):
            optimizer, scheduler = build(kind)
            lrs = []
            for step in range(8):
                if resumed and step == 4:  # continue from the files, as the loop does
                    write_state(tmp_path, kind, {"optimizer": optimizer.state_dict(),
                                                 "schedule": scheduler.state_dict()})
                    optimizer, scheduler = build(kind)
                    saved = read_state(tmp_path, kind)
                    optimizer.load_state_dict(saved["optimizer"])
                    scheduler.load_state_dict(saved["schedule"])
                optimizer.step()
                scheduler.step(*([1.0] if kind == "plateau" else []))
                lrs.append(optimizer.param_groups[0]["lr"])
            runs.append(lrs)
        assert runs[0] == runs[1], kind


def test_a_state_without_a_safe_file_form_is_refused_naming_where(tmp_path):
    class Handle:
        pass

    with pytest.raises(StateFileError, match=r"'schedule/custom/fn' holds a .*Handle"):
        write_state(tmp_path, "state", {"schedule": {"custom": {"fn": Handle()}}})


def test_a_backup_that_cannot_be_stored_fails_cleanly_and_keeps_the_last(tiny_sd15_dir,
                                                                         tmp_path, monkeypatch):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, backup_after=2,
                         backup_after_unit="STEP")
    real_write_backup = trainer.loop.write_backup

    def with_an_object(config, *, step, extra_state, **kwargs):
        if step == 4:
            extra_state = {**extra_state, "schedule": {"custom": {"fn": print}}}
        return real_write_backup(config, step=step, extra_state=extra_state, **kwargs)

    monkeypatch.setattr(trainer.loop, "write_backup", with_an_object)
    with pytest.raises(TrainingError, match=r"Could not write the backup .*step-4: "
                                            r"'schedule/custom/fn' holds a builtins"):
        train(config)
    root = tmp_path / "ws" / "backup"
    assert [b.name for b in list_backups(root)] == ["step-2"] and not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("extra", [
    {"optimizer": {"optimizer": "PRODIGY"}, "learning_rate": 1.0, "ema": "CPU",
     "ema_update_step_interval": 1},
    {"optimizer": {"optimizer": "ADAFACTOR", "beta1": 0.9}, "ema": "CPU",
     "ema_update_step_interval": 1, "learning_rate_scheduler": "COSINE"},
], ids=["prodigy-ema", "adafactor-ema-cosine"])
def test_a_resumed_run_gets_back_exactly_the_state_it_stopped_with(extra, tiny_sd15_dir,
                                                                   tmp_path, monkeypatch):
    """Optimizers whose state is more than tensors: the backup holds no pickle, what resume
    reads is what the run held (optimizer, schedule, EMA, RNG, smoothed loss), and the run
    ends where an uninterrupted one does."""
    reference = train(tiny_config(tiny_sd15_dir, tmp_path / "whole", epochs=3,
                                  backup_after_unit="NEVER", **extra))
    held = {}
    real_write_backup = trainer.loop.write_backup

    def recording(config, **kwargs):
        held.update(copy.deepcopy({"optimizer": kwargs["optimizer_state"],
                                   "extra": kwargs["extra_state"]}))
        return real_write_backup(config, **kwargs)

    monkeypatch.setattr(trainer.loop, "write_backup", recording)
    parts = tiny_config(tiny_sd15_dir, tmp_path / "parts", epochs=3, backup_after_unit="NEVER",
                        **extra)
    assert train(parts, stop_at(4)).global_step == 4
    monkeypatch.setattr(trainer.loop, "write_backup", real_write_backup)
    folder = tmp_path / "parts" / "ws" / "backup" / "step-4"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "optimizer.json", "optimizer.safetensors", "progress.json",
        "state.json", "state.safetensors", "weights.safetensors"]
    saved = read_backup(folder, parts)
    same_tree(held["optimizer"], saved["optimizer"])
    same_tree(held["extra"], saved["extra"])  # schedule, EMA shadows, RNG states, smoothing
    assert saved["extra"]["ema"]["shadow"] and saved["extra"]["rng"]["generators"]
    assert saved["progress"]["step"] == 4

    resumed = train(parts.model_copy(update={"continue_last_backup": True}))
    assert resumed.global_step == reference.global_step
    assert [r["step"] for r in read_metrics(parts)] == list(range(1, reference.global_step + 1))
    a, b = weights(reference.output_path), weights(resumed.output_path)
    assert a.keys() == b.keys() and all(same_trained(a[k], b[k]) for k in a)


def planted_pickle(path, marker):
    """A torch.save file whose unpickling writes `marker` (what an attacker would plant)."""
    class Payload:
        def __reduce__(self):
            return (Path.write_text, (Path(marker), "code ran"))

    torch.save({"schedule": {"custom": None}, "ema": None, "rng": Payload(), "smooth": [0, 0]},
               path)


def test_the_planted_payload_really_runs_code_when_unpickled(tmp_path):
    """The check the two tests below rely on: unpickling the planted file runs its code."""
    planted_pickle(tmp_path / "state.pt", tmp_path / "marker")
    torch.load(tmp_path / "state.pt", weights_only=False)
    assert (tmp_path / "marker").read_text() == "code ran"


def to_old_format(folder):
    """Rewrite a backup as older versions wrote it: optimizer.pt and state.pt (torch.save)."""
    for name in ("optimizer", "state"):
        torch.save(read_state(folder, name), folder / f"{name}.pt")
        (folder / f"{name}.json").unlink()
        (folder / f"{name}.safetensors").unlink()


def test_a_planted_state_pt_is_never_unpickled(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, backup_after_unit="NEVER")
    assert train(config, stop_at(3)).global_step == 3
    folder = tmp_path / "ws" / "backup" / "step-3"
    marker = tmp_path / "marker"
    again = config.model_copy(update={"continue_last_backup": True})

    # beside a backup of today's format: ignored, the run continues from the safe files
    planted_pickle(folder / "state.pt", marker)
    planted_pickle(folder / "optimizer.pt", marker)
    assert train(again, stop_at(4)).global_step == 4
    assert not marker.exists()

    # as the state of an older-format backup: refused with the reason, nothing runs
    folder = tmp_path / "ws" / "backup" / "step-4"
    to_old_format(folder)
    planted_pickle(folder / "state.pt", marker)
    with pytest.raises(ConfigError) as refused:
        train(again)
    assert not marker.exists()
    message = str(refused.value)
    assert f"Cannot continue from the backup {folder}: its state.pt" in message
    assert "is not unpickled because that could run code" in message
    assert "switch continue_last_backup off" in message and "Traceback" not in message


def test_an_older_backup_of_tensors_and_plain_values_still_resumes(tiny_sd15_dir, tmp_path):
    extra = {"ema": "CPU", "ema_update_step_interval": 1, "learning_rate_scheduler": "COSINE"}
    reference = train(tiny_config(tiny_sd15_dir, tmp_path / "whole", epochs=2,
                                  backup_after_unit="NEVER", **extra))
    parts = tiny_config(tiny_sd15_dir, tmp_path / "parts", epochs=2, backup_after_unit="NEVER",
                        **extra)
    train(parts, stop_at(4))
    folder = tmp_path / "parts" / "ws" / "backup" / "step-4"
    today = read_backup(folder, parts)
    to_old_format(folder)
    # older versions' RNG state had no numpy gauss entry
    old = torch.load(folder / "state.pt", weights_only=True)
    del old["rng"]["numpy_gauss"]
    torch.save(old, folder / "state.pt")
    older = read_backup(folder, parts)  # weights_only=True: tensors and plain values
    same_tree(today["optimizer"], older["optimizer"])
    same_tree(today["extra"]["ema"], older["extra"]["ema"])
    resumed = train(parts.model_copy(update={"continue_last_backup": True}))
    a, b = weights(reference.output_path), weights(resumed.output_path)
    assert resumed.global_step == reference.global_step
    assert a.keys() == b.keys() and all(same_trained(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "state.json").write_text("{not json"), "state.json cannot be read"),
    (lambda f: (f / "state.json").write_text(json.dumps({"format": "other"})),
     "state.json is not an Atelier training state"),
    (lambda f: (f / "optimizer.json").write_text(json.dumps(
        {"format": "atelier-training-state", "version": 1,
         "value": {"state": {"$t": "tensor", "key": "nowhere"}}})),
     "'state' refers to a tensor that optimizer.safetensors does not hold"),
    (lambda f: (f / "optimizer.json").write_text(json.dumps(
        {"format": "atelier-training-state", "version": 1,
         "value": {"x": {"$t": "object", "module": "os", "name": "system"}}})),
     "'x' is damaged"),
    (lambda f: (f / "state.safetensors").write_bytes(b"\x00" * 3), "state.safetensors cannot"),
    (lambda f: (f / "progress.json").write_text("[]"), "its progress.json is damaged"),
], ids=["json", "format", "missing-tensor", "unknown-tag", "tensors", "progress"])
def test_a_damaged_backup_is_refused_in_one_sentence(damage, reason, tmp_path):
    config = tiny_config(tmp_path / "model", tmp_path)
    folder = trainer.backup.write_backup(
        config, step=2, epoch=0, batches_done=2, weights={"unet/w": torch.ones(2)},
        optimizer_state={"state": {}, "param_groups": []},
        extra_state={"schedule": {"custom": None}, "ema": None, "smooth": [1.0, 2],
                     "rng": trainer.backup.capture_rng({})}, keep=None)
    assert read_backup(folder, config)["extra"]["smooth"] == [1.0, 2]
    damage(folder)
    with pytest.raises(ConfigError, match="Cannot continue from the backup") as refused:
        read_backup(folder, config)
    assert reason in str(refused.value) and "continue_last_backup off" in str(refused.value)


def test_rng_states_come_back_exactly_through_the_files(tmp_path):
    """python, numpy (with its cached gaussian: an odd count of normal draws leaves one),
    torch and a generator: the draws after a restore are the draws after the capture."""
    import random
    generator = torch.Generator().manual_seed(5)
    np.random.normal()
    write_state(tmp_path, "state", {"rng": trainer.backup.capture_rng({"noise": generator})})

    def draws():
        return (random.random(), np.random.normal(), torch.rand(3).tolist(),
                torch.rand(2, generator=generator).tolist())

    expected = draws()
    draws()  # move every stream on
    trainer.backup.restore_rng(read_state(tmp_path, "state")["rng"], {"noise": generator})
    assert draws() == expected
