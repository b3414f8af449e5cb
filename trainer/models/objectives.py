"""Training objectives: how a batch of clean latents becomes (model input, timesteps, target,
per-sample loss weight). A family holds one; the loop asks it and never knows which.

- `DDPMObjective` (SD 1.5, SDXL): discrete timesteps, `noisy = √ᾱ·x₀ + √(1−ᾱ)·ε`, target ε or
  (v-prediction) v, optional min-SNR-γ weight.
- `FlowMatchingObjective` (Flux, Chroma, SD 3): σ ∈ (0, 1], `noisy = (1−σ)·x₀ + σ·ε`, target
  `ε − x₀`, loss weight CONSTANT or SIGMA.

Both draw the noise first and then the timesteps from the same generator (the order the
engine has always used, so that a seeded SD run is the same run as before).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.flow_matching import (LossWeight, draw_timesteps, effective_shift, flow_target,
                                   loss_weight, noisy_latents, sigmas_for)
from trainer.loss import min_snr_weight, timestep_range, training_target


@dataclass
class NoisedBatch:
    noisy: torch.Tensor                 # the denoiser's latent input
    timesteps: torch.Tensor             # what the denoiser reads as its time input
    target: torch.Tensor                # what it learns to predict
    weight: torch.Tensor | None = None  # [B] per-sample loss factor (None = 1)


class DDPMObjective:
    """ε- or v-prediction on the model's DDPM schedule (its scheduler config)."""

    flow_matching = False

    def __init__(self, noise_scheduler, config):
        self.scheduler = noise_scheduler
        self.config = config
        self.low, self.high = timestep_range(noise_scheduler.config.num_train_timesteps,
                                             config.min_noising_strength,
                                             config.max_noising_strength)
        self.v_prediction = noise_scheduler.config.prediction_type == "v_prediction"

    def draw(self, n: int, size: tuple[int, int], generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
        """`n` timesteps of the run's distribution (`size`, the latents' (h, w), does not
        matter here)."""
        return self.draw_timesteps(n, generator, device)

    def draw_timesteps(self, n: int, generator: torch.Generator,
                       device: torch.device) -> torch.Tensor:
        """OneTrainer's timestep distributions apply to SD too (with `timestep_shift`); the
        default (UNIFORM, no shift) is exactly the engine's old `torch.randint` draw."""
        c = self.config
        return draw_timesteps(n, distribution=c.timestep_distribution,
                              noising_weight=c.noising_weight, noising_bias=c.noising_bias,
                              min_strength=c.min_noising_strength,
                              max_strength=c.max_noising_strength, shift=c.timestep_shift,
                              num_train_timesteps=self.scheduler.config.num_train_timesteps,
                              generator=generator, device=device)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor,
               generator: torch.Generator) -> NoisedBatch:
        return self.at(latents, noise,
                       self.draw_timesteps(latents.shape[0], generator, latents.device))

    def at(self, latents: torch.Tensor, noise: torch.Tensor,
           timesteps: torch.Tensor) -> NoisedBatch:
        """The batch noised at the given timesteps (the validation loss's fixed ones)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = training_target(self.scheduler, latents, noise, timesteps)
        weight = None
        if self.config.min_snr_gamma > 0:
            weight = min_snr_weight(timesteps, self.scheduler.alphas_cumprod,
                                    self.config.min_snr_gamma, self.v_prediction)
        return NoisedBatch(noisy, timesteps, target, weight)


class FlowMatchingObjective:
    """Rectified flow as Flux, Chroma and SD 3 were trained: the model predicts the velocity
    ε − x₀ at σ, drawn from the config's timestep distribution and shift (trainer/flow_matching.py,
    OneTrainer's formulas). `packing` is how many latent pixels one image token covers per
    side (2 for Flux's 2x2 packing and SD 3's patch size 2): the dynamic shift depends on the
    image's token count, and applies only where the family allows it (`dynamic_shift`: Flux;
    OneTrainer's Chroma and SD 3 ignore the switch).

    The model's time input is the drawn timestep t, with σ = (t + 1)/N, as OneTrainer trains
    (diffusers' pipelines sample at σ·N: one step of 1000 apart)."""

    flow_matching = True

    def __init__(self, noise_scheduler, config, packing: int = 2, dynamic_shift: bool = False):
        self.scheduler = noise_scheduler
        self.config = config
        self.packing = packing
        self.dynamic_shift = dynamic_shift
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def shift(self, latents: torch.Tensor) -> float:
        return self.shift_for(tuple(latents.shape[-2:]))

    def shift_for(self, size: tuple[int, int]) -> float:
        """The shift for latents of `size` (h, w): by their token count when dynamic."""
        c = self.config
        tokens = (size[0] // self.packing) * (size[1] // self.packing)
        return effective_shift(c.timestep_shift, self.dynamic_shift and c.dynamic_timestep_shifting,
                               tokens, self.scheduler.config)

    def draw(self, n: int, size: tuple[int, int], generator: torch.Generator,
             device: torch.device) -> torch.Tensor:
        """`n` timesteps of the run's distribution for latents of `size` (h, w): the shift
        depends on it where the family shifts dynamically."""
        c = self.config
        return draw_timesteps(
            n, distribution=c.timestep_distribution,
            noising_weight=c.noising_weight, noising_bias=c.noising_bias,
            min_strength=c.min_noising_strength, max_strength=c.max_noising_strength,
            shift=self.shift_for(size), num_train_timesteps=self.num_train_timesteps,
            generator=generator, device=device)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor,
               generator: torch.Generator) -> NoisedBatch:
        return self.at(latents, noise, self.draw(latents.shape[0], tuple(latents.shape[-2:]),
                                                 generator, latents.device))

    def at(self, latents: torch.Tensor, noise: torch.Tensor,
           timesteps: torch.Tensor) -> NoisedBatch:
        """The batch noised at the given timesteps (the validation loss's fixed ones)."""
        c = self.config
        sigmas = sigmas_for(timesteps, self.num_train_timesteps)
        weight = None
        if LossWeight(c.loss_weight_fn) != LossWeight.CONSTANT:
            weight = loss_weight(sigmas, c.loss_weight_fn)
        return NoisedBatch(noisy_latents(latents, noise, sigmas), timesteps.float(),
                           flow_target(latents, noise), weight)
