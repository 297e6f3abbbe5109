"""Ancestral DDPM sampling on a (possibly strided) grid: the DDPM posterior step.

Definition used here: each step t → s samples the forward posterior q(x_s | x_t, x̂0) of
the strided chain, with α_{t|s} = ᾱ_t/ᾱ_s and β_{t|s} = 1 − α_{t|s}:
    x̂0   = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t
    mean = √ᾱ_s·β_{t|s}/(1−ᾱ_t) · x̂0 + √α_{t|s}·(1−ᾱ_s)/(1−ᾱ_t) · x_t
    σ²   = β̃ = (1−ᾱ_s)/(1−ᾱ_t) · β_{t|s}        (DDPM's "small" posterior variance)
On the full grid (s = t−1) this is DDPM's Algorithm 2 with σ² = β̃_t. Algebraically it is
DDIM with η = 1; it is written here in the posterior form on purpose, so that the test
comparing it with ``ddim(eta=1)`` checks that identity rather than restating it.
"""
from __future__ import annotations

import torch

from .ddim import EpsFn, GridLike, gaussian_steps, step_alphas, walked_grid


def posterior_coefficients(abar_t: torch.Tensor, abar_s: torch.Tensor):
    """(a, b, σ) with x_s = a·x_t + b·ε + σ·z for the posterior step, float64."""
    alpha_ts = abar_t / abar_s
    beta_ts = 1 - alpha_ts
    c_x0 = abar_s.sqrt() * beta_ts / (1 - abar_t)
    c_xt = alpha_ts.sqrt() * (1 - abar_s) / (1 - abar_t)
    # Substitute x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t into the mean.
    a = c_x0 / abar_t.sqrt() + c_xt
    b = -c_x0 * (1 - abar_t).sqrt() / abar_t.sqrt()
    sigma = ((1 - abar_s) / (1 - abar_t) * beta_ts).clamp(min=0).sqrt()
    return a, b, sigma


def ddpm(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule,
    grid: GridLike,
    *,
    generator=None,
) -> torch.Tensor:
    """Ancestral posterior sampling along ``grid``; NFE = len(grid) − 1.

    Draws one ``randn(x.shape)`` from ``generator`` (see ``ddim.randn_like_from``) per step
    with σ > 0, in step order (the same stream as ``ddim(eta=1)``); the last step, to ᾱ = 1,
    returns the posterior mean x̂0.
    """
    walked = walked_grid(grid, schedule)
    a, b, sigma = posterior_coefficients(*step_alphas(schedule, walked))
    return gaussian_steps(eps_fn, x, walked, a, b, sigma, generator)
