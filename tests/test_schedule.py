"""The flow-matching schedule of common.py: invariants, the three resolution shifts, and parity with diffusers.

Run: python -m pytest -q tests/test_schedule.py
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from common import denoise, flux_mu, get_schedule, sample_sigmas, shift_factor, time_shift

FLUX_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)  # FLUX.1-dev's scheduler/scheduler_config.json


@pytest.mark.parametrize("r", [1.0, math.sqrt(8), math.exp(1.15), 3.0, 0.5])
def test_schedule_endpoints_and_monotonicity(r):
    sigmas = get_schedule(20, r)
    assert sigmas.shape == (21,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_mu_at_256_and_4096_tokens():
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    for tokens in (256, 1024, 4096, 16384):  # diffusers' formula, including extrapolation past 4096
        assert flux_mu(tokens) == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15))


def test_shift_identity_at_r_1_and_the_exponential_form():
    sigma = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    assert torch.equal(time_shift(1.0, sigma), sigma)
    mu = 1.15  # FLUX's form e^mu / (e^mu + 1/sigma - 1) is the same map with r = e^mu
    assert torch.allclose(
        time_shift(math.exp(mu), sigma), math.exp(mu) / (math.exp(mu) + 1 / sigma - 1)
    )


def test_shift_factors():
    # 1024², f32c32
    assert shift_factor("dcgen", tokens=32 * 32, channels=32) == pytest.approx(2.828, abs=1e-3)
    # 4096², f64c128
    assert shift_factor("flux", tokens=4096, channels=128) == pytest.approx(math.exp(1.15))
    assert shift_factor("constant", tokens=1, channels=1, value=3.0) == 3.0
    with pytest.raises(ValueError, match="'flux', 'dcgen', 'constant'"):
        shift_factor("karras", 1, 1)


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_schedule_equals_diffusers_flux_scheduler(tokens):
    steps = 20
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    )
    ours = get_schedule(steps, shift_factor("flux", tokens, 16))
    assert (scheduler.sigmas - ours).abs().max() < 1e-6


def test_denoise_matches_diffusers_euler_steps():
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=0.8)
    velocity = lambda x, sigma: torch.sin(3 * x) * sigma + x.mean()  # any smooth field
    x = torch.randn(2, 4, 3, 3)
    ref = x.clone()
    for t in scheduler.timesteps:
        ref = scheduler.step(velocity(ref, float(t) / 1000), t, ref, return_dict=False)[0]
    assert (denoise(velocity, x, get_schedule(8, math.exp(0.8))) - ref).abs().max() < 1e-5


def test_denoise_is_exact_on_a_straight_path():
    """For a single data point x0 the ideal velocity is v = (x - x0) / sigma, constant along the straight path from the
    noise to x0, so Euler lands on x0 whatever the schedule."""
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    out = denoise(lambda x, sigma: (x - x0) / sigma, noise, get_schedule(5, 3.0))
    assert (out - x0).abs().max() < 1e-5


def test_training_sigmas_are_logit_normal_on_the_1000_grid():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20_000, 1.0, g).double()
    assert s.shape == (20_000,) and s.min() > 0 and s.max() <= 1
    assert torch.allclose(s * 1000, (s * 1000).round(), atol=1e-3)  # r = 1: multiples of 1/1000
    assert abs(s.median().item() - 0.5) < 0.01  # logit-normal(0, 1) is symmetric about 1/2
    # P(|u - 1/2| > 0.35) = P(|z| > logit(0.85) = 1.735) = 0.083
    tails = ((s - 0.5).abs() > 0.35).double().mean()
    assert 0.073 < tails < 0.093  # (a uniform u would give 0.30)
    shifted = sample_sigmas(20_000, 3.0, torch.Generator().manual_seed(0))
    # r = 3 moves the mass to high noise: median 3·0.5 / (1 + 2·0.5) = 0.75
    assert shifted.median() > 0.7
