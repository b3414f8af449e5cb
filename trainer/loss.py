"""The diffusion loss: per-pixel error, mask weighting, per-sample weights (min-SNR, concept
loss weight). Shapes: prediction/target [B, C, h, w]; mask [B, 1, h, w] at latent size."""
from __future__ import annotations

import torch


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, *, mse_strength: float,
               mae_strength: float, huber_strength: float = 0.0,
               huber_delta: float = 1.0) -> torch.Tensor:
    """[B, 1, h, w]: the error of each latent pixel, averaged over channels.

    `mse·e² + mae·|e| + huber·H_δ(e)`, with the Huber loss H_δ(e) = e²/2 for |e| ≤ δ and
    δ·(|e| − δ/2) beyond: squared near zero, linear (outlier-tolerant) for large errors.
    """
    error = pred.float() - target.float()
    loss = mse_strength * error.square() + mae_strength * error.abs()
    if huber_strength:
        loss = loss + huber_strength * huber(error, huber_delta)
    return loss.mean(dim=1, keepdim=True)


def huber(error: torch.Tensor, delta: float) -> torch.Tensor:
    """Elementwise Huber loss of an error tensor (torch's huber_loss against zero)."""
    return torch.nn.functional.huber_loss(error, torch.zeros_like(error), reduction="none",
                                          delta=delta)


def sample_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device,
                 offset_noise_weight: float = 0.0) -> torch.Tensor:
    """Gaussian noise for the latents, plus offset noise: one extra N(0, w²) value per sample
    and channel added to every pixel, so the model also learns to shift the mean brightness
    (very dark or bright images). Offset 0 draws nothing extra from the generator."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset_noise_weight > 0:
        noise = noise + offset_noise_weight * torch.randn(
            (*shape[:2], 1, 1), generator=generator, device=device)
    return noise


def timestep_range(num_train_timesteps: int, min_strength: float,
                   max_strength: float) -> tuple[int, int]:
    """[low, high) of the trained timesteps from the min/max noising strengths (fractions of
    all timesteps); never empty."""
    low = min(int(min_strength * num_train_timesteps), num_train_timesteps - 1)
    high = max(int(max_strength * num_train_timesteps), low + 1)
    return low, min(high, num_train_timesteps)


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the noise ε, or for v-prediction models the velocity
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ (Salimans & Ho 2022)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def masked_sample_loss(per_pixel: torch.Tensor, mask: torch.Tensor | None, *,
                       unmasked_weight: float, normalize: bool) -> torch.Tensor:
    """[B]: `loss · max(mask, unmasked_weight)`, averaged per sample; divided by the mean
    weight when normalising (SPEC §2 Masked training). `mask` None = unmasked."""
    if mask is None:
        return per_pixel.mean(dim=(1, 2, 3))
    weight = torch.clamp(mask, min=unmasked_weight)
    loss = (per_pixel * weight).mean(dim=(1, 2, 3))
    if normalize:
        loss = loss / weight.mean(dim=(1, 2, 3)).clamp(min=1e-8)
    return loss


def masked_prior_loss(per_pixel: torch.Tensor, mask: torch.Tensor, *, unmasked_weight: float,
                      normalize: bool, weight: float) -> torch.Tensor:
    """[B]: OneTrainer's masked prior preservation: the error against the base model's
    prediction weighted by `weight · (1 − max(mask, unmasked_weight))`, the area outside the
    mask; divided by that area's mean weight when normalising (nothing outside: 0)."""
    outside = 1 - torch.clamp(mask, min=unmasked_weight, max=1)
    loss = (per_pixel * outside).mean(dim=(1, 2, 3)) * weight
    if normalize:
        loss = loss / outside.mean(dim=(1, 2, 3)).clamp(min=1e-8)
    return loss


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε-targets, min(SNR, γ)/(SNR+1) for v."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr
