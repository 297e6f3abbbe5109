"""Training losses (docs/method.md §2): DDPM's ε-loss L0 and the S²-DM skip-step loss.

Both make ONE network call per sample; both return a scalar (batch mean of the per-sample
loss) or, with ``return_terms=True``, ``(scalar, terms)`` where ``terms`` holds per-sample
tensors ``loss``, ``l0`` and ``lskip`` (zero where t < skip) for logging. The timesteps ``t``
may lie on the CPU while ``x0`` is on a GPU, as the training loop keeps them: the float64
coefficients are made from them on the CPU, so the loss copies nothing back from the GPU (a
``.cpu()`` of a GPU tensor waits for all its queued work). The skip-step
loss's optimum relative to E[ε|x_t], τ/(τ+(1−τ)c_t²), is ``NoiseSchedule.shrink_factor``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from .schedule import NoiseSchedule, check_skip_loss

LOSS_TYPES = ("l0", "s2")  # the plain ε-loss, or the skip-step loss
REDUCTIONS = ("mean", "sum")
T_SAMPLINGS = ("antithetic", "uniform")  # how a batch's timesteps are drawn


def _per_sample(sq: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a squared error over all but the batch dimension."""
    if reduction == "mean":
        return sq.flatten(1).mean(1)
    if reduction == "sum":
        return sq.flatten(1).sum(1)
    raise ConfigError(f"reduction must be one of {', '.join(REDUCTIONS)}, not {reduction!r}", key="reduction")


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """float64 per-sample coefficient → like's dtype/device, broadcastable over C, H, W."""
    return coef.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (coefficients computed in float64)."""
    abar = schedule.alpha_bar(t.cpu())
    return _expand(abar.sqrt(), x0) * x0 + _expand((1.0 - abar).sqrt(), x0) * noise


def _predict(model, x0, t, schedule, noise, generator):
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    x_t = q_sample(x0, t, schedule, noise)
    return noise, model(x_t, t.to(x0.device, non_blocking=True))


def l0_loss(
    model,
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    noise: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    return_terms: bool = False,
    generator: Optional[torch.Generator] = None,
):
    """L0 = ‖ε − ε_θ(x_t, t)‖², reduced per sample (``mean`` or ``sum``), batch-averaged. ε is
    ``noise``, or drawn from ``generator`` (the global RNG when None)."""
    noise, eps = _predict(model, x0, t, schedule, noise, generator)
    l0 = _per_sample((noise - eps).square(), reduction)
    loss = l0.mean()
    if not return_terms:
        return loss
    return loss, {"loss": l0.detach(), "l0": l0.detach(), "lskip": torch.zeros_like(l0).detach()}


def skip_coefficient(schedule: NoiseSchedule, t: torch.Tensor, skip: int) -> torch.Tensor:
    """c_t = √((1−α_skip)/α_skip), α_skip = ᾱ_t/ᾱ_{t−skip}; float64 on the CPU."""
    a_skip = schedule.skip_alpha(t.cpu(), skip)
    return ((1.0 - a_skip) / a_skip).sqrt()


def skip_step_loss(
    model,
    x0: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    skip: int = 9,
    tau: float = 0.99,
    noise: Optional[torch.Tensor] = None,
    skip_noise: Optional[torch.Tensor] = None,
    variant: str = "independent",
    reduction: str = "mean",
    generator: Optional[torch.Generator] = None,
    return_terms: bool = False,
):
    """S²-DM loss: per sample τ·L0 + (1−τ)·L_skip where t ≥ skip, and L0 where t < skip.

    L_skip = ‖ε′ − c_t·ε_θ(x_t, t)‖² with the SAME ε_θ as L0 (one network call).
    ``variant="independent"`` (the authors' code): ε′ = ``skip_noise``; ``"shared"`` (the paper
    text): ε′ = ε. ε is ``noise``. What is not given is drawn from ``generator`` (the global RNG
    when None), ε before ε′: one generator's state makes the loss reproducible.
    """
    check_skip_loss(tau, variant)
    if not 1 <= skip < schedule.T:
        raise ConfigError(f"skip must lie in [1, {schedule.T - 1}], not {skip}", key="skip")
    noise, eps = _predict(model, x0, t, schedule, noise, generator)
    if variant == "shared":
        eps_prime = noise
    elif skip_noise is not None:
        eps_prime = skip_noise
    else:
        eps_prime = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    l0 = _per_sample((noise - eps).square(), reduction)
    c = _expand(skip_coefficient(schedule, t, skip), x0)  # x0's float32, not a bf16/fp16 autocast output's
    lskip = _per_sample((eps_prime - c * eps).square(), reduction)
    active = (t >= skip).to(device=l0.device, non_blocking=True)
    per_sample = torch.where(active, tau * l0 + (1.0 - tau) * lskip, l0)
    loss = per_sample.mean()
    if not return_terms:
        return loss
    return loss, {
        "loss": per_sample.detach(),
        "l0": l0.detach(),
        "lskip": torch.where(active, lskip, torch.zeros_like(lskip)).detach(),
    }
