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

from ..core.schedule import GRIDS, VARIANTS, timestep_grid, validate_grid
from ..errors import S2dmError, SamplerError
from .ddim import ddim, ddim_coefficients, step_alphas, walked_grid
from .ddpm import ddpm
from .deis import ORDERS, check_order, deis, deis_coefficients, deis_rho
from .pndm import LegacyIndexView, pndm, spndm

REGISTRY: Dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim,
    "ddpm": ddpm,
    "pndm": pndm,
    "spndm": spndm,
    "deis": deis,
    "deis-rho": deis_rho,
}
SAMPLERS = tuple(REGISTRY)
_DEIS = ("deis", "deis-rho")
# The options' defaults, declared once: sample() and check_options() take them, and so does
# SampleOptions (samplers/options.py), whence the CLI's flags and the config's sample: section.
DEFAULTS: Dict[str, Any] = {"sampler": "ddim", "steps": 50, "grid": "uniform", "eta": 0.0, "order": 3}
# Deterministic solvers of the same probability-flow ODE (DDIM with η = 0): with more steps their
# samples from one x_T converge to the same images. DDPM draws fresh noise at every step.
ODE_SAMPLERS = ("ddim", "pndm", "spndm", "deis", "deis-rho")

__all__ = [
    "SAMPLERS", "ODE_SAMPLERS", "REGISTRY", "GRIDS", "ORDERS", "DEFAULTS", "sample", "check_options", "check_sampler",
    "takes_order", "expected_nfe", "parse_eps_scale",
    "normalize_eps_scale", "eps_scale_label", "parse_eps_scale_list", "timestep_grid",
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
EPS_SCALE_FORMS = "'const:B' (or a bare B), 'linear:K,B', 'skip:S,tau:T' or 'skip:S,tau:T,variant:shared'"
_DEFAULT_TAU = 0.99
_TAGS = ("const", "linear", "skip")  # first element of a normalised spec


def _fail(message: str) -> SamplerError:
    return SamplerError(f"eps_scale: {message}", key="eps_scale")


def parse_eps_scale(text: Optional[str]) -> EpsScale:
    """CLI text → Python spec (validated; SamplerError naming eps_scale):

    - "" / "none" → None;
    - "1.005" or "const:1.005" → 1.005 (ε / 1.005);
    - "linear:K,B" → {"linear": (K, B)} (ε / (K·t + B));
    - "skip:9,tau:0.99" → {"skip": 9, "tau": 0.99} (τ defaults to 0.99 when absent);
      ",variant:shared" → {"skip": 9, "tau": 0.99, "variant": "shared"} (",variant:independent",
      the default, is dropped). Fields in any order, "=" works as ":".

    ``parse_eps_scale(eps_scale_label(x)) == parse_eps_scale(x)`` for every valid x."""
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
    linear = re.fullmatch(r"linear\s*[:=](.*)", body, flags=re.IGNORECASE | re.DOTALL)
    if linear:
        try:
            k, b = (float(part) for part in linear.group(1).split(","))
        except ValueError:
            raise _fail(f"cannot parse {text!r}; use 'linear:K,B' with two numbers, e.g. 'linear:1e-5,1.005'") from None
        spec: Dict[str, Any] = {"linear": (k, b)}
        normalize_eps_scale(spec)
        return spec
    fields = {}
    for part in body.split(","):
        match = re.fullmatch(r"\s*(skip|tau|variant)\s*[:=]\s*([^\s,]+)\s*", part)
        if not match:
            raise _fail(f"cannot parse {text!r}; use one of {EPS_SCALE_FORMS}")
        if match.group(1) in fields:
            raise _fail(f"{match.group(1)} given twice in {text!r}")
        fields[match.group(1)] = match.group(2)
    if "skip" not in fields:
        raise _fail(f"{text!r} needs a skip, e.g. 'skip:9,tau:0.99'")
    try:
        spec = {"skip": int(fields["skip"]), "tau": float(fields.get("tau", _DEFAULT_TAU))}
    except ValueError:
        raise _fail(f"bad number in {text!r}") from None
    if fields.get("variant", "independent") != "independent":
        spec["variant"] = fields["variant"]
    normalize_eps_scale(spec)
    return spec


def parse_eps_scale_list(text: str) -> list:
    """A sweep: ``"none,const:0.998,skip:9,tau:0.99,linear:1e-5,1"`` → [None, "const:0.998",
    "skip:9,tau:0.99", "linear:1e-5,1"], each item parsed and given its canonical label. A
    form's own commas stay inside it: ``linear:`` takes the next number, ``skip:`` the
    ``tau:``/``variant:`` fields that follow. An empty or repeated item is an error."""
    tokens = [t.strip() for t in str(text).split(",")]
    items, i = [], 0
    while i < len(tokens):
        item, i = tokens[i], i + 1
        if re.match(r"linear\s*[:=]", item, flags=re.IGNORECASE) and i < len(tokens):
            item, i = f"{item},{tokens[i]}", i + 1
        elif re.match(r"skip\s*[:=]", item):
            while i < len(tokens) and re.match(r"(tau|variant)\s*[:=]", tokens[i]):
                item, i = f"{item},{tokens[i]}", i + 1
        if not item:
            raise _fail(f"{text!r} has an empty item; write none for no scaling")
        label = eps_scale_label(parse_eps_scale(item))
        if label in items:
            raise _fail(f"{text!r} repeats {label or 'none'}")
        items.append(label)
    return items


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def normalize_eps_scale(spec: EpsScale, T: Optional[int] = None):
    """Any accepted form → its validated normalised tuple (SamplerError naming eps_scale):

    - None, "", "none" → None;
    - B > 0, "B", "const:B" → ("const", B);
    - {"linear": (K, B)}, "linear:K,B" → ("linear", K, B);
    - {"skip": S, "tau": τ}, (S, τ), "skip:S,tau:τ" → ("skip", S, τ) (independent variant);
    - {"skip": S, "tau": τ, "variant": "shared"}, (S, τ, "shared"),
      "skip:S,tau:τ,variant:shared" → ("skip", S, τ, "shared").

    τ defaults to 0.99; ``variant`` to "independent" (which stays implicit). A normalised
    tuple is accepted back unchanged. With ``T``: skip < T, and K·t + B > 0 for every t in
    [0, T−1] (without it, only at t = 0).
    """
    if isinstance(spec, str):
        spec = parse_eps_scale(spec)
    if spec is None:
        return None
    if isinstance(spec, bool):
        raise _fail(f"expected a number, dict or string, got {spec!r}")
    if isinstance(spec, numbers.Real):
        if not (math.isfinite(spec) and spec > 0):
            raise _fail(f"a constant must be a positive number, got {spec!r}")
        return ("const", float(spec))
    if isinstance(spec, (tuple, list)) and spec and isinstance(spec[0], str) and spec[0] in _TAGS:
        tag, rest = spec[0], list(spec[1:])  # a normalised tuple, checked again
        if tag == "const" and len(rest) == 1:
            return normalize_eps_scale(rest[0], T)
        if tag == "linear" and len(rest) == 2:
            spec = {"linear": rest}
        elif tag == "skip" and len(rest) in (2, 3):
            spec = rest
        else:
            raise _fail(f"not a normalised spec: {spec!r}")
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        spec = dict(zip(("skip", "tau", "variant"), spec))
    if isinstance(spec, dict) and "linear" in spec and set(spec) == {"linear"}:
        return _normalize_linear(spec["linear"], T)
    if not isinstance(spec, dict) or "skip" not in spec or set(spec) - {"skip", "tau", "variant"}:
        raise _fail(f"expected None, a number, {{'linear': (K, B)}}, {{'skip': S, 'tau': τ, 'variant': v}} "
                    f"or a string, got {spec!r}")
    skip, tau, variant = spec["skip"], spec.get("tau", _DEFAULT_TAU), spec.get("variant", "independent")
    if isinstance(skip, bool) or not isinstance(skip, numbers.Integral) or not 1 <= skip < (T or math.inf):
        raise _fail(f"skip must be an integer in [1, {T - 1 if T else 'T-1'}], got {skip!r}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < tau <= 1:
        raise _fail(f"tau must lie in (0, 1], got {tau!r}")
    if variant not in VARIANTS:
        raise _fail(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if variant == "shared":
        return ("skip", int(skip), float(tau), "shared")
    return ("skip", int(skip), float(tau))


def _normalize_linear(pair, T: Optional[int]):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_real(v) for v in pair)):
        raise _fail(f"linear takes two finite numbers (K, B), got {pair!r}")
    k, b = float(pair[0]) + 0.0, float(pair[1]) + 0.0  # + 0.0: no −0
    if not b > 0:
        raise _fail(f"linear:K,B divides ε by K·t + B, which must be > 0; at t = 0 it is B = {b!r}")
    if T is not None and not k * (T - 1) + b > 0:
        raise _fail(f"linear:K,B divides ε by K·t + B, which must be > 0 for t in [0, {T - 1}]; "
                    f"at t = {T - 1} it is {k * (T - 1) + b!r}")
    return ("linear", k, b)


def _number(x: float) -> str:
    """The shortest text that reads back as the same float: 1.0 → "1", 1e-05 → "1e-5"."""
    text = repr(float(x) + 0.0)
    mantissa, _, exponent = text.partition("e")
    if mantissa.endswith(".0"):
        mantissa = mantissa[:-2]
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def eps_scale_label(spec: EpsScale) -> Optional[str]:
    """The one canonical text of an ε-scale (any form ``normalize_eps_scale`` takes), None for
    none: ``const:1.005`` (also for a bare 1.005), ``linear:1e-5,1.0025``, ``skip:9,tau:0.99``
    (the independent variant stays implicit), ``skip:9,tau:0.99,variant:shared``. Numbers
    in their shortest round-trip form; ``parse_eps_scale`` reads every label back to the same
    spec. Invalid specs raise SamplerError."""
    norm = normalize_eps_scale(spec)
    if norm is None:
        return None
    if norm[0] == "const":
        return f"const:{_number(norm[1])}"
    if norm[0] == "linear":
        return f"linear:{_number(norm[1])},{_number(norm[2])}"
    label = f"skip:{norm[1]},tau:{_number(norm[2])}"
    return label + ",variant:shared" if norm[3:] == ("shared",) else label


def _eps_scaler(norm, schedule) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """eps ↦ scaled eps for a normalised spec.

    ``const``: ε / B. ``linear``: ε / (K·t + B). ``skip``: ε × the loss's own optimum,
    ``NoiseSchedule.shrink_factor`` of the spec's variant (one implementation, in
    core/schedule.py). The non-constant ones are tabulated once, in float64 on the CPU, at
    every half-integer t in [0, T−1] (samplers only produce integers and PNDM's half-integer
    mid-points), then moved once per device/dtype and looked up by index: no host sync, any
    device.
    """
    if norm is None:
        return None
    if norm[0] == "const":
        s = norm[1]
        return lambda eps, t: eps.div(s)
    half_steps = torch.arange(2 * schedule.T - 1, dtype=torch.float64) / 2
    if norm[0] == "linear":
        _, k, b = _normalize_linear(norm[1:], schedule.T)  # K·t + B > 0 on this schedule's t
        table, divide = k * half_steps + b, True
    else:
        _, skip, tau, *variant = norm
        table, divide = schedule.shrink_factor(half_steps, skip, tau, *variant), False
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
        factor = factor.view(-1, *([1] * (eps.ndim - 1)))
        return eps / factor if divide else eps * factor

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


def check_sampler(name: str, key: str = "sampler") -> str:
    """``name`` if it is a sampler's; otherwise SamplerError ``{key}: unknown sampler ...``."""
    if name not in REGISTRY:
        raise SamplerError(f"{key}: unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}", key=key)
    return name


def takes_order(sampler: str) -> bool:
    """Whether ``sampler`` has an ``order`` (the DEIS samplers); the others ignore it."""
    return sampler in _DEIS


def check_options(
    schedule,
    *,
    sampler: str = DEFAULTS["sampler"],
    steps: int = DEFAULTS["steps"],
    grid: Union[str, list, tuple, torch.Tensor] = DEFAULTS["grid"],
    eta: float = DEFAULTS["eta"],
    order: int = DEFAULTS["order"],
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
        check_sampler(sampler)
    info: Dict[str, Any] = {"sampler": sampler, "grid": grid if isinstance(grid, str) else "explicit"}
    with _option("eta"):
        if sampler == "ddim":
            if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
                raise SamplerError(f"expected a number, got {eta!r}")
            info["eta"] = float(eta)
            if not info["eta"] >= 0:
                raise SamplerError(f"must be >= 0, got {eta}")
        elif eta:
            raise SamplerError(f"applies to sampler 'ddim' only, not {sampler!r}")
        elif sampler == "ddpm":
            info["eta"] = 1.0  # the posterior step is DDIM with η = 1
    with _option("order"):
        checked_order = check_order(order)  # every sampler: a typo fails even where it is unused
        if takes_order(sampler):
            info["order"] = checked_order
    view = LegacyIndexView(schedule) if legacy_pndm_index else schedule
    named = isinstance(grid, str)
    with _option("grid"):
        if named and grid not in GRIDS:
            raise SamplerError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
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
        scale = eps_scale_label(normalize_eps_scale(eps_scale, schedule.T))
    info.update(steps=n_steps, timesteps=walked.tolist(), nfe=expected_nfe(sampler, n_steps),
                eps_scale=scale, legacy_pndm_index=bool(legacy_pndm_index))
    return info


@torch.no_grad()
def sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    schedule,
    *,
    sampler: str = DEFAULTS["sampler"],
    steps: int = DEFAULTS["steps"],
    grid: Union[str, list, tuple, torch.Tensor] = DEFAULTS["grid"],
    eta: float = DEFAULTS["eta"],
    order: int = DEFAULTS["order"],
    eps_scale: EpsScale = None,
    generator=None,
    progress: Union[bool, Callable[[float], None]] = False,
    legacy_pndm_index: bool = False,
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Run ``sampler`` from x_T to x̂0 on a ``grid`` of ``steps``; return (x0, info).

    ``eps_fn(x, t)`` gets a batch and t of shape (B,) (int64; float32 at fractional PNDM
    mid-points) and returns ε_θ shaped like x (cast to x's dtype here). ``eta`` is for
    ``ddim`` only; ``order`` (0–3) for the DEIS samplers. ``generator`` (ddim η > 0, ddpm):
    a torch.Generator or an object with ``randn_like(x)`` such as ``PerSeedNoise``.
    ``eps_scale`` (any form of ``normalize_eps_scale``): None; a constant B (ε_θ/B); a linear
    {"linear": (K, B)} / "linear:K,B" (ε_θ/(K·t + B)); or a skip-shrink spec {"skip": k, "tau": τ}
    / (k, τ) / "skip:k,tau:τ" that multiplies ε_θ(x, t) by the skip-step loss's optimum
    ``NoiseSchedule.shrink_factor`` (τ/(τ+(1−τ)c_t²); with "variant": "shared",
    (τ+(1−τ)c_t)/(τ+(1−τ)c_t²)).
    ``legacy_pndm_index`` pairs model time t with ᾱ[t+1] and ends at ᾱ[0], as the official
    PNDM/DEIS code does (grid points ≤ T−2); the ε-scale factor still uses ᾱ[t], the pairing
    the network was trained with. ``progress``: True prints the NFE count; a callable gets
    each network call's share of the batch's images (B/NFE), for an image progress bar that
    moves within a batch. Runs under ``torch.no_grad``.
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
            raise SamplerError(f"eps_fn returned shape {tuple(eps.shape)} for input {tuple(x.shape)}", key="eps_fn")
        if eps.dtype != x.dtype:
            eps = eps.to(x.dtype)
        if scale is not None:
            eps = scale(eps, t)
        if callable(progress):
            progress(x.shape[0] / total)
        elif progress:
            print(f"\r{sampler}: {calls[0]}/{total} NFE", end="\n" if calls[0] >= total else "",
                  file=sys.stderr, flush=True)
        return eps

    x0 = REGISTRY[sampler](model, x_T, view, torch.tensor(info["timesteps"]), generator=generator, **options)
    info["nfe"] = calls[0]
    return x0, info
