"""The diffusion loss: per-pixel error, mask weighting, per-sample weights (min-SNR, concept
loss weight). Shapes: prediction/target [B, C, h, w]; mask [B, 1, h, w] at latent size."""
from __future__ import annotations

import torch


def pixel_loss(pred: torch.Tensor, target: torch.Tensor, *, mse_strength: float,
               mae_strength: float) -> torch.Tensor:
    """[B, 1, h, w]: the error of each latent pixel, averaged over channels."""
    error = pred.float() - target.float()
    loss = mse_strength * error.square() + mae_strength * error.abs()
    return loss.mean(dim=1, keepdim=True)


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


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                   v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for ε-targets, min(SNR, γ)/(SNR+1) for v."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if v_prediction else clipped / snr
