"""Training objectives: how a batch of clean latents becomes (model input, timesteps, target,
per-sample loss weight). A family holds one; the loop asks it and never knows which.

- `DDPMObjective` (SD 1.5, SDXL): discrete timesteps, `noisy = √ᾱ·x₀ + √(1−ᾱ)·ε`, target ε or
  (v-prediction) v, optional min-SNR-γ weight.
- `FlowMatchingObjective` (Flux, Chroma, SD 3): σ ∈ [0, 1], `noisy = (1−σ)·x₀ + σ·ε`, target
  `ε − x₀`, timesteps given to the model as σ·1000, loss weight CONSTANT or SIGMA.

Both draw the noise first and then the timesteps from the same generator (the order the
engine has always used, so that a seeded SD run is the same run as before).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def draw_timesteps(self, n: int, generator: torch.Generator,
                       device: torch.device, latents: torch.Tensor) -> torch.Tensor:
        distribution = getattr(self.config, "timestep_distribution", None)
        if distribution is None or str(getattr(distribution, "value", distribution)) == "UNIFORM":
            # exactly the draw the engine has always made: seeded SD runs stay the same runs
            return torch.randint(self.low, self.high, (n,), generator=generator, device=device)
        from trainer.flow_matching import draw_ddpm_timesteps
        return draw_ddpm_timesteps(n, config=self.config, low=self.low, high=self.high,
                                   num_train_timesteps=self.scheduler.config.num_train_timesteps,
                                   generator=generator, device=device)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor,
               generator: torch.Generator) -> NoisedBatch:
        timesteps = self.draw_timesteps(latents.shape[0], generator, latents.device, latents)
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
    image's token count."""

    flow_matching = True

    def __init__(self, noise_scheduler, config, packing: int = 2):
        self.scheduler = noise_scheduler
        self.config = config
        self.packing = packing
        self.num_train_timesteps = noise_scheduler.config.num_train_timesteps

    def image_seq_len(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // self.packing) * (latents.shape[-1] // self.packing)

    def draw_sigmas(self, n: int, generator: torch.Generator, device: torch.device,
                    latents: torch.Tensor) -> torch.Tensor:
        from trainer.flow_matching import draw_flow_sigmas
        return draw_flow_sigmas(n, config=self.config,
                                scheduler_config=self.scheduler.config,
                                image_seq_len=self.image_seq_len(latents),
                                num_train_timesteps=self.num_train_timesteps,
                                generator=generator, device=device)

    def noised(self, latents: torch.Tensor, noise: torch.Tensor,
               generator: torch.Generator) -> NoisedBatch:
        from trainer.flow_matching import flow_loss_weight
        sigmas = self.draw_sigmas(latents.shape[0], generator, latents.device, latents)
        s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        noisy = (1 - s) * latents + s * noise
        weight = flow_loss_weight(sigmas, self.config.loss_weight_fn)
        return NoisedBatch(noisy, sigmas * self.num_train_timesteps, noise - latents, weight)
