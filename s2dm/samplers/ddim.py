"""DDIM (Song et al., ICLR 2021) for any η, plus the helpers every sampler shares.

One step t → s (s < t on the walked grid, ᾱ_{−1} = 1):
    x̂0  = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t
    σ   = η·√((1−ᾱ_t/ᾱ_s)(1−ᾱ_s)/(1−ᾱ_t))
    x_s = √ᾱ_s·x̂0 + √(1−ᾱ_s−σ²)·ε + σ·z,   z ~ N(0, I)
which is linear in (x_t, ε): x_s = a·x_t + b·ε + σ·z with a = √(ᾱ_s/ᾱ_t). The per-step
(a, b, σ) are computed once per grid in float64 on the CPU and meet x as Python floats, so
they take x's dtype and device and no step ever syncs with an accelerator.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple, Union

import torch

from ..core.schedule import validate_grid
from ..errors import SamplerError

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GridLike = Union[torch.Tensor, Sequence[int]]


# -- shared helpers -----------------------------------------------------------------------
def walked_grid(grid: GridLike, schedule) -> torch.Tensor:
    """The walked grid as a CPU LongTensor, validated against ``schedule.T`` (SamplerError)."""
    walked = torch.as_tensor(grid).detach().cpu()
    if walked.is_floating_point() and not bool((walked == walked.round()).all()):
        raise SamplerError(f"timestep grid points must be integers, got {walked.tolist()}", key="grid")
    walked = walked.long()
    validate_grid(walked, schedule.T)
    return walked


def time_batch(t: Union[int, float], x: torch.Tensor) -> torch.Tensor:
    """t as a (B,) tensor on x's device: int64 for integer t, float32 for a fractional one.

    float32 holds every half-integer below 2^23 exactly, which is all PNDM mid-points need.
    It is one element expanded to B (stride 0): the UNet sees that the whole batch shares t
    and embeds it once.
    """
    if float(t) == int(t):
        return torch.tensor(int(t), dtype=torch.long, device=x.device).expand(x.shape[0])
    return torch.tensor(float(t), dtype=torch.float32, device=x.device).expand(x.shape[0])


def randn_like_from(x: torch.Tensor, generator=None) -> torch.Tensor:
    """N(0, I) noise shaped like x from ``generator``: None (global RNG), a torch.Generator,
    or any object with ``randn_like(x)`` (e.g. ``s2dm.seeds.PerSeedNoise``).

    A torch.Generator draws on its own device, then the noise moves to x's: a seeded CPU
    generator then works with CUDA samples and gives the same draws on every device.
    """
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    if not isinstance(generator, torch.Generator):
        return generator.randn_like(x)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return z.to(x.device)


def transfer_coefficients(abar_t: torch.Tensor, abar_s: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(a, b) of the deterministic DDIM step x_s = a·x_t + b·ε, float64.

    b is written as PNDM's "transfer" does, −(ᾱ_s−ᾱ_t)/(√ᾱ_t(√((1−ᾱ_s)ᾱ_t)+√((1−ᾱ_t)ᾱ_s))),
    which equals √(1−ᾱ_s) − √(ᾱ_s/ᾱ_t)·√(1−ᾱ_t) without its cancellation for close t, s.
    """
    abar_t = abar_t.to(torch.float64)
    abar_s = abar_s.to(torch.float64)
    a = (abar_s / abar_t).sqrt()
    denom = abar_t.sqrt() * (((1 - abar_s) * abar_t).sqrt() + ((1 - abar_t) * abar_s).sqrt())
    b = -(abar_s - abar_t) / denom
    return a, b


def ddim_coefficients(
    abar_t: torch.Tensor, abar_s: torch.Tensor, eta: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, σ) per step for DDIM with this η, float64 tensors; SamplerError where σ² > 1−ᾱ_s."""
    a, b = transfer_coefficients(abar_t, abar_s)
    if eta == 0:
        return a, b, torch.zeros_like(a)
    abar_t = abar_t.to(torch.float64)
    abar_s = abar_s.to(torch.float64)
    var = (1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t)
    sigma = eta * var.sqrt()
    direction = 1 - abar_s - sigma**2
    # η ≤ 1 keeps this ≥ 0 up to round-off; a larger η can make it negative (→ NaN).
    if bool((direction < -1e-12).any()):
        raise SamplerError(f"eta={eta} is too large for this grid: 1 - alpha_bar_s - sigma^2 < 0", key="eta")
    b = direction.clamp(min=0).sqrt() - a * (1 - abar_t).sqrt()
    return a, b, sigma


def step_alphas(schedule, walked: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ_t, ᾱ_s) for every step of the walked grid, float64 on the CPU."""
    abar = schedule.alpha_bar(walked).to(torch.float64).cpu()
    return abar[:-1], abar[1:]


# -- the sampler --------------------------------------------------------------------------
def ddim(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule,
    grid: GridLike,
    *,
    generator=None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM along the walked ``grid``; one ε evaluation per step (NFE = len(grid) − 1).

    η = 0 is deterministic. For η > 0 one ``randn(x.shape)`` is drawn from ``generator`` per
    step whose σ > 0, in step order (the last step, to ᾱ = 1, has σ = 0 and draws nothing).
    """
    eta = float(eta)
    if not eta >= 0:
        raise SamplerError(f"eta must be >= 0, got {eta}", key="eta")
    walked = walked_grid(grid, schedule)
    a, b, sigma = ddim_coefficients(*step_alphas(schedule, walked), eta)
    return gaussian_steps(eps_fn, x, walked, a, b, sigma, generator)


def gaussian_steps(eps_fn: EpsFn, x: torch.Tensor, walked: torch.Tensor, a, b, sigma, generator) -> torch.Tensor:
    """x ← a·x + b·ε_θ(x, t) + σ·z along the grid (DDIM and the DDPM posterior share it);
    z is drawn only where σ > 0."""
    for t, ai, bi, si in zip(walked[:-1].tolist(), a.tolist(), b.tolist(), sigma.tolist()):
        eps = eps_fn(x, time_batch(t, x))
        x_next = x.mul(ai).add_(eps, alpha=bi)
        if si > 0:
            x_next.add_(randn_like_from(x, generator), alpha=si)
        x = x_next
    return x
