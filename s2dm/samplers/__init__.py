"""Samplers behind one functional API: ``sample(eps_fn, x_T, schedule, sampler=..., ...)``.

Every update rule is a free function ``f(eps_fn, x, schedule, grid, *, generator=None,
**options) -> x0`` that walks a timestep grid given as data (docs/method.md §5, §6). ``sample`` builds
and validates the grid, translates the legacy PNDM index convention at the edge (a shifted
schedule view; the update rules never see it), and wraps ``eps_fn`` once to count NFE,
apply the optional ε-scaling control (docs/method.md §4) and report progress.
``check_options`` is the one check of the options; ``SampleOptions`` (options.py) declares
them once for the command lines, configs and every caller.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import re
import sys
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from ..core.schedule import GRIDS, timestep_grid, validate_grid
from ..errors import S2dmError, SamplerError
from .ddim import ddim, ddim_coefficients, step_alphas, walked_grid
from .ddpm import ddpm
from .deis import ORDERS, check_order, deis, deis_coefficients, deis_rho
from .pndm import LegacyIndexView, pndm, spndm

SAMPLERS = ("ddim", "ddpm", "pndm", "spndm", "deis", "deis-rho")
REGISTRY: Dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim,
    "ddpm": ddpm,
    "pndm": pndm,
    "spndm": spndm,
    "deis": deis,
    "deis-rho": deis_rho,
}
_DEIS = ("deis", "deis-rho")

__all__ = [
    "SAMPLERS", "REGISTRY", "GRIDS", "ORDERS", "sample", "check_options", "expected_nfe", "parse_eps_scale",
    "normalize_eps_scale", "describe_eps_scale", "timestep_grid",
    "validate_grid", "LegacyIndexView", "ddim", "ddpm", "pndm", "spndm", "deis", "deis_rho",
    "deis_coefficients",
]

EpsScale = Union[None, float, str, dict, tuple]


def expected_nfe(sampler: str, steps: int) -> int:
    """Network evaluations for ``steps`` walked steps: S, F-PNDM S+9, S-PNDM S+1."""
    if sampler == "pndm":
        return steps + 3 * min(steps, 3)
    if sampler == "spndm":
        return steps + 1
    return steps


# -- ε-scaling control (docs/method.md §4) -------------------------------------------------
def parse_eps_scale(text: Optional[str]) -> EpsScale:
    """CLI form → spec: "" / "none" → None; "1.005" or "const:1.005" → 1.005;
    "skip:9,tau:0.99" (or "skip=9,tau=0.99") → {"skip": 9, "tau": 0.99}."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    body = text.strip()
    if body.lower().startswith("const:"):
        body = body[len("const:"):]
    try:
        value = float(body)
    except ValueError:
        pass
    else:
        normalize_eps_scale(value)
        return value
    fields = {}
    for part in body.split(","):
        match = re.fullmatch(r"\s*(skip|tau)\s*[:=]\s*([^\s,]+)\s*", part)
        if not match or match.group(1) in fields:
            raise SamplerError(f"eps_scale: cannot parse {text!r}; use e.g. '1.005' or 'skip:9,tau:0.99'", key="eps_scale")
        fields[match.group(1)] = match.group(2)
    if "skip" not in fields:
        raise SamplerError(f"eps_scale: {text!r} needs a skip, e.g. 'skip:9,tau:0.99'", key="eps_scale")
    try:
        spec = {"skip": int(fields["skip"])}
        if "tau" in fields:
            spec["tau"] = float(fields["tau"])
    except ValueError:
        raise SamplerError(f"eps_scale: bad number in {text!r}", key="eps_scale") from None
    normalize_eps_scale(spec)
    return spec


def normalize_eps_scale(spec: EpsScale, T: Optional[int] = None):
    """None, ("const", s) or ("skip", skip, tau), validated (SamplerError); skip < T if T given."""
    if isinstance(spec, str):
        spec = parse_eps_scale(spec)
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise SamplerError(f"eps_scale: expected a number, dict or string, got {spec!r}", key="eps_scale")
    if isinstance(spec, numbers.Real):
        if not (math.isfinite(spec) and spec > 0):
            raise SamplerError(f"eps_scale: a constant must be a positive number, got {spec!r}", key="eps_scale")
        return ("const", float(spec))
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        spec = {"skip": spec[0], "tau": spec[1]}
    if not isinstance(spec, dict) or "skip" not in spec or set(spec) - {"skip", "tau"}:
        raise SamplerError(f"eps_scale: expected None, a number, {{'skip': k, 'tau': t}} or a string, got {spec!r}",
                           key="eps_scale")
    skip, tau = spec["skip"], spec.get("tau", 0.99)
    if isinstance(skip, bool) or not isinstance(skip, numbers.Integral) or not 1 <= skip < (T or math.inf):
        raise SamplerError(f"eps_scale: skip must be an integer in [1, {T - 1 if T else 'T-1'}], got {skip!r}",
                           key="eps_scale")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau <= 1:
        raise SamplerError(f"eps_scale: tau must lie in (0, 1], got {tau!r}", key="eps_scale")
    return ("skip", int(skip), float(tau))


def describe_eps_scale(norm) -> Optional[str]:
    if norm is None:
        return None
    if norm[0] == "const":
        return f"const:{norm[1]:g}"
    return f"skip-shrink:skip={norm[1]},tau={norm[2]:g}"


def _eps_scaler(norm, schedule) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """eps ↦ scaled eps for a normalised spec.

    The skip factor is the loss's own optimum, ``NoiseSchedule.shrink_factor`` (one
    implementation, in core/schedule.py). It is tabulated once, in float64 on the CPU, at
    every half-integer t in [0, T−1] (samplers only produce integers and PNDM's half-integer
    mid-points), then moved once per device/dtype and looked up by index: no host sync, any
    device.
    """
    if norm is None:
        return None
    if norm[0] == "const":
        s = norm[1]
        return lambda eps, t: eps.div(s)
    _, skip, tau = norm
    half_steps = torch.arange(2 * schedule.T - 1, dtype=torch.float64) / 2
    table = schedule.shrink_factor(half_steps, skip, tau)
    cache: Dict[Tuple[Any, Any], torch.Tensor] = {}

    def scale(eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = (eps.device, eps.dtype)
        if key not in cache:
            cache[key] = table.to(device=eps.device, dtype=eps.dtype)
        t = torch.as_tensor(t, device=eps.device).reshape(-1)
        index = (2 * t).round().long() if t.is_floating_point() else 2 * t
        factor = cache[key][index]
        if factor.numel() == 1:
            factor = factor.expand(eps.shape[0])
        return eps * factor.view(-1, *([1] * (eps.ndim - 1)))

    return scale


# -- the entry point ----------------------------------------------------------------------
MIN_STEPS = {"pndm": 4, "spndm": 2}  # their warm-up must end before the final step to −1


@contextlib.contextmanager
def _option(name: str):
    """Name the option in an error raised inside: ``steps: ...`` (kept if already named), and
    make it the error's ``key``; its class stays."""
    try:
        yield
    except S2dmError as exc:
        text = str(exc)
        if text.startswith(f"{name}:"):
            exc.key = name
            raise
        raise exc.retold(f"{name}: {text}", key=name) from None


def check_options(
    schedule,
    *,
    sampler: str = "ddim",
    steps: int = 20,
    grid: Union[str, list, tuple, torch.Tensor] = "uniform",
    eta: float = 0.0,
    order: int = 3,
    eps_scale: EpsScale = None,
    legacy_pndm_index: bool = False,
) -> Dict[str, Any]:
    """Validate sampling options without running anything (SamplerError on a bad one, its
    message starting with the option's name: ``sampler: unknown sampler 'x'; ...``).

    Returns the info ``sample`` would report, with ``nfe`` the expected count, so that a CLI
    can fail (or write metadata) before it opens a progress bar or loads data. The one
    check of every option: ``SampleOptions.validate`` (samplers/options.py) calls it.
    """
    with _option("sampler"):
        if sampler not in REGISTRY:
            raise SamplerError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    info: Dict[str, Any] = {"sampler": sampler, "grid": grid if isinstance(grid, str) else "explicit"}
    with _option("eta"):
        if sampler == "ddim":
            info["eta"] = float(eta)
            if not info["eta"] >= 0:
                raise SamplerError(f"must be >= 0, got {eta}")
        elif eta:
            raise SamplerError(f"applies to sampler 'ddim' only, not {sampler!r}")
        elif sampler == "ddpm":
            info["eta"] = 1.0  # the posterior step is DDIM with η = 1
    with _option("order"):
        checked_order = check_order(order)  # every sampler: a typo fails even where it is unused
        if sampler in _DEIS:
            info["order"] = checked_order
    view = LegacyIndexView(schedule) if legacy_pndm_index else schedule
    named = isinstance(grid, str)
    with _option("grid"):
        if named and grid not in GRIDS:
            raise SamplerError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)} or pass a list")
    with _option("steps" if named else "grid"):  # a named grid fails only on its steps
        walked = timestep_grid(grid, steps, schedule.T)
    with _option("legacy_pndm_index"):
        if legacy_pndm_index and int(walked[0]) > view.T - 1:
            raise SamplerError(f"pairs t with alpha_bar[t+1]: grid points must be <= {view.T - 1}")
        walked = walked_grid(walked, view)
    n_steps = len(walked) - 1
    with _option("steps"):
        if n_steps < MIN_STEPS.get(sampler, 1):
            raise SamplerError(f"{sampler} needs at least {MIN_STEPS[sampler]} steps (its warm-up would call the "
                               f"model at t=-1); got {n_steps}")
    with _option("eta"):
        if info.get("eta"):
            ddim_coefficients(*step_alphas(view, walked), info["eta"])  # σ² ≤ 1 − ᾱ_s on this grid
    with _option("eps_scale"):
        scale = describe_eps_scale(normalize_eps_scale(eps_scale, schedule.T))
    info.update(steps=n_steps, timesteps=walked.tolist(), nfe=expected_nfe(sampler, n_steps),
                eps_scale=scale, legacy_pndm_index=bool(legacy_pndm_index))
    return info


@torch.no_grad()
def sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    schedule,
    *,
    sampler: str = "ddim",
    steps: int = 20,
    grid: Union[str, list, tuple, torch.Tensor] = "uniform",
    eta: float = 0.0,
    order: int = 3,
    eps_scale: EpsScale = None,
    generator=None,
    progress: bool = False,
    legacy_pndm_index: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Run ``sampler`` from x_T to x̂0 on a ``grid`` of ``steps``; return (x0, info).

    ``eps_fn(x, t)`` gets a batch and t of shape (B,) (int64; float32 at fractional PNDM
    mid-points) and returns ε_θ shaped like x (cast to x's dtype here). ``eta`` is for
    ``ddim`` only; ``order`` (0–3) for the DEIS samplers. ``generator`` (ddim η > 0, ddpm):
    a torch.Generator or an object with ``randn_like(x)`` such as ``PerSeedNoise``.
    ``eps_scale``: None; a constant s (ε_θ/s); or a skip-shrink spec {"skip": k, "tau": τ} /
    (k, τ) / "skip:k,tau:τ" that multiplies ε_θ(x, t) by τ/(τ+(1−τ)c_t²).
    ``legacy_pndm_index`` pairs model time t with ᾱ[t+1] and ends at ᾱ[0], as the official
    PNDM/DEIS code does (grid points ≤ T−2); the ε-scale factor still uses ᾱ[t], the pairing
    the network was trained with. Runs under ``torch.no_grad``.
    info (see ``check_options``): sampler, grid, steps, timesteps, nfe (counted here),
    eps_scale, legacy_pndm_index, and eta (ddim/ddpm) or order (deis, deis-rho).
    """
    info = check_options(schedule, sampler=sampler, steps=steps, grid=grid, eta=eta, order=order,
                         eps_scale=eps_scale, legacy_pndm_index=legacy_pndm_index)
    view = LegacyIndexView(schedule) if legacy_pndm_index else schedule
    scale = _eps_scaler(normalize_eps_scale(eps_scale, schedule.T), schedule)
    options = {key: info[key] for key in ("eta", "order") if key in info and sampler != "ddpm"}
    total, calls = info["nfe"], [0]

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        eps = eps_fn(x, t)
        if eps.shape != x.shape:
            raise ValueError(f"eps_fn returned shape {tuple(eps.shape)} for input {tuple(x.shape)}")
        if eps.dtype != x.dtype:
            eps = eps.to(x.dtype)
        if scale is not None:
            eps = scale(eps, t)
        if progress:
            print(f"\r{sampler}: {calls[0]}/{total} NFE", end="\n" if calls[0] >= total else "",
                  file=sys.stderr, flush=True)
        return eps

    x0 = REGISTRY[sampler](model, x_T, view, torch.tensor(info["timesteps"]), generator=generator, **options)
    info["nfe"] = calls[0]
    return x0, info
