"""The flow objective: shift line, schedule, logit-normal times, interpolation and loss."""

import math

import pytest
import torch

from kontext.diffusion.flow import (
    flow_loss,
    interpolate,
    mu_for_tokens,
    sample_t,
    schedule,
    time_shift,
    velocity_target,
)


def test_mu_line_endpoints_and_slope():
    assert mu_for_tokens(256) == pytest.approx(0.5, abs=1e-12)
    assert mu_for_tokens(4096) == pytest.approx(1.15, abs=1e-12)
    # A 1024-token target (512x512 image) sits on the same line: 0.5 + 768 * 0.65 / 3840.
    assert mu_for_tokens(1024) == pytest.approx(0.63, abs=1e-12)
    # Custom endpoints move the line.
    mu = mu_for_tokens(100, base_shift=0.0, max_shift=1.0, min_tokens=0, max_tokens=200)
    assert mu == pytest.approx(0.5)


@pytest.mark.parametrize("steps,n_tokens", [(1, 256), (4, 1024), (30, 4096), (50, 64)])
def test_schedule_runs_monotone_from_one_to_zero(steps, n_tokens):
    t = schedule(steps, n_tokens)
    assert t.shape == (steps + 1,)
    assert t[0].item() == 1.0 and t[-1].item() == 0.0
    assert bool((t[1:] < t[:-1]).all())


def test_schedule_shift_equals_sd3_alpha_shift():
    steps, n_tokens = 20, 1024
    alpha = math.exp(mu_for_tokens(n_tokens))
    u = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sd3 = alpha * u / (1 + (alpha - 1) * u)
    torch.testing.assert_close(schedule(steps, n_tokens), sd3.float(), rtol=0, atol=1e-6)
    # Shifted towards noise: every interior time is later than on the uniform grid.
    assert bool((schedule(steps, n_tokens)[1:-1] > u[1:-1].float()).all())
    # shift=False is the uniform grid; the shift grows with the target token count.
    torch.testing.assert_close(schedule(steps, n_tokens, shift=False), u.float())
    assert bool((schedule(steps, 4096)[1:-1] > schedule(steps, 256)[1:-1]).all())


def test_time_shift_with_sigma_fixes_endpoints_and_midpoint():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    for sigma in (0.5, 1.0, 2.0):
        out = time_shift(0.7, sigma, t)
        assert out[0].item() == 0.0 and out[2].item() == 1.0
        # (1/0.5 - 1)^sigma = 1 for every sigma, so the midpoint maps to sigmoid(mu).
        assert out[1].item() == pytest.approx(1 / (1 + math.exp(-0.7)))


def test_logit_normal_times_follow_the_distribution():
    n, mu, sigma = 20000, 0.8, 1.0
    g = torch.Generator().manual_seed(1)
    t = sample_t(n, mu, sigma, generator=g)
    assert t.shape == (n,) and bool(((t > 0) & (t < 1)).all())
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-mu)), abs=0.01)
    # Kolmogorov-Smirnov distance to the logit-normal CDF Phi((logit t - mu) / sigma).
    ts, _ = t.double().sort()
    cdf = 0.5 * (1 + torch.erf((torch.logit(ts) - mu) / (sigma * math.sqrt(2))))
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = (cdf - ecdf).abs().max().item()
    assert ks < 1.63 / math.sqrt(n)  # 1% critical value
    # The same test rejects a different mode: it has power.
    wrong = 0.5 * (1 + torch.erf((torch.logit(ts) - (mu + 0.1)) / (sigma * math.sqrt(2))))
    assert (wrong - ecdf).abs().max().item() > 1.63 / math.sqrt(n)


def test_sample_t_is_deterministic_for_a_generator():
    a = sample_t(8, 0.5, generator=torch.Generator().manual_seed(3))
    b = sample_t(8, 0.5, generator=torch.Generator().manual_seed(3))
    c = sample_t(8, 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_interpolation_endpoints_and_broadcast():
    x, noise = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    torch.testing.assert_close(interpolate(x, noise, torch.zeros(3)), x)
    torch.testing.assert_close(interpolate(x, noise, torch.ones(3)), noise)
    t = torch.tensor([0.0, 0.25, 1.0])
    z = interpolate(x, noise, t)
    torch.testing.assert_close(z[1], 0.75 * x[1] + 0.25 * noise[1])
    torch.testing.assert_close(z[0], x[0])
    torch.testing.assert_close(z[2], noise[2])
    # Moving along the velocity from z_t reaches both ends of the line.
    v = velocity_target(x, noise)
    torch.testing.assert_close(z - t[:, None, None] * v, x)
    torch.testing.assert_close(z + (1 - t[:, None, None]) * v, noise)


def test_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    x, noise = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    target = velocity_target(x, noise)
    assert flow_loss(noise - x, target).item() == 0.0
    wrong = target + 0.1 * torch.randn_like(target)
    assert flow_loss(wrong, target).item() > 0
    torch.testing.assert_close(flow_loss(target + 0.5, target), torch.tensor(0.25))
    # bf16 predictions are scored in float32.
    assert flow_loss(target.bfloat16(), target).dtype == torch.float32


def test_loss_refuses_context_tokens_left_in_the_prediction():
    target = torch.randn(2, 16, 64)
    pred_with_ctx = torch.randn(2, 32, 64)
    with pytest.raises(ValueError, match="prediction"):
        flow_loss(pred_with_ctx, target)
