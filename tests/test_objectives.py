"""The training objectives (trainer/models/objectives.py): the DDPM one is the engine's old
inline code, draw for draw; the registry and the families agree."""
import pytest
import torch
from diffusers import DDPMScheduler

from trainer.config import config_from_dict
from trainer.loss import min_snr_weight, timestep_range, training_target
from trainer.models import registry
from trainer.models.objectives import DDPMObjective


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_objective_draws_and_computes_what_the_loop_did(prediction_type):
    """Same generator, same draws, same tensors as the loop's code before the objective moved
    into the family: seeded SD 1.5 / SDXL runs are the same runs (bit for bit)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    config = config_from_dict({"min_snr_gamma": 5.0, "min_noising_strength": 0.1,
                               "max_noising_strength": 0.6})
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    old = torch.Generator().manual_seed(3)
    low, high = timestep_range(1000, 0.1, 0.6)
    timesteps = torch.randint(low, high, (3,), generator=old)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = training_target(scheduler, latents, noise, timesteps)
    weight = min_snr_weight(timesteps, scheduler.alphas_cumprod, 5.0,
                            prediction_type == "v_prediction")

    noised = DDPMObjective(scheduler, config).noised(latents, noise,
                                                     torch.Generator().manual_seed(3))
    assert torch.equal(noised.timesteps, timesteps)
    assert torch.equal(noised.noisy, noisy)
    assert torch.equal(noised.target, target)
    assert torch.equal(noised.weight, weight)
    assert torch.all((timesteps >= 100) & (timesteps < 600))


def test_no_min_snr_means_no_weight():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    noised = DDPMObjective(scheduler, config_from_dict({})).noised(
        torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8), torch.Generator().manual_seed(0))
    assert noised.weight is None


def test_every_registered_family_has_its_class_and_presets():
    for value, facts in registry.FAMILIES.items():
        if facts.flow_matching:
            continue  # their modules arrive with their tests
        cls = registry.family_class(value)
        assert facts.denoiser in facts.parts and cls.LAYER_PRESETS
        assert set(cls.LAYER_PRESETS) <= {"attn-only", "attn-mlp", "full", "blocks"}


def test_an_unknown_model_type_is_named():
    with pytest.raises(ValueError, match="model_type NOPE: no such model family"):
        registry.facts("NOPE")
