"""Noise schedule and timestep grids (docs/method.md §1 and §6).

Convention, everywhere in s2dm: integer timesteps t ∈ {0, …, T−1}; the network input t is
paired with ᾱ[t]; a sampler's last step goes to t = −1 where ᾱ = 1. β and ᾱ are float64 and
are cast only where they meet the network.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from ..errors import ConfigError, GridWarning, SamplerError

TimeLike = Union[int, float, torch.Tensor]


BETA_SCHEDULES = ("linear",)
VARIANTS = ("independent", "shared")  # which ε′ the skip-step loss uses (losses.py), hence its optimum


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving schedule: ``betas`` (T,), float64."""

    betas: torch.Tensor

    def __post_init__(self):
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu()
        if betas.ndim != 1 or len(betas) < 1:
            raise ConfigError("betas must be a non-empty 1-D sequence", key="betas")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError("betas must lie in (0, 1)", key="betas")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))
        # ᾱ with ᾱ(−1) = 1 prepended: index i ↔ t = i − 1. Used by every lookup.
        object.__setattr__(
            self, "_abar_ext", torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """DDPM's linear β schedule, built in float64."""
        return cls(torch.linspace(beta_start, beta_end, T, dtype=torch.float64))

    @classmethod
    def from_config(cls, diffusion) -> "NoiseSchedule":
        """Build from a ``DiffusionConfig`` (or anything with the same attributes)."""
        if diffusion.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"diffusion.beta_schedule: unknown schedule {diffusion.beta_schedule!r}",
                              key="diffusion.beta_schedule")
        return cls.linear(diffusion.num_timesteps, diffusion.beta_start, diffusion.beta_end)

    # -- lookups ------------------------------------------------------------------------
    @property
    def T(self) -> int:
        return len(self.betas)

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    def alpha_bar(self, t: TimeLike) -> torch.Tensor:
        """ᾱ at integer timesteps ``t`` (scalar or tensor, any device), float64; ᾱ(−1) = 1."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not bool((t == t.round()).all()):
                raise ValueError("alpha_bar takes integer timesteps; use alpha_bar_continuous")
            t = t.round()
        t = t.long()
        if bool(((t < -1) | (t > self.T - 1)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.T - 1}], got {t.min().item()}..{t.max().item()}")
        return self._abar_ext.to(t.device)[t + 1]

    def alpha_bar_continuous(self, t: TimeLike) -> torch.Tensor:
        """ᾱ(t) for real t ∈ [−1, T−1]: piecewise-linear interpolation of the discrete ᾱ."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if bool(((t < -1) | (t > self.T - 1)).any()):
            raise ValueError(f"timesteps must lie in [-1, {self.T - 1}]")
        table = self._abar_ext.to(t.device)
        pos = t + 1.0
        lo = pos.floor().long().clamp(max=self.T - 1)
        frac = pos - lo.to(torch.float64)
        return table[lo] * (1.0 - frac) + table[(lo + 1).clamp(max=self.T)] * frac

    def skip_alpha(self, t: TimeLike, skip: int) -> torch.Tensor:
        """α_skip(t) = ᾱ_t / ᾱ_{t−skip}: the skip-step forward kernel's coefficient.

        Only meaningful for t ≥ skip; smaller t clamp the denominator index to −1 (ᾱ = 1).
        Fractional t (PNDM mid-points) use the piecewise-linear ᾱ.
        """
        t = torch.as_tensor(t)
        if t.is_floating_point() and not bool((t == t.round()).all()):
            t = t.to(torch.float64)
            return self.alpha_bar_continuous(t) / self.alpha_bar_continuous((t - skip).clamp(min=-1))
        t = t.round().long() if t.is_floating_point() else t.long()
        return self.alpha_bar(t) / self.alpha_bar((t - skip).clamp(min=-1))

    def shrink_factor(self, t: TimeLike, skip: int, tau: float, variant: str = "independent") -> torch.Tensor:
        """The skip-step loss's optimum relative to E[ε|x_t] (docs/method.md §3), 1 where
        t < skip (the loss is plain L0 there); c_t² = (1−α_skip)/α_skip.

        ``variant="independent"`` (ε′ a fresh draw): τ/(τ + (1−τ)·c_t²), below 1;
        ``"shared"`` (ε′ = ε): (τ + (1−τ)·c_t)/(τ + (1−τ)·c_t²), above 1 where c_t < 1.
        The training loss's optimum and the samplers' skip-shrink ε-scaling (one
        implementation). Fractional t use the piecewise-linear ᾱ. float64, on t's device."""
        check_skip_loss(tau, variant)
        t = torch.as_tensor(t)
        a_skip = self.skip_alpha(t, skip)
        if variant == "shared":
            c2 = (1.0 - a_skip) / a_skip
            factor = (tau + (1.0 - tau) * c2.sqrt()) / (tau + (1.0 - tau) * c2)
        else:
            factor = tau / (tau + (1.0 - tau) * (1.0 - a_skip) / a_skip)
        return torch.where(t >= skip, factor, torch.ones_like(factor))


def check_skip_loss(tau: float, variant: str) -> None:
    """The skip-step loss's τ and ε′ variant, as the loss and its optimum take them."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}", key="variant")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 <= tau <= 1.0:
        raise ConfigError(f"tau must lie in [0, 1], not {tau!r}", key="tau")


# -- timestep grids ---------------------------------------------------------------------
GRIDS = ("uniform", "quad", "trailing")


def timestep_grid(grid: Union[str, Sequence[int]], steps: int, T: int) -> torch.Tensor:
    """The timesteps a sampler walks, as data: strictly decreasing, in [0, T−1], then −1.

    ``uniform`` takes exactly ``steps`` points ``i·(T//steps)`` (the DDIM code's range(0, T,
    T//S) gives S+1 points when S does not divide T; diffusers' "leading" also takes S). When S
    does not divide T the first point falls T mod S short of T − T//S; by more than one step's
    spacing (S = 600: 599, not 999), with a warning.
    ``quad`` is the DDIM code's int(linspace(0, √(0.8T), S)²); points that collapse onto the
    same integer are removed with a warning, so the walked grid may be shorter than ``steps``.
    ``trailing`` is diffusers' round(arange(T, 0, −T/S)) − 1. A list is taken as given
    (any order) and validated.
    Returns a LongTensor of length (number of model steps + 1), the last entry being −1.
    """
    if isinstance(grid, str):
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise SamplerError(f"steps must be a positive integer, got {steps!r}", key="steps")
        if steps > T:
            raise SamplerError(f"steps: {steps} exceeds the number of training timesteps T={T}", key="steps")
        if grid == "uniform":
            points = [i * (T // steps) for i in range(steps)]
            if points[-1] < T // 2:  # S = 1: t = 0 only, one step from x_T to x_0 with ᾱ ≈ 1
                warnings.warn(
                    f"uniform grid: with {steps} step{'s' if steps > 1 else ''} of T={T} the first point is "
                    f"t={points[-1]}, so the sampler treats x_T as x_{points[-1]} and the image is mostly noise; the "
                    f"trailing grid starts at {T - 1}", GridWarning, stacklevel=2)
            elif T % steps > T // steps:  # S = 600 of T = 1000: 0, 1, ..., 599, never near T
                warnings.warn(
                    f"uniform grid: {steps} steps do not divide T={T}, so its points are multiples of "
                    f"{T // steps} and the first is {points[-1]}, {T % steps} timesteps short of "
                    f"{T - T // steps}; the trailing grid starts at {T - 1} for any steps", GridWarning,
                    stacklevel=2)
        elif grid == "quad":
            raw = (np.linspace(0, math.sqrt(0.8 * T), steps) ** 2).astype(np.int64)
            points = sorted(set(int(p) for p in raw))
            if len(points) < steps:
                warnings.warn(
                    f"quad grid: {steps - len(points)} of {steps} points coincide after the integer "
                    f"cast and were removed; the sampler walks {len(points)} steps", GridWarning,
                    stacklevel=2,
                )
        elif grid == "trailing":
            # A float arange can give S + 1 points (T = 1000: S = 61, 103, ... 62 of 1000), the
            # last ≈ 0 and so −1 after the shift; diffusers has the same flaw. Its first S points
            # are the grid, equal to diffusers' wherever that has S points.
            points = (np.round(np.arange(T, 0, -T / steps)[:steps]) - 1).astype(np.int64).tolist()
        else:
            raise SamplerError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}", key="grid")
    else:
        if not isinstance(grid, (list, tuple, torch.Tensor, np.ndarray)):
            raise SamplerError(f"grid: expected one of {', '.join(GRIDS)} or a list of timesteps, got {grid!r}",
                               key="grid")
        raw = [float(p) for p in (grid.tolist() if isinstance(grid, torch.Tensor) else grid)]
        if any(p != int(p) for p in raw):
            raise SamplerError(f"timestep grid points must be integers, got {raw}")
        points = [int(p) for p in raw]
        if len(points) != len(set(points)):
            raise SamplerError(f"timestep grid has duplicate points: {points}")
    points = sorted(points, reverse=True)
    walked = torch.tensor(points + [-1], dtype=torch.long)
    validate_grid(walked, T)
    return walked


def validate_grid(walked: torch.Tensor, T: int) -> None:
    """A walked grid is strictly decreasing, inside [0, T−1] and ends at −1."""
    if walked.ndim != 1 or len(walked) < 2:
        raise SamplerError("a timestep grid needs at least one step")
    if int(walked[-1]) != -1:
        raise SamplerError("a walked timestep grid must end at -1")
    body = walked[:-1]
    if int(body.min()) < 0 or int(body.max()) > T - 1:
        raise SamplerError(f"timestep grid points must lie in [0, {T - 1}], got {body.tolist()}")
    if not bool((walked[1:] < walked[:-1]).all()):
        raise SamplerError(f"timestep grid must be strictly decreasing when walked: {walked.tolist()}")
