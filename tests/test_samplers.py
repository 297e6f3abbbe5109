"""Properties of s2dm.samplers: exactness, NFE, grids, errors, ε-scaling, DEIS accuracy."""
import math
import re
import warnings

import pytest
import torch

from s2dm.errors import ConfigError, UserError
from s2dm.samplers import (
    ODE_SAMPLERS, SAMPLERS, LegacyIndexView, check_options, deis_coefficients, eps_scale_label,
    normalize_eps_scale, parse_eps_scale, sample, timestep_grid,
)
from s2dm.core.schedule import NoiseSchedule
from s2dm.samplers.ddim import transfer_coefficients

T = 1000
SCHED = NoiseSchedule.linear(T)
F64 = torch.float64
DEIS_RUNS = [("deis", o) for o in range(4)] + [("deis-rho", o) for o in range(4)]
ALL_RUNS = [("ddim", 3), ("pndm", 3), ("spndm", 3)] + DEIS_RUNS


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def abar_c(t, like):
    """ᾱ at (possibly fractional) t, shaped to broadcast against ``like``."""
    t = torch.as_tensor(t).to(device="cpu", dtype=F64).reshape(-1, *([1] * (like.ndim - 1)))
    return SCHED.alpha_bar_continuous(t).to(like.dtype)


def toy_eps(x, t):
    tt = torch.as_tensor(t).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(x * (0.6 + 0.5 * torch.cos(tt / 173.0))) + 0.2 * torch.sin(tt / 61.0)


# -- exactness ----------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,order", ALL_RUNS)
@pytest.mark.parametrize("S", [10, 40])
def test_true_noise_of_one_point_is_recovered_exactly(sampler, order, S):
    # ε(x, t) = (x − √ᾱ_t·x0)/√(1−ᾱ_t) is constant along the exact ODE path, so every
    # consistent solver lands on x0. S = 40 gives F-PNDM half-integer mid-points.
    x0, e = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=1)
    top = T - T // S
    x_T = abar_c(top, x0).sqrt() * x0 + (1 - abar_c(top, x0)).sqrt() * e
    eps_fn = lambda x, t: (x - abar_c(t, x).sqrt() * x0) / (1 - abar_c(t, x)).sqrt()
    out, info = sample(eps_fn, x_T, SCHED, sampler=sampler, steps=S, order=order)
    assert info["timesteps"][0] == top
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("grid", ["uniform", "quad", "trailing"])
@pytest.mark.parametrize("variant", ["deis", "deis-rho"])
def test_deis_order0_is_ddim(grid, variant):
    ddim, _ = sample(toy_eps, randn(2, 3, 4, 4), SCHED, sampler="ddim", steps=10, grid=grid)
    deis, _ = sample(toy_eps, randn(2, 3, 4, 4), SCHED, sampler=variant, steps=10, grid=grid, order=0)
    torch.testing.assert_close(deis, ddim, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["t", "rho"])
@pytest.mark.parametrize("grid", ["uniform", "quad", "trailing"])
def test_deis_coefficients_sum_to_the_ddim_coefficient(variant, grid):
    walked = timestep_grid(grid, 10, T)
    abar = SCHED.alpha_bar(walked)
    a0, b0 = transfer_coefficients(abar[:-1], abar[1:])
    for order in range(4):
        coeffs = deis_coefficients(SCHED, tuple(walked.tolist()), order, variant)
        for i, (a, c) in enumerate(coeffs):
            assert len(c) == min(order, i) + 1
            assert a == pytest.approx(float(a0[i]), rel=1e-14)
            assert sum(c) == pytest.approx(float(b0[i]), rel=1e-12)


def test_ddpm_is_ddim_eta_one():
    run = lambda s, **kw: sample(toy_eps, randn(2, 3, 4, 4), SCHED, sampler=s, steps=10,
                                 generator=torch.Generator().manual_seed(3), **kw)[0]
    torch.testing.assert_close(run("ddpm"), run("ddim", eta=1.0), rtol=1e-12, atol=1e-12)


# -- DEIS / PNDM accuracy on a problem with a known solution ------------------------------
# Data N(0, s²I): x_t ~ N(0, (ᾱs² + 1 − ᾱ)I), so E[ε | x_t] = √(1−ᾱ)·x/(ᾱs² + 1 − ᾱ). In
# v = x/√ᾱ, ρ = √((1−ᾱ)/ᾱ) the ODE dv/dρ = ε becomes dv/dρ = v·ρ/(s² + ρ²), hence
# v ∝ √(s² + ρ²) and x_0 = x_T·s/√(ᾱ_T s² + 1 − ᾱ_T).
GAUSS_SD = 0.5
GAUSS_X_T = randn(4, 1, 8, 8, seed=7)


def gaussian_eps(x, t):
    abar = abar_c(t, x)
    return x * (1 - abar).sqrt() / (abar * GAUSS_SD**2 + 1 - abar)


def gaussian_error(sampler, order=3, steps=10):
    """Max |x_0 − the ODE's closed-form solution| from GAUSS_X_T."""
    out, info = sample(gaussian_eps, GAUSS_X_T, SCHED, sampler=sampler, steps=steps, order=order)
    ab = SCHED.alpha_bar(info["timesteps"][0])
    return float((out - GAUSS_X_T * GAUSS_SD / (ab * GAUSS_SD**2 + 1 - ab).sqrt()).abs().max())


def test_higher_order_is_more_accurate_on_gaussian_data():
    # The closed form is the ODE's solution: a fine ρAB run converges to it. (tAB would stall
    # near 2e-4 here: its last step, 0 → −1, integrates ε ∝ ρ ∝ √(t+1) with a polynomial in t.)
    assert gaussian_error("deis-rho", 3, steps=500) < 1e-6
    for variant in ("deis", "deis-rho"):
        e = [gaussian_error(variant, o) for o in range(4)]
        assert e[3] < e[1] < e[0] and e[2] < e[1], (variant, e)
    assert gaussian_error("pndm") < 0.2 * gaussian_error("ddim")
    assert gaussian_error("spndm") < gaussian_error("ddim")


def test_ode_samplers_converge_to_one_solution_and_ddpm_is_not_one():
    # ODE_SAMPLERS backs the study report's "where the samplers meet": from one x_T each of them
    # approaches the probability-flow ODE's solution (the Gaussian closed form above) as the steps
    # grow. Measured max errors at 10 → 50 → 250 steps (float64, deterministic): DDIM 0.40 →
    # 0.087 → 0.018, S-PNDM 0.17 → 0.0080 → 0.00033, the others below 0.04 at 10 steps.
    assert set(SAMPLERS) - set(ODE_SAMPLERS) == {"ddpm"}
    for sampler in ODE_SAMPLERS:
        e = [gaussian_error(sampler, steps=steps) for steps in (10, 50, 250)]
        assert e[2] < e[1] < e[0] and e[2] < 0.1 * e[0] and e[2] < 0.02, (sampler, e)
    # DDPM draws fresh noise at every step: two generators from the same x_T end far apart (1.8 measured)
    ddpm = [sample(gaussian_eps, GAUSS_X_T, SCHED, sampler="ddpm", steps=250,
                   generator=torch.Generator().manual_seed(g))[0]
            for g in (0, 1)]
    assert float((ddpm[0] - ddpm[1]).abs().max()) > 0.5


# -- NFE, grids and info ------------------------------------------------------------------
@pytest.mark.parametrize("sampler,extra", [("ddim", 0), ("ddpm", 0), ("pndm", 9), ("spndm", 1),
                                           ("deis", 0), ("deis-rho", 0)])
@pytest.mark.parametrize("S", [10, 20])
def test_nfe_counts_every_call_of_eps_fn(sampler, extra, S):
    calls = []
    eps_fn = lambda x, t: calls.append(t) or toy_eps(x, t)
    _, info = sample(eps_fn, randn(1, 1, 2, 2), SCHED, sampler=sampler, steps=S)
    assert info["nfe"] == len(calls) == S + extra
    assert all(t.shape == (1,) for t in calls)
    assert info["sampler"] == sampler and info["steps"] == S and info["grid"] == "uniform"


@pytest.mark.parametrize("S", [10, 20, 30, 50, 100, 1000])
def test_grids(S):
    x = randn(1, 1, 2, 2)
    for grid in ("uniform", "trailing"):
        _, info = sample(toy_eps, x, SCHED, steps=S, grid=grid)
        assert len(info["timesteps"]) == S + 1 and info["nfe"] == S
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = sample(toy_eps, x, SCHED, steps=S, grid="quad")
    walked = info["timesteps"]
    assert walked == sorted(set(walked), reverse=True) and walked[-1] == -1 and walked[0] <= 800
    assert (len(walked) - 1 < S) == (len(caught) == 1) and info["nfe"] == len(walked) - 1
    assert S < 50 or caught  # quad collapses points from S = 50 on


def test_explicit_grid_and_bad_grids():
    _, info = sample(toy_eps, randn(1, 1, 2, 2), SCHED, grid=[5, 500, 999])
    assert info["timesteps"] == [999, 500, 5, -1] and info["grid"] == "explicit"
    for bad in ([10, 10, 5], [1000, 5], [-3, 5], [], [2.5, 1]):
        with pytest.raises(UserError):
            sample(toy_eps, randn(1, 1, 2, 2), SCHED, grid=bad)
    with pytest.raises(UserError, match="<= 998"):  # legacy pairs t with ᾱ[t+1]
        sample(toy_eps, randn(1, 1, 2, 2), SCHED, grid="trailing", steps=10, legacy_pndm_index=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sampler="euler"), "ddim, ddpm, pndm, spndm, deis, deis-rho"),
    (dict(sampler="deis", order=4), "order"),
    (dict(sampler="ddim", eta=-0.1), "eta"),
    (dict(sampler="ddim", eta=5.0), "too large"),
    (dict(sampler="pndm", eta=0.5), "ddim"),
    (dict(sampler="pndm", steps=3), "at least 4"),
    (dict(sampler="spndm", steps=1), "at least 2"),
    (dict(steps=0), "steps"),
    (dict(grid="cosine"), "grid"),
])
def test_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        sample(toy_eps, randn(1, 1, 2, 2), SCHED, **kwargs)
    with pytest.raises(UserError, match=match):  # caught up front, before any network call
        check_options(SCHED, **kwargs)


def test_legacy_view_shifts_the_pairing():
    view = LegacyIndexView(SCHED)
    assert view.T == T - 1
    assert float(view.alpha_bar(-1)) == float(SCHED.alphas_cumprod[0])
    assert float(view.alpha_bar(499)) == float(SCHED.alphas_cumprod[500])
    assert float(view.alpha_bar_continuous(2.5)) == float(SCHED.alpha_bar_continuous(3.5))


# -- ε-scaling control ---------------------------------------------------------------------
def test_eps_scale_parsing():
    assert parse_eps_scale("1.005") == parse_eps_scale("const:1.005") == 1.005
    assert parse_eps_scale("skip:9,tau:0.99") == {"skip": 9, "tau": 0.99}
    assert parse_eps_scale(" skip=49 ") == {"skip": 49, "tau": 0.99}  # τ's default made explicit
    assert parse_eps_scale("skip:9,tau:0.99,variant:independent") == {"skip": 9, "tau": 0.99}
    assert parse_eps_scale("variant=shared, tau=0.5, skip=49") == {"skip": 49, "tau": 0.5, "variant": "shared"}
    assert parse_eps_scale("linear:1e-5,1.0025") == parse_eps_scale("linear = 0.00001, 1.0025") == {
        "linear": (1e-5, 1.0025)}
    assert parse_eps_scale("none") is None and parse_eps_scale("") is None
    for bad in ("abc", "skip:x", "tau:0.9", "skip:9,skip:3", "skip:9,foo:1", "skip:9;tau:1", "-1", "nan",
                "skip:0", "skip:9,tau:2", "skip:9,variant:both", "skip:9,variant:shared,variant:shared",
                "skip:9,tau:0.5,tau:0.5", "linear:1", "linear:1,2,3", "linear:x,1", "linear:1,inf", "linear:nan,1",
                "linear:0,0", "linear:1,-0.5", "linear:", "const:abc", "const:-2"):
        with pytest.raises(UserError, match="^eps_scale: ") as err:
            parse_eps_scale(bad)
        assert err.value.key == "eps_scale" and "\n" not in str(err.value)
    with pytest.raises(UserError, match="^eps_scale: variant given twice"):
        parse_eps_scale("skip:9,variant:shared,variant:independent")
    assert normalize_eps_scale((9, 0.99), T) == normalize_eps_scale("skip:9,tau:0.99", T) == ("skip", 9, 0.99)
    assert normalize_eps_scale((9, 0.99, "shared"), T) == normalize_eps_scale(
        {"skip": 9, "tau": 0.99, "variant": "shared"}, T) == ("skip", 9, 0.99, "shared")
    assert normalize_eps_scale({"linear": (-1e-4, 1.2)}, T) == normalize_eps_scale("linear:-1e-4,1.2", T) == (
        "linear", -1e-4, 1.2)
    for norm in (("const", 1.005), ("linear", 1e-5, 1.0), ("skip", 9, 0.99), ("skip", 9, 0.5, "shared")):
        assert normalize_eps_scale(norm, T) == norm  # a normalised spec is taken back as it is
    for bad in (0.0, -1.0, math.inf, True, {"skip": 0}, {"skip": 9, "tau": 0.0}, {"skip": 9, "tau": 1.5},
                {"skip": 9, "foo": 1}, [1, 2, 3], {"skip": 9, "variant": "both"}, (9, 0.99, "both"),
                {"linear": (1.0,)}, {"linear": (True, 1.0)}, {"linear": (1.0, 1.0), "skip": 9}, ("linear", 1.0),
                {"skip": T}):
        with pytest.raises(UserError, match="^eps_scale: "):
            normalize_eps_scale(bad, T)


def test_linear_eps_scale_must_stay_positive_on_every_t():
    # K·t + B > 0 on [0, T−1]: the bound is at t = T−1 for K < 0, known only with T
    assert normalize_eps_scale("linear:-1e-3,1", 1000) == ("linear", -1e-3, 1.0)  # 1 − 0.999 > 0
    for text, T_ in (("linear:-1e-3,1", 1001), ("linear:-1,1", 2), ("linear:-1,0.5", 2)):
        assert parse_eps_scale(text)  # without T only t = 0 is known to exist
        with pytest.raises(UserError, match=f"^eps_scale: .*at t = {T_ - 1} it is") as err:
            normalize_eps_scale(text, T_)
        assert err.value.key == "eps_scale"
    with pytest.raises(UserError, match="^eps_scale: "):
        check_options(SCHED, eps_scale="linear:-0.002,1")
    from s2dm.samplers import _eps_scaler  # its own check, for a caller that did not normalise with T
    with pytest.raises(UserError, match="^eps_scale: .*at t = 999"):
        _eps_scaler(("linear", -0.002, 1.0), SCHED)


AWKWARD = (1e-5, 1.0025, 0.1 + 0.2, 1 / 3, 2.0, 1e22, 1.5e-7, 123456.789, 5e-324)


def test_eps_scale_label_is_canonical_and_round_trips():
    expected = [
        ("1.005", "const:1.005"), ("const:1.005", "const:1.005"), (1.005, "const:1.005"), ("2", "const:2"),
        ("const:1e-05", "const:1e-5"), (1e22, "const:1e22"),
        ("const:0.30000000000000004", "const:0.30000000000000004"),  # :g would say 0.3
        ("skip:9,tau:0.99", "skip:9,tau:0.99"), ("skip=9", "skip:9,tau:0.99"), ((9, 0.99), "skip:9,tau:0.99"),
        ("tau:0.99,skip:9,variant:independent", "skip:9,tau:0.99"), ("skip:9,tau:1.0", "skip:9,tau:1"),
        ("skip:9,tau:0.99,variant:shared", "skip:9,tau:0.99,variant:shared"),
        ({"skip": 49, "tau": 0.5, "variant": "shared"}, "skip:49,tau:0.5,variant:shared"),
        ("linear:0.00001,1.0025", "linear:1e-5,1.0025"), ("linear:-0.0,1", "linear:0,1"),
        ("linear:-1e-4,1.2", "linear:-0.0001,1.2"), ({"linear": (1e-5, 1.0025)}, "linear:1e-5,1.0025"),
        (None, None), ("none", None),
    ]
    for spec, label in expected:
        assert eps_scale_label(spec) == label, spec
    texts = [text for text, _ in expected if isinstance(text, str)]
    texts += [f"const:{x!r}" for x in AWKWARD] + [f"linear:{x!r},{y!r}" for x in AWKWARD for y in AWKWARD[:3]]
    texts += [f"linear:{-x!r},{y!r}" for x in AWKWARD[:4] for y in AWKWARD[:2]]
    texts += [f"skip:{k},tau:{x!r}{v}" for k in (1, 9) for x in (0.99, 1 / 3, 1e-5) for v in ("", ",variant:shared")]
    for text in texts:
        label = eps_scale_label(text)
        assert parse_eps_scale(label) == parse_eps_scale(text), text  # the same numbers, bit for bit
        assert eps_scale_label(parse_eps_scale(label)) == label, text
        if label is not None:
            assert eps_scale_label(normalize_eps_scale(text)) == label and " " not in label
    with pytest.raises(UserError, match="^eps_scale: "):
        eps_scale_label("linear:0,0")


def test_constant_eps_scale_divides():
    x = randn(2, 1, 4, 4)
    ref, _ = sample(lambda x, t: toy_eps(x, t) / 1.005, x, SCHED, sampler="deis", steps=10)
    out, info = sample(toy_eps, x, SCHED, sampler="deis", steps=10, eps_scale="1.005")
    assert info["eps_scale"] == "const:1.005"
    assert torch.equal(out, ref)


@pytest.mark.parametrize("sampler,grid", [("deis", "uniform"), ("pndm", [999, 700, 401, 100, 20, 8, 5, 0])])
def test_linear_eps_scale_divides(sampler, grid):
    k, b = -2e-5, 1.017  # as Ning et al.'s linear schedules: larger at t = 0; PNDM: mid-points 849.5, …
    x = randn(2, 1, 4, 4)
    seen = []

    def manual(x, t):
        seen.append(float(t[0]))
        return toy_eps(x, t) / (k * t.to(F64) + b).view(-1, 1, 1, 1)

    ref, _ = sample(manual, x, SCHED, sampler=sampler, grid=grid)
    out, info = sample(toy_eps, x, SCHED, sampler=sampler, grid=grid, eps_scale=f"linear:{k},{b}")
    assert info["eps_scale"] == "linear:-2e-5,1.017"
    assert torch.equal(out, ref)
    assert (sampler == "pndm") == any(tt != int(tt) for tt in seen)  # half-integer t: the same formula
    assert not torch.equal(out, sample(toy_eps, x, SCHED, sampler=sampler, grid=grid, eps_scale=b)[0])


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "deis"])
def test_linear_with_zero_slope_is_the_constant(sampler):
    x = randn(2, 1, 4, 4)
    const, _ = sample(toy_eps, x, SCHED, sampler=sampler, steps=10, eps_scale="const:1.0025")
    linear, info = sample(toy_eps, x, SCHED, sampler=sampler, steps=10, eps_scale={"linear": (0, 1.0025)})
    assert info["eps_scale"] == "linear:0,1.0025" and torch.equal(linear, const)


def _alpha_skip(t, skip):
    return torch.prod(1 - SCHED.betas[t - skip + 1 : t + 1])


def _shrink(t, skip, tau):
    """τ/(τ+(1−τ)c²) from the α product itself (docs/method.md §3), 1 for t < skip."""
    if t < skip:
        return 1.0
    alpha_skip = _alpha_skip(t, skip)
    c2 = (1 - alpha_skip) / alpha_skip
    return float(tau / (tau + (1 - tau) * c2))


def _shared(t, skip, tau):
    """(τ + (1−τ)c)/(τ + (1−τ)c²), c = √((1−α_skip)/α_skip) (docs/method.md §3), 1 for t < skip."""
    if t < skip:
        return 1.0
    c = math.sqrt((1 - float(_alpha_skip(t, skip))) / float(_alpha_skip(t, skip)))
    return (tau + (1 - tau) * c) / (tau + (1 - tau) * c * c)


@pytest.mark.parametrize("variant", ["independent", "shared"])
@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_skip_shrink_multiplies_by_the_factor(sampler, variant):
    grid = [999, 700, 401, 100, 20, 8, 5, 0]  # PNDM mid-points 849.5, 550.5, 250.5
    x = randn(2, 1, 4, 4)
    by_hand = _shared if variant == "shared" else _shrink

    def manual(x, t):  # factor at the nearest integer is exact at grid points; mid-points interpolate
        tt = float(t[0])
        if tt == int(tt):
            f = by_hand(int(tt), 9, 0.99)
        else:
            f = float(SCHED.shrink_factor(torch.tensor(tt, dtype=F64), 9, 0.99, variant))
        return toy_eps(x, t) * f

    spec = {"skip": 9, "tau": 0.99, "variant": variant}
    ref, _ = sample(manual, x, SCHED, sampler=sampler, grid=grid)
    out, info = sample(toy_eps, x, SCHED, sampler=sampler, grid=grid, eps_scale=spec)
    assert info["eps_scale"] == "skip:9,tau:0.99" + (",variant:shared" if variant == "shared" else "")
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    assert not torch.equal(out, sample(toy_eps, x, SCHED, sampler=sampler, grid=grid)[0])


def test_skip_shrink_factor_values():
    t = torch.arange(T)
    f = SCHED.shrink_factor(t, 9, 0.99)
    assert torch.equal(f[:9], torch.ones(9, dtype=F64))
    assert all(float(f[k]) == pytest.approx(_shrink(k, 9, 0.99), rel=1e-13) for k in (9, 10, 500, 999))
    assert float(f[999]) == pytest.approx(0.998, abs=2e-4)
    assert float(SCHED.shrink_factor(999, 49, 0.99)) == pytest.approx(0.984, abs=5e-4)
    assert bool((f[10:] < f[9:-1]).all())  # shrinks more as t grows
    mid = float(SCHED.shrink_factor(torch.tensor(500.5, dtype=F64), 9, 0.99))
    assert float(f[501]) < mid < float(f[500])
    assert torch.equal(SCHED.shrink_factor(t, 9, 0.99, "independent"), f)  # the default variant
    with pytest.raises(ConfigError, match="variant"):
        SCHED.shrink_factor(t, 9, 0.99, "both")


def test_shared_factor_values():
    t = torch.arange(T)
    f = SCHED.shrink_factor(t, 9, 0.99, "shared")
    assert f.dtype == F64 and torch.equal(f[:9], torch.ones(9, dtype=F64))
    for skip, tau in ((9, 0.99), (49, 0.5), (1, 0.9)):
        g = SCHED.shrink_factor(t, skip, tau, "shared")
        assert all(float(g[k]) == pytest.approx(_shared(k, skip, tau), rel=1e-13)
                   for k in (skip, skip + 1, 181, 500, 724, 725, 999))
    # > 1 exactly where c_t < 1: for skip 9 that is every t ≥ 9 (docs/method.md §3's table) …
    assert bool((f[9:] > 1).all()) and float(f[999]) == pytest.approx(1.00249, abs=1e-5)
    assert float(f.max()) == float(f[999])
    # … for skip 49, c_t reaches 1 between t = 724 and 725, and the factor drops below 1 after
    g = SCHED.shrink_factor(t, 49, 0.99, "shared")
    c = torch.tensor([math.sqrt((1 - float(_alpha_skip(k, 49))) / float(_alpha_skip(k, 49))) for k in range(49, T)],
                     dtype=F64)
    assert torch.equal(g[49:] > 1, c < 1) and bool(c[724 - 49] < 1 < c[725 - 49])
    # its largest value, (1+c)/(1+c²) at τ = 1/2, is √2/(4−2√2) = (1+√2)/2 at c = √2 − 1
    assert float(SCHED.shrink_factor(t, 49, 0.5, "shared").max()) == pytest.approx((1 + math.sqrt(2)) / 2, rel=1e-5)
    mid = float(SCHED.shrink_factor(torch.tensor(500.5, dtype=F64), 9, 0.99, "shared"))
    assert float(f[500]) < mid < float(f[501])  # grows with t, interpolated between


def test_folder_name_uses_the_label():
    from s2dm.samplers.options import SampleOptions

    name = lambda spec: SampleOptions("ddim", 10, eps_scale=spec).folder_name()  # noqa: E731
    assert name("1.005") == name("const:1.005") == name(1.005) == "ddim-10-epsconst_1.005"
    assert name("skip:9") == name("skip=9,tau=0.99,variant=independent") == "ddim-10-epsskip_9_tau_0.99"
    assert name("skip:9,tau:0.99,variant:shared") == "ddim-10-epsskip_9_tau_0.99_variant_shared"
    assert name("linear:1e-5,1") == "ddim-10-epslinear_1em5_1"  # "-" → "m": the sign is kept
    assert len({name("linear:-1e-5,1"), name("linear:1e-5,1"), name("linear:1e5,1")}) == 3
    assert name(None) == "ddim-10"
    help_text = SampleOptions.__dataclass_fields__["eps_scale"].metadata["help"]
    assert all(form in help_text for form in ("const:B", "linear:K,B", "skip:9,tau:0.99", "variant:shared"))


# -- determinism, dtype, device ------------------------------------------------------------
def test_stochastic_samplers_are_seeded_by_the_generator():
    for sampler, eta in (("ddim", 0.5), ("ddpm", 0.0)):
        run = lambda seed: sample(toy_eps, randn(2, 1, 4, 4), SCHED, sampler=sampler, steps=10, eta=eta,
                                  generator=torch.Generator().manual_seed(seed))[0]
        assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


@pytest.mark.parametrize("device", ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_are_kept(device, dtype):
    # "meta" tensors refuse to mix with CPU tensors or be read back, so passing there shows
    # that no sampler touches a fixed device or syncs with the host inside the loop.
    x = torch.zeros(2, 1, 4, 4, dtype=dtype, device=device)
    eps_fn = lambda x, t: torch.tanh(x.double() + t.double().reshape(-1, 1, 1, 1) / 1000)  # float64 out
    for sampler, order in ALL_RUNS + [("ddpm", 3)]:
        for eps_scale in (None, "skip:9,tau:0.99", "skip:9,tau:0.99,variant:shared", "linear:1e-5,1"):
            out, _ = sample(eps_fn, x, SCHED, sampler=sampler, steps=40, order=order, eps_scale=eps_scale)
            assert out.dtype == dtype and out.device.type == device and out.shape == x.shape


class RowNoise:
    """A generator stand-in with ``randn_like`` (the interface of s2dm.core.seeds.PerSeedNoise)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.calls = 0

    def randn_like(self, x):
        self.calls += 1
        return torch.randn(x.shape, generator=self.g, dtype=x.dtype)


def test_duck_typed_generator_and_inference_tensors():
    def eps_fn(x, t):  # as s2dm.samplers.generate.model_eps_fn: the network runs in inference mode
        with torch.inference_mode():
            return toy_eps(x, t)

    noise = RowNoise(4)
    out, _ = sample(eps_fn, randn(2, 1, 4, 4), SCHED, sampler="ddpm", steps=10, generator=noise)
    ref, _ = sample(toy_eps, randn(2, 1, 4, 4), SCHED, sampler="ddpm", steps=10,
                    generator=torch.Generator().manual_seed(4))
    assert noise.calls == 9 and torch.equal(out, ref)  # no draw on the σ = 0 last step
    for sampler, order in ALL_RUNS:
        sample(eps_fn, randn(2, 1, 4, 4), SCHED, sampler=sampler, order=order, eps_scale="skip:9,tau:0.99")


def test_progress_and_cache(capsys):
    deis_coefficients.cache_clear()
    for _ in range(2):
        sample(toy_eps, randn(1, 1, 2, 2), SCHED, sampler="deis", steps=10, progress=True)
    assert deis_coefficients.cache_info().misses == 1  # coefficients once per (grid, order)
    assert "deis: 10/10 NFE" in capsys.readouterr().err
    assert set(SAMPLERS) == {"ddim", "ddpm", "pndm", "spndm", "deis", "deis-rho"}


@pytest.mark.parametrize("eta", [None, "0.5", "abc", True])
def test_a_ddim_eta_that_is_not_a_number_is_a_sampler_error(eta):
    from s2dm.errors import SamplerError

    with pytest.raises(SamplerError, match=rf"^eta: expected a number, got {re.escape(repr(eta))}$"):
        check_options(SCHED, sampler="ddim", steps=10, eta=eta)
