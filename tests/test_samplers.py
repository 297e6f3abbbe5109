"""Properties of s2dm.samplers: exactness, NFE, grids, errors, ε-scaling, DEIS accuracy."""
import math
import warnings

import pytest
import torch

from s2dm.errors import UserError
from s2dm.samplers import (
    SAMPLERS, LegacyIndexView, check_options, deis_coefficients, normalize_eps_scale, parse_eps_scale, sample,
    timestep_grid,
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
def test_higher_order_is_more_accurate_on_gaussian_data():
    # Data N(0, s²I): x_t ~ N(0, (ᾱs² + 1 − ᾱ)I), so E[ε | x_t] = √(1−ᾱ)·x/(ᾱs² + 1 − ᾱ). In
    # v = x/√ᾱ, ρ = √((1−ᾱ)/ᾱ) the ODE dv/dρ = ε becomes dv/dρ = v·ρ/(s² + ρ²), hence
    # v ∝ √(s² + ρ²) and x_0 = x_T·s/√(ᾱ_T s² + 1 − ᾱ_T).
    sd = 0.5
    eps_fn = lambda x, t: x * (1 - abar_c(t, x)).sqrt() / (abar_c(t, x) * sd**2 + 1 - abar_c(t, x))
    x_T = randn(4, 1, 8, 8, seed=7)

    def error(sampler, order=3, steps=10):
        out, info = sample(eps_fn, x_T, SCHED, sampler=sampler, steps=steps, order=order)
        ab = SCHED.alpha_bar(info["timesteps"][0])
        return float((out - x_T * sd / (ab * sd**2 + 1 - ab).sqrt()).abs().max())

    # The closed form is the ODE's solution: a fine ρAB run converges to it. (tAB would stall
    # near 2e-4 here: its last step, 0 → −1, integrates ε ∝ ρ ∝ √(t+1) with a polynomial in t.)
    assert error("deis-rho", 3, steps=500) < 1e-6
    for variant in ("deis", "deis-rho"):
        e = [error(variant, o) for o in range(4)]
        assert e[3] < e[1] < e[0] and e[2] < e[1], (variant, e)
    assert error("pndm") < 0.2 * error("ddim")
    assert error("spndm") < error("ddim")


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
    assert parse_eps_scale(" skip=49 ") == {"skip": 49}
    assert parse_eps_scale("none") is None and parse_eps_scale("") is None
    for bad in ("abc", "skip:x", "tau:0.9", "skip:9,skip:3", "skip:9,foo:1", "skip:9;tau:1", "-1", "nan",
                "skip:0", "skip:9,tau:2"):
        with pytest.raises(UserError):
            parse_eps_scale(bad)
    assert normalize_eps_scale((9, 0.99), T) == normalize_eps_scale("skip:9,tau:0.99", T) == ("skip", 9, 0.99)
    for bad in (0.0, -1.0, math.inf, True, {"skip": 0}, {"skip": 9, "tau": 0.0}, {"skip": 9, "tau": 1.5},
                {"skip": 9, "foo": 1}, [1, 2, 3]):
        with pytest.raises(UserError):
            normalize_eps_scale(bad, T)


def test_constant_eps_scale_divides():
    x = randn(2, 1, 4, 4)
    ref, _ = sample(lambda x, t: toy_eps(x, t) / 1.005, x, SCHED, sampler="deis", steps=10)
    out, info = sample(toy_eps, x, SCHED, sampler="deis", steps=10, eps_scale="1.005")
    assert info["eps_scale"] == "const:1.005"
    assert torch.equal(out, ref)


def _shrink(t, skip, tau):
    """τ/(τ+(1−τ)c²) from the α product itself (docs/method.md §3), 1 for t < skip."""
    if t < skip:
        return 1.0
    alpha_skip = torch.prod(1 - SCHED.betas[t - skip + 1 : t + 1])
    c2 = (1 - alpha_skip) / alpha_skip
    return float(tau / (tau + (1 - tau) * c2))


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_skip_shrink_multiplies_by_the_factor(sampler):
    grid = [999, 700, 401, 100, 20, 8, 5, 0]  # PNDM mid-points 849.5, 550.5, 250.5
    x = randn(2, 1, 4, 4)

    def manual(x, t):  # factor at the nearest integer is exact at grid points; mid-points interpolate
        tt = float(t[0])
        if tt == int(tt):
            f = _shrink(int(tt), 9, 0.99)
        else:
            f = float(SCHED.shrink_factor(torch.tensor(tt, dtype=F64), 9, 0.99))
        return toy_eps(x, t) * f

    ref, _ = sample(manual, x, SCHED, sampler=sampler, grid=grid)
    out, info = sample(toy_eps, x, SCHED, sampler=sampler, grid=grid, eps_scale={"skip": 9, "tau": 0.99})
    assert info["eps_scale"] == "skip-shrink:skip=9,tau=0.99"
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
        for eps_scale in (None, "skip:9,tau:0.99"):
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
