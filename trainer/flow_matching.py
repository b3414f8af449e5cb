"""Timestep sampling and the flow-matching objective, with OneTrainer's meaning of its settings.

Pure math on tensors (torch + math, no model code). The family objectives call it; the page's
timestep preview calls `timestep_histogram`. Conventions, as in OneTrainer:

- A timestep is an integer index t in [0, N) (N = the scheduler's num_train_timesteps, 1000).
- Its flow-matching noise level is σ = (t + 1) / N, so t = N − 1 is pure noise.
- `timestep_distribution` draws in a window [low, high) set by min/max_noising_strength, then
  `timestep_shift` s moves the draw toward noise (s > 1) or toward the image (s < 1):
  t ↦ N·s·t / ((s − 1)·t + N), which is σ ↦ s·σ / (1 + (s − 1)·σ) on the unit scale.
- `dynamic_timestep_shifting` replaces s by the resolution-dependent shift of the model's
  scheduler config (`dynamic_shift`); `timestep_shift` is then ignored, as OneTrainer does.

The same draw serves the DDPM families (SD 1.5 / SDXL) where OneTrainer applies it; UNIFORM
without shift is exactly the `torch.randint` draw Atelier always made, so SD runs stay
bit-identical.
"""
from __future__ import annotations

import math
from enum import Enum
from functools import lru_cache
from typing import Any

import torch

from trainer.errors import ConfigError
from trainer.loss import timestep_range


class TimestepDistribution(str, Enum):
    """OneTrainer's `timestep_distribution` values."""
    UNIFORM = "UNIFORM"
    SIGMOID = "SIGMOID"
    LOGIT_NORMAL = "LOGIT_NORMAL"
    HEAVY_TAIL = "HEAVY_TAIL"
    COS_MAP = "COS_MAP"
    INVERTED_PARABOLA = "INVERTED_PARABOLA"
    BETA = "BETA"


class LossWeight(str, Enum):
    """OneTrainer's `loss_weight_fn` values. Flow-matching models take CONSTANT and SIGMA only
    (`FLOW_LOSS_WEIGHTS`); the others are functions of a DDPM noise schedule's SNR."""
    CONSTANT = "CONSTANT"
    P2 = "P2"
    MIN_SNR_GAMMA = "MIN_SNR_GAMMA"
    DEBIASED_ESTIMATION = "DEBIASED_ESTIMATION"
    SIGMA = "SIGMA"


FLOW_LOSS_WEIGHTS = (LossWeight.CONSTANT, LossWeight.SIGMA)

# Distributions OneTrainer draws in continuous form (a float in the window, shifted, floored);
# the others it draws from a weight per integer timestep (a discrete density).
_CONTINUOUS = (TimestepDistribution.UNIFORM, TimestepDistribution.LOGIT_NORMAL,
               TimestepDistribution.HEAVY_TAIL, TimestepDistribution.BETA)

# diffusers' FlowMatchEulerDiscreteScheduler defaults (also Flux.1 dev's and schnell's values).
_SCHEDULER_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096,
                       "base_shift": 0.5, "max_shift": 1.15, "time_shift_type": "exponential"}


# --- The window and the shift ---------------------------------------------------------------

# [low, high) of the trained timesteps: low = ⌊N·min⌋, high = ⌊N·max⌋ (OneTrainer's window),
# non-empty and inside [0, N); the SD families' window too, so their UNIFORM draw is unchanged.
timestep_window = timestep_range


def shift_timesteps(timesteps: torch.Tensor, shift: float,
                    num_train_timesteps: int) -> torch.Tensor:
    """t ↦ N·s·t / ((s − 1)·t + N) on float timesteps (OneTrainer's continuous shift)."""
    n = num_train_timesteps
    return n * shift * timesteps / ((shift - 1) * timesteps + n)


def _config_value(config: Any, key: str):
    """A scheduler-config value from a dict, a diffusers FrozenDict or an object; diffusers'
    default where the config leaves it out (its scheduler fills the same defaults)."""
    if config is not None:
        if isinstance(config, dict) or hasattr(config, "keys"):
            if key in config:
                return config[key]
        elif hasattr(config, key):
            return getattr(config, key)
    return _SCHEDULER_DEFAULTS[key]


def dynamic_shift(image_seq_len: int, scheduler_config: Any = None) -> float:
    """The resolution-dependent shift s of a flow-matching scheduler config:
    μ = base_shift + (L − base_len)·(max_shift − base_shift)/(max_len − base_len), s = e^μ
    (s = μ when the config's time_shift_type is "linear"). L is the image's token count.

    This is diffusers' `calculate_shift` + `time_shift` and OneTrainer's
    `FluxModel.calculate_timestep_shift`; μ is extrapolated (not clamped) outside
    [base_len, max_len], as both do."""
    base_len = _config_value(scheduler_config, "base_image_seq_len")
    max_len = _config_value(scheduler_config, "max_image_seq_len")
    base_shift = _config_value(scheduler_config, "base_shift")
    max_shift = _config_value(scheduler_config, "max_shift")
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = image_seq_len * slope + (base_shift - slope * base_len)
    if _config_value(scheduler_config, "time_shift_type") == "linear":
        return float(mu)
    return math.exp(mu)


def image_seq_len(height: int, width: int, *, vae_scale: int = 8, patch_size: int = 2) -> int:
    """Tokens of an image: (h/vae/patch)·(w/vae/patch), floored as OneTrainer does
    (Flux: an 8x VAE and 2x2 packing, so a 1024² image is 64·64 = 4096 tokens)."""
    return (height // vae_scale // patch_size) * (width // vae_scale // patch_size)


def effective_shift(timestep_shift: float, dynamic_timestep_shifting: bool,
                    image_seq_len: int | None = None, scheduler_config: Any = None) -> float:
    """The shift a step uses: `dynamic_shift(L)` when dynamic shifting is on (then
    `timestep_shift` is ignored, as OneTrainer's tooltip says), else `timestep_shift`."""
    if dynamic_timestep_shifting:
        if image_seq_len is None:
            raise ValueError("dynamic_timestep_shifting needs the image's sequence length")
        return dynamic_shift(image_seq_len, scheduler_config)
    return float(timestep_shift)


# --- Drawing timesteps ----------------------------------------------------------------------

def draw_timesteps(n: int, *, distribution: TimestepDistribution | str = "UNIFORM",
                   noising_weight: float = 0.0, noising_bias: float = 0.0,
                   min_strength: float = 0.0, max_strength: float = 1.0, shift: float = 1.0,
                   num_train_timesteps: int = 1000, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] int64 timesteps in [0, N), drawn as OneTrainer's `_get_timestep_discrete` draws
    them (ModelSetupNoiseMixin). `shift` is the effective shift (see `effective_shift`).

    With w = noising_weight, b = noising_bias, [low, high) the window, W = high − low and
    u ~ U[0, 1):
    - UNIFORM:           t = low + W·u, then shifted (without shift: torch.randint(low, high)).
    - LOGIT_NORMAL:      t = low + W·sigmoid(x), x ~ N(b, (w + 1)²), then shifted.
    - HEAVY_TAIL:        t = low + W·(1 − u − w·(cos²(πu/2) − 1 + u)), then shifted.
    - BETA:              t = low + W·x, x ~ Beta(α = max(w, 1e-4), β = max(b, 1e-4)), shifted.
    - COS_MAP:           P(i) ∝ 2 / (π − 2πv + 2πv²)·J(i)  over i in [0, W), x_i = i/(W − 1),
    - SIGMOID:           P(i) ∝ sigmoid(w·(g(v) − (b + 0.5)))·J(i)      v = g(x_i),
    - INVERTED_PARABOLA: P(i) ∝ max(0, 2 − w·(v − (b + 0.5))²)·J(i)     g(x) = x/(s − (s − 1)x),
      then t = low + i. J(i) = s/(s − (s − 1)x_i)² is g's derivative: the discrete shift
      reweights the density in place of moving the draws.
    Continuous draws are floored (OneTrainer's `.int()`), so the shift can carry them outside
    [low, high) (not outside [0, N): they are clamped there, where OneTrainer would index past
    its σ table). SIGMOID applies g twice, as OneTrainer does; all equal at s = 1.
    """
    distribution = TimestepDistribution(distribution)
    if not (shift > 0 and math.isfinite(shift)):
        raise ConfigError(f"timestep_shift must be a positive number, not {shift}.")
    low, high = timestep_window(num_train_timesteps, min_strength, max_strength)
    if distribution == TimestepDistribution.UNIFORM and shift == 1.0:
        # The draw Atelier always made: SD 1.5/SDXL runs stay bit-identical.
        return torch.randint(low, high, (n,), generator=generator, device=device)
    if distribution in _CONTINUOUS:
        unit = _draw_unit(n, distribution, noising_weight, noising_bias, generator, device)
        timesteps = shift_timesteps(low + (high - low) * unit, shift, num_train_timesteps)
        return timesteps.long().clamp(0, num_train_timesteps - 1)
    weights = _weights_on(str(device), distribution, float(noising_weight),
                          float(noising_bias), float(shift), high - low)
    picks = torch.multinomial(weights, n, replacement=True, generator=generator)
    return picks + low


@lru_cache(maxsize=32)
def _weights_on(device: str, distribution, weight, bias, shift, count) -> torch.Tensor:
    # Kept on the training device: no host-to-device copy per step.
    return discrete_weights(distribution, weight, bias, shift, count).to(device)


def _draw_unit(n: int, distribution: TimestepDistribution, weight: float, bias: float,
               generator, device) -> torch.Tensor:
    """[n] float32 draws in [0, 1] of a continuous distribution, before window and shift."""
    if distribution == TimestepDistribution.UNIFORM:
        return torch.rand(n, generator=generator, device=device)
    if distribution == TimestepDistribution.LOGIT_NORMAL:
        scale = weight + 1.0  # OneTrainer: noising_weight 0 is the standard logit-normal
        if scale <= 0:
            raise ConfigError(f"noising_weight must be above -1 for LOGIT_NORMAL (it sets the "
                              f"spread, noising_weight + 1), not {weight}.")
        return torch.normal(bias, scale, size=(n,), generator=generator, device=device).sigmoid()
    if distribution == TimestepDistribution.HEAVY_TAIL:
        # SD3 paper's "mode sampling with heavy tails"; monotone for -1 ≤ w ≤ 2/(π − 2).
        u = torch.rand(n, generator=generator, device=device)
        return 1.0 - u - weight * (torch.cos(math.pi / 2.0 * u) ** 2.0 - 1.0 + u)
    # BETA: noising_weight is α, noising_bias is β (OneTrainer's B-TTDM mapping).
    alpha, beta = max(1e-4, weight), max(1e-4, bias)
    if abs(beta - 1.0) < 1e-5:      # Beta(α, 1): inverse CDF x = u^(1/α)
        return torch.rand(n, generator=generator, device=device).pow(1.0 / alpha)
    if abs(alpha - 1.0) < 1e-5:     # Beta(1, β): x = 1 − u^(1/β)
        return 1.0 - torch.rand(n, generator=generator, device=device).pow(1.0 / beta)
    # General case: torch's own Beta sampler (what torch.distributions.Beta calls), but fed
    # the run's generator: OneTrainer's path here ignores its seed, which would break resume.
    concentration = torch.tensor([alpha, beta], dtype=torch.float32, device=device)
    concentration = concentration.expand(n, 2).contiguous()
    return torch._sample_dirichlet(concentration, generator=generator)[:, 0]


def discrete_weights(distribution: TimestepDistribution | str, noising_weight: float,
                     noising_bias: float, shift: float, count: int) -> torch.Tensor:
    """[count] float32 unnormalised probabilities of the window's timesteps for COS_MAP,
    SIGMOID and INVERTED_PARABOLA (formulas in `draw_timesteps`). Computed on the CPU in
    float32 as OneTrainer does; cached per setting (a run with buckets and dynamic shift has a
    few shifts — OneTrainer keeps only the first one's weights, we keep each)."""
    weights = _discrete_weights(TimestepDistribution(distribution), float(noising_weight),
                                float(noising_bias), float(shift), int(count)).clone()
    if not bool(weights.sum() > 0) or not bool(torch.isfinite(weights).all()):
        raise ConfigError(
            f"{TimestepDistribution(distribution).value} with noising_weight {noising_weight} "
            f"and noising_bias {noising_bias} gives no timestep of the noising window a "
            "positive weight; lower noising_weight or move noising_bias.")
    return weights


@lru_cache(maxsize=32)
def _discrete_weights(distribution: TimestepDistribution, weight: float, bias: float,
                      shift: float, count: int) -> torch.Tensor:
    x = torch.linspace(0, 1, count)
    v = x / (shift - shift * x + x)                      # g(x): the inverse shift
    jacobian = shift / (shift + x - x * shift).pow(2)    # g'(x)
    if distribution == TimestepDistribution.COS_MAP:
        density = 2.0 / (math.pi - 2.0 * math.pi * v + 2.0 * math.pi * v ** 2.0)
    elif distribution == TimestepDistribution.SIGMOID:
        twice = v / (shift - shift * v + v)              # OneTrainer shifts SIGMOID's x twice
        density = 1 / (1 + torch.exp(-weight * (twice - (bias + 0.5))))
    elif distribution == TimestepDistribution.INVERTED_PARABOLA:
        density = torch.clamp(-weight * (v - (bias + 0.5)) ** 2 + 2, min=0.0)
    else:
        raise ValueError(f"{distribution.value} is drawn continuously, not from weights")
    return density * jacobian


# --- Noise, target, loss weight -------------------------------------------------------------

def sigmas_for(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """[B] float32 σ = (t + 1)/N: OneTrainer's table (arange(1, N + 1)/N) read at t.
    Note: OneTrainer hands the transformer t/1000 (Flux, Chroma) or t (SD 3), i.e. one step
    below σ·N; diffusers' pipelines hand it σ·N at inference."""
    return (timesteps.to(torch.int64) + 1).to(torch.float32) / num_train_timesteps


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor,
                  sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε, computed in σ's dtype (float32) and returned in the latents'."""
    s = sigmas.reshape(-1, *([1] * (latents.dim() - 1)))
    mixed = noise.to(s.dtype) * s + latents.to(s.dtype) * (1.0 - s)
    return mixed.to(latents.dtype)


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: v = dx_σ/dσ = ε − x₀."""
    return noise - latents


def loss_weight(sigmas: torch.Tensor, loss_weight_fn: LossWeight | str) -> torch.Tensor:
    """[B] per-sample weight of a flow-matching loss: CONSTANT → 1, SIGMA → σ (OneTrainer's
    `_flow_matching_losses`: the loss is multiplied by σ itself, not σ² or 1/σ)."""
    fn = LossWeight(loss_weight_fn)
    if fn == LossWeight.CONSTANT:
        return torch.ones_like(sigmas, dtype=torch.float32)
    if fn == LossWeight.SIGMA:
        return sigmas.to(torch.float32)
    raise ConfigError(f"loss_weight_fn {fn.value} does not apply to flow-matching models "
                      f"(choose {' or '.join(w.value for w in FLOW_LOSS_WEIGHTS)}).")


# --- The page's preview ---------------------------------------------------------------------

def timestep_histogram(settings: Any, resolution: int | tuple[int, int], *,
                       scheduler_config: Any = None, num_train_timesteps: int = 1000,
                       vae_scale: int = 8, patch_size: int = 2, bins: int = 50,
                       samples: int = 20000, seed: int = 0) -> tuple[list[float], list[int]]:
    """(edges, counts) of `samples` timesteps the settings draw at `resolution` (one side or
    (height, width)): `bins` equal bins over [0, N], so len(edges) = bins + 1 and the counts
    sum to `samples`. `settings` has OneTrainer's keys as attributes (the config does):
    timestep_distribution, noising_weight, noising_bias, min/max_noising_strength,
    timestep_shift, dynamic_timestep_shifting. A fixed seed keeps the preview steady while
    fields change. Unlike OneTrainer's preview, dynamic shifting is shown (at `resolution`)."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    shift = effective_shift(
        getattr(settings, "timestep_shift", 1.0),
        bool(getattr(settings, "dynamic_timestep_shifting", False)),
        image_seq_len(height, width, vae_scale=vae_scale, patch_size=patch_size),
        scheduler_config)
    timesteps = draw_timesteps(
        samples, distribution=getattr(settings, "timestep_distribution", "UNIFORM"),
        noising_weight=getattr(settings, "noising_weight", 0.0),
        noising_bias=getattr(settings, "noising_bias", 0.0),
        min_strength=getattr(settings, "min_noising_strength", 0.0),
        max_strength=getattr(settings, "max_noising_strength", 1.0),
        shift=shift, num_train_timesteps=num_train_timesteps,
        generator=torch.Generator().manual_seed(seed))
    counts, edges = torch.histogram(timesteps.double(), bins=bins,
                                    range=(0.0, float(num_train_timesteps)))
    return edges.tolist(), [int(c) for c in counts.tolist()]
