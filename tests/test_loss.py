"""Noise and loss options, each checked against its formula on crafted tensors: MSE / MAE /
Huber strengths, min-SNR weighting (ε and v), the v-prediction target, offset noise, the
timestep range; and one real tiny run down the v-prediction + Huber + min-SNR path."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler

from trainer.config import config_from_dict
from trainer.loss import (huber, min_snr_weight, pixel_loss, sample_noise, timestep_range,
                          training_target)


def test_mse_mae_and_huber_strengths_follow_their_formulas():
    target = torch.zeros(1, 2, 1, 3)
    pred = torch.tensor([[[[0.5, -2.0, 3.0]], [[-0.5, 2.0, 0.0]]]])
    e = pred - target
    delta = 1.0
    huber_expected = torch.where(e.abs() <= delta, 0.5 * e**2, delta * (e.abs() - 0.5 * delta))
    assert huber_expected[0, 0, 0].tolist() == [0.125, 1.5, 2.5]
    torch.testing.assert_close(huber(e, delta), huber_expected)
    mse = pixel_loss(pred, target, mse_strength=1, mae_strength=0)
    mae = pixel_loss(pred, target, mse_strength=0, mae_strength=1)
    hub = pixel_loss(pred, target, mse_strength=0, mae_strength=0, huber_strength=1,
                     huber_delta=delta)
    torch.testing.assert_close(mse, e.square().mean(dim=1, keepdim=True))  # channel mean
    torch.testing.assert_close(mae, e.abs().mean(dim=1, keepdim=True))
    torch.testing.assert_close(hub, huber_expected.mean(dim=1, keepdim=True))
    mixed = pixel_loss(pred, target, mse_strength=0.5, mae_strength=0.25, huber_strength=2,
                       huber_delta=delta)
    torch.testing.assert_close(mixed, 0.5 * mse + 0.25 * mae + 2 * hub)
    # A smaller delta turns the linear part on sooner: large errors weigh less than in MSE
    small = pixel_loss(pred, target, mse_strength=0, mae_strength=0, huber_strength=1,
                       huber_delta=0.1)
    assert torch.all(small <= hub)
    assert pixel_loss(pred, target, mse_strength=1, mae_strength=0, huber_strength=0,
                      huber_delta=0.3).equal(mse)


def test_min_snr_weight_for_epsilon_and_v_targets():
    alphas = torch.tensor([0.99, 0.5, 0.01])          # SNR 99, 1, 1/99
    snr = alphas / (1 - alphas)
    steps = torch.tensor([0, 1, 2])
    eps = min_snr_weight(steps, alphas, 5.0, v_prediction=False)
    v = min_snr_weight(steps, alphas, 5.0, v_prediction=True)
    torch.testing.assert_close(eps, torch.clamp(snr, max=5) / snr)
    torch.testing.assert_close(v, torch.clamp(snr, max=5) / (snr + 1))
    assert eps[0] == pytest.approx(5 / 99) and eps[1] == 1 and eps[2] == pytest.approx(1)
    assert v[1] == pytest.approx(0.5)


def test_v_prediction_target_is_the_velocity():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    a = scheduler.alphas_cumprod[t].sqrt().view(2, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(2, 1, 1, 1)
    torch.testing.assert_close(training_target(scheduler, latents, noise, t),
                               a * noise - s * latents)
    epsilon = DDPMScheduler(num_train_timesteps=1000)
    assert training_target(epsilon, latents, noise, t) is noise


def test_offset_noise_adds_one_value_per_sample_and_channel():
    shape = (64, 4, 8, 8)
    plain = sample_noise(shape, torch.Generator().manual_seed(3), "cpu", 0.0)
    offset = sample_noise(shape, torch.Generator().manual_seed(3), "cpu", 0.1)
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    shift = offset - plain
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand(shape))  # constant per image
    assert 0.07 < shift[:, :, 0, 0].std() < 0.13                          # N(0, 0.1²)


@pytest.mark.parametrize("low, high, expected", [
    (0.0, 1.0, (0, 1000)), (0.2, 0.6, (200, 600)), (0.5, 0.5, (500, 501)),
    (1.0, 1.0, (999, 1000)), (0.9, 0.3, (900, 901)),
])
def test_timestep_range_from_noising_strengths(low, high, expected):
    assert timestep_range(1000, low, high) == expected


def test_huber_settings_are_validated():
    config = config_from_dict({"huber_strength": 0.5, "huber_delta": 0.2})
    assert config.huber_strength == 0.5 and config.huber_delta == 0.2
    with pytest.raises(Exception, match="huber_delta"):
        config_from_dict({"huber_delta": 0})


def test_v_prediction_model_trains_with_huber_and_min_snr(tiny_sd15_dir, tmp_path, monkeypatch):
    """A v-prediction copy of the tiny model: the loop trains it against the velocity."""
    import trainer.models.objectives
    from trainer.loop import train

    model = tmp_path / "v-model"
    shutil.copytree(tiny_sd15_dir, model)
    scheduler_config = model / "scheduler" / "scheduler_config.json"
    values = json.loads(scheduler_config.read_text())
    values["prediction_type"] = "v_prediction"
    scheduler_config.write_text(json.dumps(values))
    targets = []
    original = trainer.models.objectives.training_target

    def spy(scheduler, latents, noise, timesteps):
        target = original(scheduler, latents, noise, timesteps)
        targets.append(torch.allclose(target, scheduler.get_velocity(latents, noise, timesteps)))
        assert torch.all((timesteps >= 100) & (timesteps < 500))
        return target

    monkeypatch.setattr(trainer.models.objectives, "training_target", spy)
    from trainer.demo import DEMO_DATASET_DIR
    config = config_from_dict({
        "base_model_name": str(model), "workspace_dir": str(tmp_path / "ws"),
        "concepts": [{"path": str(DEMO_DATASET_DIR)}], "resolution": "64",
        "train_dtype": "FLOAT_32", "gradient_checkpointing": False,
        "learning_rate_warmup_steps": 0, "lora_rank": 4, "batch_size": 2, "epochs": 1,
        "mse_strength": 0.0, "huber_strength": 1.0, "huber_delta": 0.5, "min_snr_gamma": 5.0,
        "offset_noise_weight": 0.05, "min_noising_strength": 0.1, "max_noising_strength": 0.5})
    result = train(config)
    assert result.global_step == 3 and targets == [True] * 3
