"""DEIS (Zhang & Chen, ICLR 2023): exponential-integrator multistep samplers tAB and ρAB.

With v = x/√ᾱ and ρ = √((1−ᾱ)/ᾱ) the probability-flow ODE of the VP process is dv/dρ = ε,
so one step t → s is exactly
    x_s = √(ᾱ_s/ᾱ_t)·x_t + √ᾱ_s·∫_{ρ_t}^{ρ_s} ε dρ.
DEIS replaces ε by the Lagrange polynomial through the ε already computed at the last r+1
grid times (r = ``order``; the first steps use the lower orders available), giving
    x_s = a·x_t + Σ_j C_j·ε₋ⱼ,   C_j = √ᾱ_s·∫_{ρ_t}^{ρ_s} ℓ_j dρ.
- tAB: ℓ_j is a polynomial in the timestep t. ρ(t) comes from the piecewise-linear ᾱ(t), so
  the integral is done by Gauss–Legendre quadrature in ρ on every unit interval [k, k+1] of t
  (ᾱ is linear there, so t(ρ) = k + (1/(1+ρ²) − ᾱ_k)/(ᾱ_{k+1} − ᾱ_k) is smooth; working in ρ
  also removes the √ singularity of dρ/dt at t = −1 where ᾱ = 1).
- ρAB: ℓ_j is a polynomial in ρ, integrated exactly by Gauss–Legendre.
Order 0 is DDIM (C_0 = √ᾱ_s(ρ_s − ρ_t)), and Σ_j C_j equals that for every order because the
ℓ_j sum to 1. Coefficients are computed once per (schedule, grid, order) in float64 on the
CPU and cached; the step loop only does a·x + Σ C_j·ε₋ⱼ.
"""
from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import numpy as np
import torch

from ..errors import SamplerError
from .ddim import EpsFn, GridLike, time_batch, walked_grid

ORDERS = (0, 1, 2, 3)
_GL_PER_UNIT = 8  # nodes per unit t-interval (tAB); the integrand is smooth there
_GL_POLY = 4  # exact for polynomials of degree ≤ 7 (ρAB)

Coefficients = List[Tuple[float, Tuple[float, ...]]]  # per step: (a, (C_0, …, C_k))


def _gauss_legendre(n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def _lagrange_basis(nodes: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """ℓ_j(at) for the Lagrange basis through ``nodes`` (k+1,), shape (k+1, len(at))."""
    rows = []
    for j in range(len(nodes)):
        ell = torch.ones_like(at)
        for m in range(len(nodes)):
            if m != j:
                ell = ell * (at - nodes[m]) / (nodes[j] - nodes[m])
        rows.append(ell)
    return torch.stack(rows)


def _rho(abar: torch.Tensor) -> torch.Tensor:
    return ((1 - abar) / abar).sqrt()


def _unit_quadrature(schedule) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quadrature nodes in t and weights in ρ for each unit interval of t.

    Row j covers t ∈ [j−1, j] (j = 0 … T−1), so Σ_q w[j,q]·f(t[j,q]) ≈ ∫ f(t(ρ)) dρ over it.
    """
    abar = schedule.alpha_bar(torch.arange(-1, schedule.T)).to(torch.float64).cpu()
    rho = _rho(abar)
    lo, hi = rho[:-1, None], rho[1:, None]
    x, w = _gauss_legendre(_GL_PER_UNIT)
    rho_q = (hi + lo) / 2 + (hi - lo) / 2 * x
    weights = (hi - lo) / 2 * w
    left = torch.arange(-1, schedule.T - 1, dtype=torch.float64)[:, None]
    frac = (1 / (1 + rho_q**2) - abar[:-1, None]) / (abar[1:, None] - abar[:-1, None])
    return left + frac, weights


def check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or int(order) not in ORDERS:
        raise SamplerError(f"DEIS order must be one of {ORDERS}, got {order!r}", key="order")
    return int(order)


@lru_cache(maxsize=32)
def deis_coefficients(schedule, times: Tuple[int, ...], order: int, variant: str = "t") -> Coefficients:
    """Per-step (a, (C_0 … C_k)) for tAB (``variant="t"``) or ρAB (``"rho"``), k = min(order, i).

    ``times`` is the walked grid as a tuple (ending with −1). C_j multiplies the ε computed
    j grid points ago (C_0 the current one).
    """
    order = check_order(order)
    walked = torch.tensor(times, dtype=torch.long)
    abar = schedule.alpha_bar(walked).to(torch.float64).cpu()
    rho = _rho(abar)
    if variant == "t":
        tau_q, w_q = _unit_quadrature(schedule)
    elif variant != "rho":
        raise SamplerError(f"unknown DEIS variant {variant!r}; choose t or rho", key="variant")
    gl_x, gl_w = _gauss_legendre(_GL_POLY)
    out: Coefficients = []
    for i in range(len(times) - 1):
        t, s = times[i], times[i + 1]
        past = list(range(i, i - min(order, i) - 1, -1))  # grid indices, newest first
        if variant == "t":
            nodes = walked[past].to(torch.float64)
            at, w = tau_q[s + 1 : t + 1].reshape(-1), w_q[s + 1 : t + 1].reshape(-1)
        else:
            nodes = rho[past]
            half = (rho[i] - rho[i + 1]) / 2
            at, w = (rho[i] + rho[i + 1]) / 2 + half * gl_x, half * gl_w
        # ρ decreases along the step, so ∫_{ρ_t}^{ρ_s} = −(quadrature over [ρ_s, ρ_t]).
        integral = -(_lagrange_basis(nodes, at) * w).sum(dim=1)
        coeff = abar[i + 1].sqrt() * integral
        out.append((float((abar[i + 1] / abar[i]).sqrt()), tuple(coeff.tolist())))
    return out


def _multistep(eps_fn: EpsFn, x: torch.Tensor, walked: torch.Tensor, coeffs: Coefficients) -> torch.Tensor:
    history: List[torch.Tensor] = []  # newest first, only as many as the next step needs
    for t, (a, c) in zip(walked[:-1].tolist(), coeffs):
        history = [eps_fn(x, time_batch(t, x))] + history[: len(c) - 1]
        x_next = x.mul(a)
        for cj, ej in zip(c, history):
            x_next.add_(ej, alpha=cj)
        x = x_next
    return x


def _run(eps_fn, x, schedule, grid, order, variant):
    walked = walked_grid(grid, schedule)
    coeffs = deis_coefficients(schedule, tuple(walked.tolist()), check_order(order), variant)
    return _multistep(eps_fn, x, walked, coeffs)


def deis(eps_fn: EpsFn, x: torch.Tensor, schedule, grid: GridLike, *, generator=None, order: int = 3):
    """tAB-DEIS of ``order`` 0–3 along ``grid``; NFE = len(grid) − 1; ``generator`` unused."""
    return _run(eps_fn, x, schedule, grid, order, "t")


def deis_rho(eps_fn: EpsFn, x: torch.Tensor, schedule, grid: GridLike, *, generator=None, order: int = 3):
    """ρAB-DEIS of ``order`` 0–3 along ``grid``; NFE = len(grid) − 1; ``generator`` unused."""
    return _run(eps_fn, x, schedule, grid, order, "rho")
