"""The math of fast-sampling distillation as plain functions: guidance distillation and LADD.

Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"; the
recipe of FLUX.1 [dev], FLUX.1 Kontext paper §3): a student fed the guidance scale ``w``
regresses onto the teacher's classifier-free-guided velocity ``v_u + w (v_c - v_u)``
(`kontext.diffusion.sampling.velocity` with ``cfg_scale=w``), so one evaluation per step replaces two.

Latent adversarial diffusion distillation (Sauer et al. 2024, arXiv 2403.12015, the [pro]
recipe): a few-step student predicts ``x0_hat = x_t - t v`` at a small set of student times;
fakes (``x0_hat``) and reals are re-noised to ``t_hat`` from a logit-normal biased to high
noise, and a discriminator built on the frozen teacher's features tells them apart with a
hinge (or non-saturating) loss; an optional R1 penalty smooths the discriminator.

Flow convention as in :mod:`kontext.diffusion.flow`: ``z_t = (1 - t) x + t eps``, t = 1 is noise.
Discriminator logits are (B, K): one per sample and per head; losses sum over heads and
average over the batch, as LADD's ``E[sum_k ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kontext.diffusion.flow import interpolate, per_sample, sample_t


# ------------------------------------------------------------------------------ guidance
def sample_guidance(batch: int, low: float, high: float, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
    """Guidance scales ``w ~ U[low, high]``, shape (B,), float32 (drawn on the generator's device)."""
    if high < low:
        raise ValueError(f"guidance range must have low <= high, got [{low}, {high}]")
    draw_device = generator.device if generator is not None else device
    u = torch.rand(batch, generator=generator, device=draw_device).to(device)
    return low + (high - low) * u


# ---------------------------------------------------------------------------------- LADD
def predict_x0(x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
    """The clean sample a velocity prediction implies: ``x0_hat = x_t - t v``."""
    return x_t - per_sample(t, x_t) * v


def sample_student_t(batch: int, timesteps: Sequence[float], probs: Sequence[float] | None = None,
                     generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Student times drawn from the discrete set ``timesteps`` (uniformly, or with ``probs``), (B,)."""
    times = torch.as_tensor(list(timesteps), dtype=torch.float32)
    weights = torch.ones(len(times)) if probs is None else torch.as_tensor(list(probs), dtype=torch.float32)
    if weights.shape != times.shape or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"student timestep probabilities {probs} do not fit timesteps {list(timesteps)}")
    draw_device = generator.device if generator is not None else "cpu"
    idx = torch.multinomial(weights.to(draw_device), batch, replacement=True, generator=generator)
    return times.to(draw_device)[idx].to(device)


def sample_renoise_t(batch: int, m: float = 1.0, s: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, eps: float = 1e-3) -> Tensor:
    """Re-noising levels ``t_hat = sigmoid(N(m, s^2))``, kept inside [eps, 1 - eps], (B,).

    LADD's default m = 1, s = 1 puts the median at sigmoid(1) ~ 0.73: mostly high noise, where
    the discriminator judges global structure rather than texture."""
    return sample_t(batch, m, s, generator=generator, device=device).clamp(eps, 1 - eps)


def renoise(x0: Tensor, noise: Tensor, t_hat: Tensor | float) -> Tensor:
    """``(1 - t_hat) x0 + t_hat noise``: the forward process applied to a clean (predicted) sample."""
    return interpolate(x0, noise, t_hat)


def few_step_timesteps(student_timesteps: Sequence[float], steps: int) -> list[float]:
    """The sampler's explicit time list for ``steps`` steps, every step at a trained student time.

    From the trained set (e.g. [1, .75, .5, .25]) plus the end point 0: 4 steps use all of it,
    2 steps every second time ([1, .5, 0]), 1 step only the first ([1, 0])."""
    times = sorted({float(t) for t in student_timesteps}, reverse=True)
    if steps < 1 or len(times) % steps:
        raise ValueError(f"{steps} steps do not divide the {len(times)} student timesteps {times}")
    return [*times[:: len(times) // steps], 0.0]


# ----------------------------------------------------------------------- adversarial losses
def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """``E[sum_k relu(1 - D_k(real))] + E[sum_k relu(1 + D_k(fake))]``; logits (B, K)."""
    return F.relu(1 - real).sum(-1).mean() + F.relu(1 + fake).sum(-1).mean()


def hinge_g_loss(fake: Tensor) -> Tensor:
    """``-E[sum_k D_k(fake)]``."""
    return -fake.sum(-1).mean()


def ns_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    """Non-saturating (logistic) discriminator loss: ``softplus(-D(real)) + softplus(D(fake))``."""
    return F.softplus(-real).sum(-1).mean() + F.softplus(fake).sum(-1).mean()


def ns_g_loss(fake: Tensor) -> Tensor:
    """Non-saturating generator loss: ``softplus(-D(fake))``."""
    return F.softplus(-fake).sum(-1).mean()


GAN_LOSSES = {"hinge": (hinge_d_loss, hinge_g_loss), "non_saturating": (ns_d_loss, ns_g_loss)}


def gan_losses(kind: str):
    """(discriminator loss, generator loss) of a named kind: ``hinge`` or ``non_saturating``."""
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown adversarial loss {kind!r}; known: {sorted(GAN_LOSSES)}")
    return GAN_LOSSES[kind]


def r1_penalty(logits: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """R1-style penalty ``E[sum_i ||d sum_k D_k / d input_i||^2]`` on real inputs.

    ``inputs`` must require grad and ``logits`` (B, K) depend on them; the graph is kept so the
    penalty can be backpropagated into the discriminator."""
    grads = torch.autograd.grad(logits.sum(), list(inputs), create_graph=True)
    return sum(g.pow(2).flatten(1).sum(1) for g in grads).mean()
