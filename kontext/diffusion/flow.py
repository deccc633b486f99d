"""The rectified-flow objective as plain functions, shared by training and sampling.

Convention (FLUX.1 Kontext paper, arXiv 2506.15742, §3 and appendix A): flow time ``t`` runs
from 0 (data ``x``) to 1 (noise ``eps``) on the straight line ``z_t = (1 - t) x + t eps``; the
network predicts the constant velocity ``eps - x`` of that line. Training draws ``t`` from a
logit-normal whose mode ``mu`` grows with the target token count; sampling walks the
``linspace(1, 0)`` grid warped by the matching time shift (reference FLUX ``get_schedule``).
``euler_step`` and ``cfg_velocity`` are the sampler's two formulas. Every function here is
independent of the network, the data and Lightning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mu_for_tokens(
    n_tokens: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    min_tokens: int = 256,
    max_tokens: int = 4096,
) -> float:
    """The shift mode for ``n_tokens`` target tokens: the line through (256, 0.5) and (4096, 1.15).

    Extrapolates linearly outside [min_tokens, max_tokens], as the reference sampler does.
    """
    slope = (max_shift - base_shift) / (max_tokens - min_tokens)
    return base_shift + slope * (n_tokens - min_tokens)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """Warp times ``t`` in [0, 1] towards noise: ``e^mu / (e^mu + (1/t - 1)^sigma)``.

    With sigma = 1 this is the SD3 shift ``a t / (1 + (a - 1) t)`` with ``a = e^mu``; t = 0 and
    t = 1 are fixed points (1/0 is inf in tensor arithmetic, so t = 0 maps to exactly 0).
    """
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def sample_t(
    batch: int,
    mu: float | Tensor,
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training times from a logit-normal: ``sigmoid(N(mu, sigma^2))``, shape (B,), float32.

    The normal draw happens on the generator's device (so a CPU generator gives the same
    times whatever ``device`` is) and is then moved to ``device``.
    """
    draw_device = generator.device if generator is not None else device
    z = torch.randn(batch, generator=generator, device=draw_device).to(device)
    return torch.sigmoid(torch.as_tensor(mu, device=z.device) + sigma * z)


def per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or (B,) value shaped to broadcast over ``like`` (B, ...)."""
    value = torch.as_tensor(value, device=like.device, dtype=like.dtype)
    return value.reshape(-1, *([1] * (like.ndim - 1))) if value.ndim == 1 else value


def interpolate(x: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """The point ``z_t = (1 - t) x + t noise``; a (B,) ``t`` broadcasts over the other axes of x."""
    t = per_sample(t, x)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """The velocity ``noise - x`` of the straight path, constant in t."""
    return noise - x


def flow_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over target tokens, in float32.

    pred, target: (B, L_img, C). ``pred`` must already be the target slice of the network
    output: context tokens carry no loss, and a shape mismatch means they were left in.
    """
    if pred.shape != target.shape:
        raise ValueError(f"flow_loss: prediction {tuple(pred.shape)} != target {tuple(target.shape)}")
    return F.mse_loss(pred.float(), target.float())


def schedule(
    num_steps: int,
    n_tokens: int,
    shift: bool = True,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """Sampling times from 1 to 0 inclusive, shape (num_steps + 1,), float32.

    ``n_tokens`` is the target token count only (context tokens do not move the shift).
    ``shift=False`` gives the plain uniform grid (for models trained without the shift).
    """
    if num_steps < 1:
        raise ValueError(f"schedule needs at least one step, got num_steps={num_steps}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        t = time_shift(mu_for_tokens(n_tokens, base_shift, max_shift), 1.0, t)
    return t.float()


def euler_step(z: Tensor, v: Tensor, t: float, t_next: float) -> Tensor:
    """One Euler step of ``dz/dt = v`` from ``t`` to ``t_next`` (towards data when t_next < t)."""
    return z + (t_next - t) * v


def cfg_velocity(cond: Tensor, uncond: Tensor, w: Tensor | float) -> Tensor:
    """Classifier-free guidance ``uncond + w (cond - uncond)``; ``w`` a scalar or one per sample (B,)."""
    return uncond + per_sample(w, cond) * (cond - uncond)
