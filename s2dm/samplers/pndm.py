"""PNDM (Liu et al., ICLR 2022): F-PNDM and S-PNDM, plus the legacy PNDM index view.

Both methods move x with PNDM's "transfer" φ(x, ε, t→s), which is the deterministic DDIM
step (see ``ddim.transfer_coefficients``); they differ in which ε they feed it.

- F-PNDM: the first 3 steps are pseudo Runge–Kutta with 4 calls each, at t, the mid-point
  m = (t+s)/2 (twice) and s:  e1 = ε(x,t); e2 = ε(φ(x,e1,t→m), m); e3 = ε(φ(x,e2,t→m), m);
  e4 = ε(φ(x,e3,t→s), s); ε′ = (e1 + 2e2 + 2e3 + e4)/6, and only e1 joins the history.
  Then 4th-order linear multistep ε′ = (55ε₀ − 59ε₋₁ + 37ε₋₂ − 9ε₋₃)/24. NFE = S + 9.
- S-PNDM: first step improved Euler (e1 at t, e2 at s after φ(x,e1,t→s); ε′ = (e1+e2)/2,
  e1 kept), then ε′ = (3ε₀ − ε₋₁)/2. NFE = S + 1.

Mid-points: when t+s is odd, m is a half-integer; the model then gets a float32 t and ᾱ(m)
is the schedule's piecewise-linear ``alpha_bar_continuous`` (docs/method.md §5). diffusers uses the
integer t − (T//S)//2 instead, and the official PNDM code truncates the ᾱ index of a
fractional m; all agree exactly when t − s is even (e.g. uniform grids with T//S even).
"""
from __future__ import annotations

from typing import List

import torch

from ..errors import SamplerError
from .ddim import EpsFn, GridLike, step_alphas, time_batch, transfer_coefficients, walked_grid

RK_STEPS = 3  # F-PNDM's pseudo Runge–Kutta warm-up steps


class LegacyIndexView:
    """The official PNDM code's pairing, as a schedule: ᾱ′(t) = ᾱ[t+1], so ᾱ′(−1) = ᾱ[0].

    The model still sees t; only the ᾱ paired with it moves. Valid grid points are therefore
    0 … T−2 (``T`` here is the base T − 1). Samplers take it in place of a ``NoiseSchedule``.
    """

    def __init__(self, base):
        self.base = base

    # Equal views of one base hash alike, so DEIS's coefficient cache works through them.
    def __eq__(self, other) -> bool:
        return isinstance(other, LegacyIndexView) and other.base is self.base

    def __hash__(self) -> int:
        return hash((LegacyIndexView, id(self.base)))

    @property
    def T(self) -> int:
        return self.base.T - 1

    def alpha_bar(self, t) -> torch.Tensor:
        return self.base.alpha_bar(torch.as_tensor(t) + 1)

    def alpha_bar_continuous(self, t) -> torch.Tensor:
        return self.base.alpha_bar_continuous(torch.as_tensor(t, dtype=torch.float64) + 1.0)


def _full_steps(schedule, walked: torch.Tensor):
    """Python-float (a, b) of φ(·, ·, t→s) for every step of the walked grid."""
    a, b = transfer_coefficients(*step_alphas(schedule, walked))
    return list(zip(a.tolist(), b.tolist()))


def _half_steps(schedule, walked: torch.Tensor, n: int):
    """(m, a, b) of φ(·, ·, t→m), m = (t+s)/2, for the first n steps; ᾱ(m) piecewise-linear
    (exactly the table value when m is an integer)."""
    mid = (walked[:n] + walked[1 : n + 1]).to(torch.float64) / 2
    abar_t = schedule.alpha_bar(walked[:n]).to(torch.float64).cpu()
    a, b = transfer_coefficients(abar_t, schedule.alpha_bar_continuous(mid).cpu())
    return list(zip(mid.tolist(), a.tolist(), b.tolist()))


def _check_steps(walked: torch.Tensor, need: int, name: str) -> None:
    # The warm-up stages evaluate ε at the end of their step; that end must be a real
    # timestep (≥ 0), never the terminal −1, so the warm-up must finish before the last step.
    steps = len(walked) - 1
    if steps < need:
        raise SamplerError(f"{name} needs at least {need} steps (its warm-up would call the model at t=-1); got {steps}",
                           key="steps")


def pndm(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule,
    grid: GridLike,
    *,
    generator=None,
) -> torch.Tensor:
    """F-PNDM along ``grid`` (≥ 4 steps); deterministic, ``generator`` is unused."""
    walked = walked_grid(grid, schedule)
    _check_steps(walked, RK_STEPS + 1, "pndm (F-PNDM)")
    pairs = list(zip(walked[:-1].tolist(), walked[1:].tolist()))
    full, half = _full_steps(schedule, walked), _half_steps(schedule, walked, RK_STEPS)
    history: List[torch.Tensor] = []  # the last ≤ 3 ε at earlier grid points, oldest first
    for i, ((t, s), (a_ts, b_ts)) in enumerate(zip(pairs, full)):
        e1 = eps_fn(x, time_batch(t, x))
        if i < RK_STEPS:
            m, a_tm, b_tm = half[i]
            t_m = time_batch(m, x)
            e2 = eps_fn(x.mul(a_tm).add_(e1, alpha=b_tm), t_m)
            e3 = eps_fn(x.mul(a_tm).add_(e2, alpha=b_tm), t_m)
            e4 = eps_fn(x.mul(a_ts).add_(e3, alpha=b_ts), time_batch(s, x))
            eps = (e1 + 2 * e2 + 2 * e3 + e4) / 6
        else:
            e3_, e2_, e1_ = history  # ε₋₃, ε₋₂, ε₋₁
            eps = (55 * e1 - 59 * e1_ + 37 * e2_ - 9 * e3_) / 24
        history = (history + [e1])[-RK_STEPS:]
        x = x.mul(a_ts).add_(eps, alpha=b_ts)
    return x


def spndm(
    eps_fn: EpsFn,
    x: torch.Tensor,
    schedule,
    grid: GridLike,
    *,
    generator=None,
) -> torch.Tensor:
    """S-PNDM along ``grid`` (≥ 2 steps); deterministic, ``generator`` is unused."""
    walked = walked_grid(grid, schedule)
    _check_steps(walked, 2, "spndm (S-PNDM)")
    pairs = list(zip(walked[:-1].tolist(), walked[1:].tolist()))
    full = _full_steps(schedule, walked)
    previous = None  # ε at the previous grid point
    for (t, s), (a_ts, b_ts) in zip(pairs, full):
        e1 = eps_fn(x, time_batch(t, x))
        if previous is None:
            e2 = eps_fn(x.mul(a_ts).add_(e1, alpha=b_ts), time_batch(s, x))
            eps = (e1 + e2) / 2
        else:
            eps = (3 * e1 - previous) / 2
        previous = e1
        x = x.mul(a_ts).add_(eps, alpha=b_ts)
    return x
