"""Timestep distributions, shift, dynamic shift and the flow-matching objective, each checked
against its formula computed here independently (closed-form CDFs, hand-worked numbers,
diffusers' own scheduler), plus the page preview's numbers. Pure tensor math: a few seconds."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer.errors import ConfigError
from trainer.flow_matching import (LossWeight, TimestepDistribution, discrete_weights,
                                   draw_timesteps, dynamic_shift, effective_shift,
                                   flow_target, image_seq_len, loss_weight, noisy_latents,
                                   shift_timesteps, sigmas_for, timestep_histogram)
from trainer.loss import timestep_range

N = 1000
SAMPLES = 200_000


def draw(distribution, seed=0, n=SAMPLES, **kw):
    return draw_timesteps(n, distribution=distribution, num_train_timesteps=kw.pop("N", N),
                          generator=torch.Generator().manual_seed(seed), **kw)


def bin_probabilities(timesteps, edges, count=N):
    """Empirical P(x in [e_k, e_k+1)) with x = t / (count - 1): the discrete draws' unit scale."""
    x = timesteps.double() / (count - 1)
    return torch.tensor([((x >= a) & (x < b)).double().mean().item()
                         for a, b in zip(edges[:-1], edges[1:])])


def cdf_probabilities(cdf, edges):
    return torch.tensor([cdf(b) - cdf(a) for a, b in zip(edges[:-1], edges[1:])],
                        dtype=torch.float64)


EDGES = [k / 10 for k in range(10)] + [1.0 + 1e-9]


# --- UNIFORM: today's draw, bit for bit ------------------------------------------------------

@pytest.mark.parametrize("low, high", [(0.0, 1.0), (0.2, 0.6), (0.5, 0.5), (0.9, 0.3)])
def test_uniform_without_shift_is_the_engines_randint_draw(low, high):
    """SD 1.5/SDXL runs stay bit-identical: same numbers from the same generator state."""
    a, b = timestep_range(N, low, high)
    expected = torch.randint(a, b, (64,), generator=torch.Generator().manual_seed(5))
    got = draw("UNIFORM", seed=5, n=64, min_strength=low, max_strength=high,
               noising_weight=0.0)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


def test_shift_formula_at_hand_worked_points():
    t = torch.tensor([250.0, 500.0, 750.0])
    # s = 3: 1000·3·t / (2t + 1000)
    assert shift_timesteps(t, 3.0, N).tolist() == pytest.approx([500.0, 750.0, 900.0])
    # s = 1/3 is its inverse: 500 -> 250
    assert shift_timesteps(torch.tensor([500.0]), 1 / 3, N).item() == pytest.approx(250.0)
    assert shift_timesteps(t, 1.0, N).tolist() == pytest.approx(t.tolist())


def test_shifted_uniform_is_the_floored_shift_of_a_uniform_draw_in_the_window():
    got = draw("UNIFORM", seed=3, n=1000, min_strength=0.1, max_strength=0.9, shift=3.0)
    u = torch.rand(1000, generator=torch.Generator().manual_seed(3))
    t = 100 + 800 * u
    expected = torch.floor(N * 3.0 * t / (2.0 * t + N)).long()
    assert (got - expected).abs().max() <= 1  # float32 rounding at an integer edge at most
    assert (got == expected).float().mean() > 0.99


# --- Continuous distributions -----------------------------------------------------------------

@pytest.mark.parametrize("weight, bias", [(0.0, 0.0), (0.5, -0.7), (-0.4, 1.2)])
def test_logit_normal_has_mean_bias_and_std_weight_plus_one_in_logit_space(weight, bias):
    big = 1_000_000  # fine timesteps, so flooring does not blur logit(t)
    t = draw("LOGIT_NORMAL", N=big, noising_weight=weight, noising_bias=bias)
    x = (t.double() + 0.5) / big
    logit = torch.log(x / (1 - x))
    assert logit.mean().item() == pytest.approx(bias, abs=0.02)
    assert logit.std().item() == pytest.approx(weight + 1.0, abs=0.02)


@pytest.mark.parametrize("weight", [0.0, 1.29, -0.5])
def test_heavy_tail_maps_each_uniform_draw_through_its_formula(weight):
    got = draw("HEAVY_TAIL", seed=11, n=2000, noising_weight=weight)
    u = torch.rand(2000, generator=torch.Generator().manual_seed(11)).double()
    f = 1 - u - weight * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    expected = torch.floor(N * f).long().clamp(0, N - 1)
    assert (got - expected).abs().max() <= 1
    assert (got == expected).float().mean() > 0.99


def _beta_cdf(alpha, beta):
    """CDF of Beta(α, β) by integrating its density on a fine grid (α, β ≥ 1: bounded)."""
    grid = np.linspace(0, 1, 20001)
    log_norm = math.lgamma(alpha + beta) - math.lgamma(alpha) - math.lgamma(beta)
    with np.errstate(divide="ignore"):
        pdf = np.exp(log_norm + (alpha - 1) * np.log(grid) + (beta - 1) * np.log(1 - grid))
    cum = np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(grid))])
    return lambda x: float(np.interp(min(x, 1.0), grid, cum))


@pytest.mark.parametrize("alpha, beta, cdf", [
    (0.5, 1.0, lambda x: min(x, 1.0) ** 0.5),                 # inverse-CDF path u^(1/α)
    (1.0, 3.0, lambda x: 1 - (1 - min(x, 1.0)) ** 3),         # inverse-CDF path 1 − u^(1/β)
    (2.0, 5.0, None),                                         # torch's Beta sampler
])
def test_beta_draws_follow_the_beta_density(alpha, beta, cdf):
    cdf = cdf or _beta_cdf(alpha, beta)
    t = draw("BETA", noising_weight=alpha, noising_bias=beta)
    x = (t.double() + 0.5) / N  # continuous draws are floored: a bin's centre
    empirical = torch.tensor([((x >= a) & (x < b)).double().mean().item()
                              for a, b in zip(EDGES[:-1], EDGES[1:])])
    assert (empirical - cdf_probabilities(cdf, EDGES)).abs().max() < 0.006


def test_beta_general_case_follows_the_runs_generator():
    """OneTrainer's Beta(α≠1, β≠1) path ignores the seed; ours repeats under it (exact resume)."""
    first = draw("BETA", seed=4, n=100, noising_weight=2.0, noising_bias=5.0)
    again = draw("BETA", seed=4, n=100, noising_weight=2.0, noising_bias=5.0)
    other = draw("BETA", seed=5, n=100, noising_weight=2, noising_bias=5)  # ints (the page)
    assert torch.equal(first, again) and not torch.equal(first, other)


# --- Discrete distributions -------------------------------------------------------------------

def _cos_map_cdf(x):
    # ∫ 2 / (π(1 − 2t + 2t²)) dt = (2/π)·arctan(2t − 1) + 1/2
    return 2 / math.pi * math.atan(2 * min(x, 1.0) - 1) + 0.5


def _parabola_cdf(weight, centre):
    def primitive(x):  # ∫ 2 − w(t − c)² dt
        return 2 * x - weight * (x - centre) ** 3 / 3
    total = primitive(1.0) - primitive(0.0)
    return lambda x: (primitive(min(x, 1.0)) - primitive(0.0)) / total


@pytest.mark.parametrize("distribution, kw, cdf", [
    ("COS_MAP", {}, _cos_map_cdf),
    ("INVERTED_PARABOLA", {"noising_weight": 7.7}, _parabola_cdf(7.7, 0.5)),  # Chroma presets
    ("INVERTED_PARABOLA", {"noising_weight": 4.0, "noising_bias": 0.2}, _parabola_cdf(4.0, 0.7)),
])
def test_discrete_distributions_follow_their_density(distribution, kw, cdf):
    t = draw(distribution, **kw)
    empirical = bin_probabilities(t, EDGES)
    assert (empirical - cdf_probabilities(cdf, EDGES)).abs().max() < 0.006


@pytest.mark.parametrize("distribution, kw, cdf", [
    ("COS_MAP", {}, _cos_map_cdf),
    ("INVERTED_PARABOLA", {"noising_weight": 7.7}, _parabola_cdf(7.7, 0.5)),
])
def test_discrete_shift_moves_the_density_like_shifting_each_draw(distribution, kw, cdf):
    """Reweighting by g'(x) must equal pushing the unshifted draw through the shift:
    P(shifted ≤ x) = F(g(x)), g(x) = x / (s − (s − 1)x)."""
    s = 3.0
    t = draw(distribution, shift=s, **kw)
    shifted_cdf = lambda x: cdf(min(x, 1.0) / (s - (s - 1) * min(x, 1.0)))  # noqa: E731
    assert (bin_probabilities(t, EDGES) - cdf_probabilities(shifted_cdf, EDGES)).abs().max() < 0.006


def test_inverted_parabola_clamps_to_zero_outside_its_support():
    # 2 − 20(x − 0.5)² > 0 only for |x − 0.5| < √0.1 ≈ 0.316
    t = draw("INVERTED_PARABOLA", noising_weight=20.0)
    x = t.double() / (N - 1)
    assert (x - 0.5).abs().max() < math.sqrt(0.1) + 1e-3
    assert (x - 0.5).abs().max() > math.sqrt(0.1) - 0.01


@pytest.mark.parametrize("bias", [-0.3, 0.0, 0.25])
def test_sigmoid_is_centred_at_bias_plus_one_half(bias):
    weight = 10.0
    w = discrete_weights("SIGMOID", weight, bias, 1.0, 1001)  # x_i = i / 1000
    centre = round((bias + 0.5) * 1000)
    assert w[centre].item() == pytest.approx(0.5, abs=1e-6)
    # P(x < c) from the density σ(w(x − c)), whose primitive is softplus(w(x − c))/w.
    c = bias + 0.5
    primitive = lambda x: math.log1p(math.exp(weight * (x - c))) / weight  # noqa: E731
    expected = (primitive(c) - primitive(0)) / (primitive(1) - primitive(0))
    t = draw("SIGMOID", noising_weight=weight, noising_bias=bias)
    assert (t.double() / (N - 1) < c).double().mean().item() == pytest.approx(expected, abs=0.006)


def test_sigmoid_applies_the_inverse_shift_twice_as_onetrainer_does():
    s, weight, bias = 2.5, 8.0, -0.1
    x = torch.linspace(0, 1, 11)
    g = lambda v: v / (s - (s - 1) * v)  # noqa: E731
    expected = torch.sigmoid(weight * (g(g(x)) - (bias + 0.5))) * s / (s - (s - 1) * x) ** 2
    torch.testing.assert_close(discrete_weights("SIGMOID", weight, bias, s, 11), expected)


# --- The noising window ------------------------------------------------------------------------

@pytest.mark.parametrize("distribution, kw", [
    ("UNIFORM", {}), ("LOGIT_NORMAL", {"noising_weight": 1.0}), ("HEAVY_TAIL", {}),
    ("BETA", {"noising_weight": 2.0, "noising_bias": 2.0}), ("COS_MAP", {}),
    ("SIGMOID", {"noising_weight": 3.0}), ("INVERTED_PARABOLA", {"noising_weight": 1.0}),
])
def test_min_max_noising_strength_bound_the_draw_without_shift(distribution, kw):
    t = draw(distribution, n=50_000, min_strength=0.25, max_strength=0.6, **kw)
    assert t.min().item() >= 250 and t.max().item() <= 599
    assert t.min().item() < 262 and t.max().item() > 587  # the window's ends are reached


def test_shift_can_carry_continuous_draws_out_of_the_window_but_not_discrete_ones():
    """OneTrainer shifts a continuous draw after placing it in the window; a discrete
    density is shifted inside the window."""
    continuous = draw("UNIFORM", n=50_000, min_strength=0.1, max_strength=0.9, shift=0.5)
    assert continuous.min().item() < 60 and continuous.max().item() < 820
    discrete = draw("COS_MAP", n=50_000, min_strength=0.1, max_strength=0.9, shift=0.5)
    assert discrete.min().item() >= 100 and discrete.max().item() <= 899


def test_draws_never_leave_the_scheduler_table():
    # sigmoid(30) is 1.0 in float32: t would be N, one past the σ table
    t = draw("LOGIT_NORMAL", n=100, noising_bias=30.0)
    assert t.max().item() == N - 1


def test_bad_settings_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="timestep_shift"):
        draw("UNIFORM", n=4, shift=0.0)
    with pytest.raises(ConfigError, match="noising_weight"):
        draw("LOGIT_NORMAL", n=4, noising_weight=-1.0)
    with pytest.raises(ConfigError, match="noising_weight"):
        draw("INVERTED_PARABOLA", n=4, noising_weight=100.0, noising_bias=3.0)
    with pytest.raises(ValueError):
        draw("GAUSSIAN", n=4)


# --- Dynamic shift -----------------------------------------------------------------------------

FLUX_SCHEDULER = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
                  "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True}


def test_dynamic_shift_mu_is_base_and_max_shift_at_base_and_max_length():
    assert math.log(dynamic_shift(256, FLUX_SCHEDULER)) == pytest.approx(0.5)
    assert math.log(dynamic_shift(4096, FLUX_SCHEDULER)) == pytest.approx(1.15)
    assert math.log(dynamic_shift(2176, FLUX_SCHEDULER)) == pytest.approx(0.825)  # midpoint
    custom = {"base_image_seq_len": 100, "max_image_seq_len": 1100, "base_shift": 0.3,
              "max_shift": 2.3}
    assert math.log(dynamic_shift(600, custom)) == pytest.approx(1.3)
    assert dynamic_shift(600, {**custom, "time_shift_type": "linear"}) == pytest.approx(1.3)


def test_dynamic_shift_matches_diffusers_scheduler_time_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    seq = image_seq_len(768, 1024)
    assert seq == 48 * 64
    s = dynamic_shift(seq, scheduler.config)  # a FrozenDict works as a config
    m = (1.15 - 0.5) / (4096 - 256)
    mu = seq * m + 0.5 - m * 256
    sigma = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(scheduler.time_shift(mu, 1.0, sigma),
                               s * sigma / (1 + (s - 1) * sigma))


def test_dynamic_shifting_replaces_timestep_shift():
    assert effective_shift(2.0, False, 4096, FLUX_SCHEDULER) == 2.0
    assert effective_shift(2.0, True, 4096, FLUX_SCHEDULER) == pytest.approx(math.exp(1.15))
    assert image_seq_len(1024, 1024) == 4096 and image_seq_len(512, 512, patch_size=1) == 4096


# --- Objective ---------------------------------------------------------------------------------

def test_sigmas_are_onetrainers_table():
    t = torch.tensor([0, 499, 999])
    assert sigmas_for(t, N).tolist() == pytest.approx([0.001, 0.5, 1.0])
    table = torch.arange(1, N + 1, dtype=torch.int32) / N
    every = torch.arange(N)
    assert torch.equal(sigmas_for(every, N), table[every])


def test_noisy_latents_interpolate_and_the_target_is_their_velocity():
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigmas = torch.tensor([1.0, 0.0, 0.25])
    x = noisy_latents(latents, noise, sigmas)
    torch.testing.assert_close(x[0], noise[0])
    torch.testing.assert_close(x[1], latents[1])
    torch.testing.assert_close(x[2], 0.75 * latents[2] + 0.25 * noise[2])
    h = 1e-2
    velocity = (noisy_latents(latents, noise, sigmas + h) - x) / h
    torch.testing.assert_close(velocity, flow_target(latents, noise), atol=1e-4, rtol=1e-4)
    assert noisy_latents(latents.bfloat16(), noise.bfloat16(), sigmas).dtype == torch.bfloat16


def test_sigma_loss_weight_is_sigma_and_constant_is_one():
    sigmas = torch.tensor([0.001, 0.3, 1.0])
    assert loss_weight(sigmas, "SIGMA").tolist() == pytest.approx([0.001, 0.3, 1.0])
    assert loss_weight(sigmas, LossWeight.CONSTANT).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError, match="loss_weight_fn MIN_SNR_GAMMA"):
        loss_weight(sigmas, "MIN_SNR_GAMMA")


# --- The page's preview ------------------------------------------------------------------------

def settings(**kw):
    base = dict(timestep_distribution=TimestepDistribution.UNIFORM, noising_weight=0.0,
                noising_bias=0.0, min_noising_strength=0.0, max_noising_strength=1.0,
                timestep_shift=1.0, dynamic_timestep_shifting=False)
    return SimpleNamespace(**{**base, **kw})


def test_histogram_counts_every_sample_in_its_bins():
    edges, counts = timestep_histogram(settings(), 512, bins=50, samples=20000)
    assert len(edges) == 51 and len(counts) == 50
    assert edges[0] == 0 and edges[-1] == N and sum(counts) == 20000
    assert min(counts) > 300  # uniform: ~400 a bin
    assert timestep_histogram(settings(), 512) == (edges, counts)  # steady preview


def test_histogram_mode_moves_with_noising_bias():
    modes = []
    for bias in (-1.0, 0.0, 1.0):
        _, counts = timestep_histogram(
            settings(timestep_distribution="LOGIT_NORMAL", noising_bias=bias), 512)
        modes.append(counts.index(max(counts)))
    assert modes[0] < modes[1] < modes[2]
    assert 21 <= modes[1] <= 28  # sigmoid(0) = 0.5: about the middle (a flat top, sampled)


def test_histogram_shows_dynamic_shift_at_the_chosen_resolution():
    def mean(resolution, dynamic):
        edges, counts = timestep_histogram(
            settings(dynamic_timestep_shifting=dynamic), resolution,
            scheduler_config=FLUX_SCHEDULER)
        centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        return sum(c * k for c, k in zip(centres, counts)) / sum(counts)
    assert mean(256, False) == pytest.approx(mean(1024, False))
    assert mean(256, True) < mean(1024, True)
    # 1024²: s = e^1.15; E[s·u / (1 + (s − 1)u)] for u ~ U(0, 1) = s/(s−1) − s·ln(s)/(s−1)²
    s = math.exp(1.15)
    expected = N * (s / (s - 1) - s * math.log(s) / (s - 1) ** 2)
    assert mean(1024, True) == pytest.approx(expected, rel=0.02)
