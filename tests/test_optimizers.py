"""Optimizers, their schemas and per-optimizer memory; custom schedules; EMA; dtypes."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from trainer.config import ConfigError, Optimizer, check_supported, config_from_dict
from trainer.control import Control
from trainer.ema import WeightEMA
from trainer.loop import train
from trainer.optim.registry import (SCHEMAS, build_optimizer, optimizer_schema,
                                    resolve_parameters, restore_defaults, switch_optimizer)
from trainer.optim.schedules import lr_curve
from helpers import read_metrics, tiny_config

# Learning rates that move the tiny model in a few dozen steps, per optimizer.
LEARNING_RATES = {"ADAMW": 1e-2, "ADAMW_8BIT": 1e-2, "PRODIGY": 1.0, "ADAFACTOR": 1e-2,
                  "LION": 1e-2, "SGD": 5.0}


def test_every_optimizer_has_a_schema_with_spec_defaults():
    assert set(SCHEMAS) == set(Optimizer)
    adamw = {p.name: p.default for p in optimizer_schema("ADAMW")}
    assert adamw == {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
                     "stochastic_rounding": False}
    bnb = {p.name: p.default for p in optimizer_schema("ADAMW_8BIT")}
    assert bnb["min_8bit_size"] == 4096
    prodigy = {p.name: p.default for p in optimizer_schema("PRODIGY")}
    assert prodigy == {"beta1": 0.9, "beta2": 0.999, "beta3": None, "eps": 1e-8,
                       "weight_decay": 0.0, "decouple": True, "use_bias_correction": False,
                       "safeguard_warmup": False, "d0": 1e-6, "d_coef": 1.0,
                       "growth_rate": math.inf}
    adafactor = {p.name: p.default for p in optimizer_schema("ADAFACTOR")}
    assert adafactor == {"eps": 1e-30, "eps2": 1e-3, "clip_threshold": 1.0, "decay_rate": -0.8,
                         "beta1": None, "weight_decay": 0.0, "scale_parameter": False,
                         "relative_step": False, "warmup_init": False,
                         "stochastic_rounding": False}
    assert {p.name: p.default for p in optimizer_schema("LION")} == {
        "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0, "stochastic_rounding": False}
    assert {p.name: p.default for p in optimizer_schema("SGD")} == {
        "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "stochastic_rounding": False}
    for params in SCHEMAS.values():
        assert all(p.label and p.tooltip for p in params)


def test_config_declares_every_schema_parameter():
    from trainer.config import OPTIMIZER_PARAMETER_TYPES
    assert set(OPTIMIZER_PARAMETER_TYPES) == {p.name for ps in SCHEMAS.values() for p in ps}


@pytest.mark.parametrize("values, message", [
    ({"beta1": 1.0}, "optimizer.beta1: must be below 1"),
    ({"eps": -1}, "optimizer.eps: must be at least 0"),
    ({"weight_decay": "lots"}, "optimizer.weight_decay: must be a number"),
])
def test_invalid_parameter_names_it(values, message):
    with pytest.raises(ConfigError, match=message):
        resolve_parameters(Optimizer.ADAMW, values)
    with pytest.raises(ConfigError, match=message.split(":")[0]):
        check_supported(config_from_dict({"optimizer": {"optimizer": "ADAMW", **values}}))


@pytest.mark.parametrize("name", list(LEARNING_RATES))
def test_each_optimizer_takes_real_steps_and_lowers_the_loss(name, tiny_sd15_dir, tmp_path):
    """Overfit one image: a fixed caption and noise schedule make the loss trend visible."""
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=40, batch_size=5,
                         learning_rate=LEARNING_RATES[name], optimizer={"optimizer": name},
                         text_encoder={"train": False})
    train(config)
    losses = [r["loss"] for r in read_metrics(config)]
    first, last = np.mean(losses[:8]), np.mean(losses[-8:])
    assert last < 0.93 * first, (name, first, last)


def test_adamw_8bit_keeps_8bit_state_for_large_tensors():
    big = torch.nn.Parameter(torch.randn(128, 64))      # 8192 elements >= 4096
    small = torch.nn.Parameter(torch.randn(16, 16))     # 256 elements: 32-bit state
    opt = build_optimizer(Optimizer.ADAMW_8BIT, {}, [{"params": [big, small], "lr": 1e-3}])
    (big.sum() + small.sum()).backward()
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8
    assert opt.state[small]["state1"].dtype == torch.float32


def test_prodigy_reports_its_effective_step_size(tiny_sd15_dir, tmp_path):
    events = []
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, learning_rate=1.0,
                         optimizer={"optimizer": "PRODIGY"})
    train(config, Control(events.append))
    lrs = read_metrics(config)[-1]["lr"]
    assert 0 < lrs["unet"] < 1  # lr·d, d starting at d0 = 1e-6
    assert not [e for e in events if e["type"] == "warning" and "PRODIGY" in e["message"]]
    events.clear()
    train(tiny_config(tiny_sd15_dir, tmp_path / "b", epochs=1, learning_rate=1e-4,
                      optimizer={"optimizer": "PRODIGY"}), Control(events.append))
    assert any("set every learning rate to 1" in e.get("message", "") for e in events)


def test_adafactor_relative_step_sets_its_own_lr(tiny_sd15_dir, tmp_path):
    with pytest.raises(ConfigError, match="must be ADAFACTOR"):
        check_supported(config_from_dict({"optimizer": {"optimizer": "ADAFACTOR",
                                                        "relative_step": True}}))
    with pytest.raises(ConfigError, match="needs optimizer ADAFACTOR"):
        check_supported(config_from_dict({"learning_rate_scheduler": "ADAFACTOR"}))
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=1, learning_rate_scheduler="ADAFACTOR",
                         optimizer={"optimizer": "ADAFACTOR", "relative_step": True,
                                    "warmup_init": True})
    train(config)
    lrs = [r["lr"]["unet"] for r in read_metrics(config)]
    assert all(0 < lr < 1e-3 for lr in lrs) and lrs[-1] > lrs[0]  # Adafactor's warmup


def test_switching_optimizers_keeps_each_ones_edits_and_round_trips_a_preset():
    section, remembered = {"optimizer": "ADAMW", "beta1": 0.8}, {}
    section, remembered = switch_optimizer(section, remembered, "PRODIGY")
    assert section == {"optimizer": "PRODIGY"}
    section["d_coef"] = 0.5
    section, remembered = switch_optimizer(section, remembered, "ADAMW")
    assert section == {"optimizer": "ADAMW", "beta1": 0.8}
    section, remembered = switch_optimizer(section, remembered, "PRODIGY")
    assert section == {"optimizer": "PRODIGY", "d_coef": 0.5}

    config = config_from_dict({"optimizer": section, "optimizer_defaults": remembered})
    again = config_from_dict(json.loads(config.to_json()))
    assert again.optimizer.d_coef == 0.5 and again.optimizer_defaults["ADAMW"] == {"beta1": 0.8}
    assert restore_defaults({"optimizer": "PRODIGY", "d_coef": 0.5})["d_coef"] == 1.0


# --- CUSTOM schedule ------------------------------------------------------------------------

def custom_config(**extra):
    return config_from_dict({
        "learning_rate": 0.1, "epochs": 4, "learning_rate_scheduler": "CUSTOM",
        "custom_learning_rate_scheduler": "torch.optim.lr_scheduler.StepLR",
        "scheduler_params": [{"key": "step_size", "value": "%STEPS_PER_EPOCH%"},
                             {"key": "gamma", "value": "0.5"}], **extra})


def test_custom_schedule_loads_the_class_with_substitutions():
    curve = lr_curve(custom_config(), 12, steps_per_epoch=3, allow_custom_code=True)
    assert curve == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.0125] * 3)


def test_custom_schedule_is_refused_when_custom_code_is_off(tiny_sd15_dir, tmp_path):
    with pytest.raises(ConfigError, match="disabled on this server"):
        lr_curve(custom_config(), 12, steps_per_epoch=3, allow_custom_code=False)
    config = tiny_config(tiny_sd15_dir, tmp_path, learning_rate_scheduler="CUSTOM",
                         custom_learning_rate_scheduler="torch.optim.lr_scheduler.StepLR",
                         scheduler_params=[{"key": "step_size", "value": "2"}])
    with pytest.raises(ConfigError, match="disabled on this server"):
        train(config)


def test_custom_schedule_drives_training(tiny_sd15_dir, tmp_path):
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, learning_rate=1e-3,
                         learning_rate_scheduler="CUSTOM",
                         custom_learning_rate_scheduler="torch.optim.lr_scheduler.StepLR",
                         scheduler_params=[{"key": "step_size", "value": "%STEPS_PER_EPOCH%"},
                                           {"key": "gamma", "value": "0.1"}])
    train(config, allow_custom_code=True)
    lrs = [r["lr"]["unet"] for r in read_metrics(config)]
    assert lrs == pytest.approx([1e-3] * 3 + [1e-4] * 3)


@pytest.mark.parametrize("name, message", [
    ("nope.Missing", "module 'nope' cannot be imported"),
    ("torch.optim.lr_scheduler.Missing", "has no 'Missing'"),
])
def test_custom_schedule_bad_class_is_named(name, message):
    with pytest.raises(ConfigError, match=message):
        lr_curve(custom_config(custom_learning_rate_scheduler=name), 4, allow_custom_code=True)


# --- accumulation ---------------------------------------------------------------------------

def test_accumulation_divides_the_step_count(tiny_sd15_dir, tmp_path):
    """5 images at batch 1 = 5 batches an epoch; accumulating 2 = 3 updates (the last one of
    a single batch), and the LR schedule counts updates."""
    config = tiny_config(tiny_sd15_dir, tmp_path, epochs=2, batch_size=1,
                         gradient_accumulation_steps=2, learning_rate_scheduler="LINEAR")
    result = train(config)
    records = read_metrics(config)
    assert result.global_step == 6 and len(records) == 6
    lrs = [r["lr"]["unet"] for r in records]
    assert lrs == pytest.approx([1e-2 * (6 - s) / 6 for s in range(6)])


# --- EMA ------------------------------------------------------------------------------------

def test_ema_equals_a_hand_computed_average():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = WeightEMA([param], decay=0.9, device="cpu")
    expected = torch.zeros(3)
    for step, value in [(1, 1.0), (2, 2.0), (10, 4.0), (100, 8.0)]:
        with torch.no_grad():
            param.fill_(value)
        ema.update(step)
        d = min((1 + step) / (10 + step), 0.9)
        expected = d * expected + (1 - d) * value
        assert torch.allclose(ema.shadow[0], expected)
    with ema.applied():
        assert torch.allclose(param.detach(), expected)
    assert torch.equal(param.detach(), torch.full((3,), 8.0))  # trained weights restored


def test_saved_lora_holds_the_ema_weights(tiny_sd15_dir, tmp_path):
    plain = train(tiny_config(tiny_sd15_dir, tmp_path / "a", epochs=2))
    averaged = train(tiny_config(tiny_sd15_dir, tmp_path / "b", epochs=2, ema="CPU",
                                 ema_decay=0.99, ema_update_step_interval=1))
    with safe_open(plain.output_path, "pt") as fa, safe_open(averaged.output_path, "pt") as fb:
        ups = [k for k in fa.keys() if k.endswith("lora_up.weight")]
        # same run, same trained weights; the EMA file holds a lagging average: smaller ups
        norm_a = sum(fa.get_tensor(k).norm() for k in ups)
        norm_b = sum(fb.get_tensor(k).norm() for k in ups)
        assert 0 < norm_b < norm_a


# --- train data types -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["FLOAT_32", "BFLOAT_16", "TFLOAT_32"])
def test_cpu_dtype_paths_run(dtype, tiny_sd15_dir, tmp_path):
    events = []
    result = train(tiny_config(tiny_sd15_dir, tmp_path, epochs=1, train_dtype=dtype),
                   Control(events.append))
    assert result.global_step == 3
    if dtype == "TFLOAT_32" and not torch.cuda.is_available():
        assert any("FLOAT_32 on the CPU" in e.get("message", "") for e in events)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FLOAT_16 autocast with gradient "
                    "scaling needs a CUDA GPU; this machine has none")
@pytest.mark.parametrize("dtype", ["FLOAT_16", "BFLOAT_16", "TFLOAT_32"])
def test_cuda_dtype_paths_run(dtype, tiny_sd15_dir, tmp_path):
    result = train(tiny_config(tiny_sd15_dir, tmp_path, epochs=1, train_dtype=dtype,
                               weight_dtype="FLOAT_16" if dtype == "FLOAT_16" else "FLOAT_32"))
    assert result.global_step == 3


@pytest.mark.parametrize("scale", [1e-4, 10.0], ids=["under-the-limit", "clipped"])
def test_cpu_clipping_gives_torchs_gradients_bit_for_bit(scale):
    from accelerate import Accelerator

    from trainer.optim.clipping import clip_gradients
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(4, 32), (32, 4), (7,)] * 5]
    grads = [torch.randn(p.shape) * scale for p in params]
    reference = [g.clone() for g in grads]
    torch.nn.utils.clip_grad_norm_([torch.nn.Parameter(torch.zeros(1))], 1.0)  # warm
    expected_params = [torch.nn.Parameter(torch.zeros(p.shape)) for p in params]
    for p, g in zip(expected_params, reference):
        p.grad = g
    expected_norm = torch.nn.utils.clip_grad_norm_(expected_params, 1.0)
    for p, g in zip(params, grads):
        p.grad = g
    norm = clip_gradients(Accelerator(cpu=True), params, 1.0)
    assert torch.equal(norm, expected_norm)
    for p, q in zip(params, expected_params):
        assert torch.equal(p.grad, q.grad)
    total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert float(total) <= 1.0 + 1e-5
