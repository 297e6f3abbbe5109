"""s2dm's samplers against independent references, to float64 round-off (docs/method.md §5).

1. diffusers' DDIM and PNDM schedulers (skipped without diffusers), with docs/method.md §5's
   recipes plus one step: diffusers 0.42 builds ``betas`` as float32 even from
   ``trained_betas`` (``torch.tensor(trained_betas, dtype=torch.float32)``), so its ᾱ would
   carry ~1e-7 relative error and hide index mistakes behind a loose tolerance. We overwrite
   its β/α/ᾱ tables (and ``final_alpha_cumprod``) with our float64 ones; everything else
   (grids, mid-points, update formulas, multistep bookkeeping) is diffusers' own code.
2. Transliterations of the published update rules, written here from the papers' and the
   authors' code's loops: the DDIM repo's ``generalized_steps`` (quad grid, η ≥ 0), DDPM's
   Algorithm 2, and the PNDM code's S-PNDM / F-PNDM loops with its ``transfer`` formula.
3. DEIS coefficients against the EI integrals computed another way (integration by parts
   and Simpson's rule in t; closed-form polynomial integrals in ρ).
"""
import math
import warnings

import numpy as np
import pytest
import torch

from s2dm.core.schedule import NoiseSchedule
from s2dm.samplers import deis_coefficients, sample, timestep_grid

T = 1000
SCHED = NoiseSchedule.linear(T)
TOL = dict(rtol=1e-11, atol=1e-11)


def toy_eps(x, t):
    """Deterministic, nonlinear, t-dependent stand-in for ε_θ (float64): an index slip shows."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
    a = 0.6 + 0.5 * torch.cos(t / 173.0)
    b = 0.2 * torch.sin(t / 61.0)
    return torch.tanh(x * a) + b


def x_T(seed=0):
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def recording(fn, log):
    def wrapped(x, t):
        log.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return fn(x, t)

    return wrapped


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def float64_tables(scheduler, final_alpha_cumprod):
    scheduler.betas = SCHED.betas.clone()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = SCHED.alphas_cumprod.clone()
    scheduler.final_alpha_cumprod = torch.as_tensor(final_alpha_cumprod, dtype=torch.float64)
    return scheduler


def ddim_scheduler(diffusers):
    s = diffusers.DDIMScheduler(
        num_train_timesteps=T, trained_betas=SCHED.betas.numpy(), clip_sample=False,
        set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
    )
    return float64_tables(s, 1.0)


def pndm_scheduler(diffusers, legacy):
    s = diffusers.PNDMScheduler(
        num_train_timesteps=T, trained_betas=SCHED.betas.numpy(), skip_prk_steps=False,
        set_alpha_to_one=not legacy, steps_offset=1 if legacy else 0, timestep_spacing="leading",
    )
    return float64_tables(s, SCHED.alphas_cumprod[0] if legacy else 1.0)


@pytest.mark.parametrize("S", [10, 20, 50])
def test_ddim_eta0_matches_diffusers(diffusers, S):
    sched = ddim_scheduler(diffusers)
    sched.set_timesteps(S)
    x = x_T()
    for t in sched.timesteps:
        x = sched.step(toy_eps(x, t), t, x, eta=0.0).prev_sample
    ours, info = sample(toy_eps, x_T(), SCHED, sampler="ddim", steps=S, grid="uniform")
    assert info["timesteps"][:-1] == sched.timesteps.tolist()
    assert info["nfe"] == S
    torch.testing.assert_close(ours, x, **TOL)


@pytest.mark.parametrize("S", [10, 50])
def test_ddim_eta_positive_matches_diffusers_with_injected_noise(diffusers, S):
    eta = 0.7
    ours, _ = sample(toy_eps, x_T(), SCHED, sampler="ddim", steps=S, eta=eta,
                     generator=torch.Generator().manual_seed(5))
    # s2dm draws one randn(x.shape) per step with σ > 0: every step except the last (σ = 0).
    g = torch.Generator().manual_seed(5)
    sched = ddim_scheduler(diffusers)
    sched.set_timesteps(S)
    x = x_T()
    for i, t in enumerate(sched.timesteps):
        z = torch.randn(x.shape, dtype=x.dtype, generator=g) if i < S - 1 else torch.zeros_like(x)
        x = sched.step(toy_eps(x, t), t, x, eta=eta, variance_noise=z).prev_sample
    torch.testing.assert_close(ours, x, **TOL)


@pytest.mark.parametrize("S", [10, 20, 50])
def test_fpndm_matches_diffusers_prk(diffusers, S):
    assert (T // S) % 2 == 0  # diffusers' mid-point t − (T//S)//2 equals (t+s)/2 only then
    sched = pndm_scheduler(diffusers, legacy=False)
    sched.set_timesteps(S)
    theirs_calls, ours_calls = [], []
    eps = recording(toy_eps, theirs_calls)
    x = x_T(1)
    for t in sched.timesteps:
        x = sched.step(eps(x, t), t, x).prev_sample
    ours, info = sample(recording(toy_eps, ours_calls), x_T(1), SCHED, sampler="pndm", steps=S)
    assert info["nfe"] == S + 9 == len(sched.timesteps)
    assert ours_calls == theirs_calls
    torch.testing.assert_close(ours, x, **TOL)


@pytest.mark.parametrize("S", [10, 20, 50])
def test_fpndm_legacy_index_matches_diffusers_offset_one(diffusers, S):
    # Why this recipe is the legacy convention: with steps_offset=1 diffusers' timesteps are
    # τ = t + 1 for the PNDM code's model times t ∈ {0, T/S, …}, and diffusers pairs τ with
    # ᾱ[τ] — i.e. model time t with ᾱ[t+1]. Its mid-points τ − T/S/2 are t+1 − T/S/2, i.e. the
    # model's (t+s)/2 shifted by one as well, and the last step (τ − T/S < 0) lands on
    # final_alpha_cumprod = ᾱ[0] because set_alpha_to_one=False. So calling the model with
    # τ − 1 reproduces "model sees t, schedule says ᾱ[t+1], end at ᾱ[0]" exactly.
    sched = pndm_scheduler(diffusers, legacy=True)
    sched.set_timesteps(S)
    theirs_calls, ours_calls = [], []
    eps = recording(toy_eps, theirs_calls)
    x = x_T(2)
    for t in sched.timesteps:
        x = sched.step(eps(x, t - 1), t, x).prev_sample
    ours, info = sample(recording(toy_eps, ours_calls), x_T(2), SCHED, sampler="pndm", steps=S,
                        legacy_pndm_index=True)
    assert info["legacy_pndm_index"] is True
    assert ours_calls == theirs_calls
    torch.testing.assert_close(ours, x, **TOL)
    # and it really is a different convention: the non-legacy run differs by far more.
    plain, _ = sample(toy_eps, x_T(2), SCHED, sampler="pndm", steps=S)
    assert (plain - x).abs().max() > 1e-4


def test_diffusers_builds_float32_betas(diffusers):
    """Guards the reason for ``float64_tables``: if diffusers keeps float64 one day, drop it."""
    s = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=SCHED.betas.numpy())
    assert s.alphas_cumprod.dtype == torch.float32


# -- transliterations of the published loops ---------------------------------------------
ABAR_EXT = torch.cat([torch.ones(1, dtype=torch.float64), SCHED.alphas_cumprod])  # [t+1] ↔ ᾱ_t


def abar(t):
    """ᾱ at integer or half-integer t (piecewise-linear between integers), ᾱ(−1) = 1."""
    lo = math.floor(t)
    frac = t - lo
    return ABAR_EXT[lo + 1] * (1 - frac) + (ABAR_EXT[lo + 2] * frac if frac else 0.0)


def ddim_repo_steps(x, seq, model, eta=0.0, generator=None):
    """The DDIM repo's generalized_steps: seq ascending, seq_next = [-1] + seq[:-1]; its
    compute_alpha pads β with a leading 0 so index t+1 gives ᾱ_t. It draws randn every step."""
    seq_next = [-1] + list(seq[:-1])
    for i, j in zip(reversed(seq), reversed(seq_next)):
        at, at_next = ABAR_EXT[i + 1], ABAR_EXT[j + 1]
        et = model(x, torch.full((x.shape[0],), i))
        x0_t = (x - et * (1 - at).sqrt()) / at.sqrt()
        c1 = eta * ((1 - at / at_next) * (1 - at_next) / (1 - at)).sqrt()
        c2 = ((1 - at_next) - c1**2).sqrt()
        noise = torch.randn(x.shape, dtype=x.dtype, generator=generator) if eta > 0 else 0.0
        x = at_next.sqrt() * x0_t + c1 * noise + c2 * et
    return x


@pytest.mark.parametrize("S", [10, 20, 50])
def test_ddim_quad_matches_ddim_repo(S):
    seq = [int(v) for v in (np.linspace(0, np.sqrt(T * 0.8), S) ** 2)]
    ref = ddim_repo_steps(x_T(3), seq, toy_eps)
    # At S = 50 the int cast gives 0 twice. The repo then walks a 0 → 0 step, which is the
    # identity (ᾱ_t = ᾱ_s) but costs an NFE; s2dm drops the duplicate and warns.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, info = sample(toy_eps, x_T(3), SCHED, sampler="ddim", steps=S, grid="quad")
    assert info["timesteps"] == sorted(set(seq), reverse=True) + [-1]
    assert info["nfe"] == len(set(seq)) == S - (S == 50)
    assert len(caught) == (S == 50)
    torch.testing.assert_close(ours, ref, **TOL)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_positive_matches_ddim_repo_with_same_noise(eta):
    seq = list(range(0, T, T // 10))
    ref = ddim_repo_steps(x_T(4), seq, toy_eps, eta, torch.Generator().manual_seed(9))
    ours, _ = sample(toy_eps, x_T(4), SCHED, sampler="ddim", steps=10, eta=eta,
                     generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, ref, **TOL)


def test_ddpm_full_chain_matches_algorithm_2():
    """DDPM Algorithm 2 with σ_t² = β̃_t: x_{t−1} = (x_t − β_t/√(1−ᾱ_t)·ε)/√α_t + σ_t·z."""
    g = torch.Generator().manual_seed(11)
    x = x_T(5)[:1]
    for t in range(T - 1, -1, -1):
        beta, at, at_prev = SCHED.betas[t], ABAR_EXT[t + 1], ABAR_EXT[t]
        eps = toy_eps(x, torch.tensor([t]))
        x_new = (x - beta / (1 - at).sqrt() * eps) / (1 - beta).sqrt()
        if t > 0:
            sigma = ((1 - at_prev) / (1 - at) * beta).sqrt()
            x_new = x_new + sigma * torch.randn(x.shape, dtype=x.dtype, generator=g)
        x = x_new
    ours, info = sample(toy_eps, x_T(5)[:1], SCHED, sampler="ddpm", steps=T,
                        generator=torch.Generator().manual_seed(11))
    assert info["nfe"] == T
    torch.testing.assert_close(ours, x, **TOL)


def transfer(x, t, s, et):
    """PNDM's transfer φ(x, ε, t→s), docs/method.md §5's formula term by term."""
    at, an = abar(t), abar(s)
    return x + (an - at) * (
        x / (at.sqrt() * (at.sqrt() + an.sqrt()))
        - et / (at.sqrt() * (((1 - an) * at).sqrt() + ((1 - at) * an).sqrt()))
    )


def pndm_code_loop(x, walked, model, method):
    """The PNDM code's gen_order_2 (S-PNDM) / gen_order_4 (F-PNDM) loops, our index convention."""
    call = lambda y, t: model(y, torch.full((y.shape[0],), t, dtype=torch.float64))
    ets = []
    for t, s in zip(walked[:-1], walked[1:]):
        if method == "spndm" and ets:
            ets.append(call(x, t))
            et = 0.5 * (3 * ets[-1] - ets[-2])
        elif method == "spndm":  # improved Euler
            e_1 = call(x, t)
            ets.append(e_1)
            e_2 = call(transfer(x, t, s, e_1), s)
            et = (e_1 + e_2) / 2
        elif len(ets) > 2:
            ets.append(call(x, t))
            et = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        else:  # pseudo Runge–Kutta
            m = (t + s) / 2
            e_1 = call(x, t)
            ets.append(e_1)
            e_2 = call(transfer(x, t, m, e_1), m)
            e_3 = call(transfer(x, t, m, e_2), m)
            e_4 = call(transfer(x, t, s, e_3), s)
            et = (1 / 6) * (e_1 + 2 * e_2 + 2 * e_3 + e_4)
        x = transfer(x, t, s, et)
    return x


@pytest.mark.parametrize("method", ["spndm", "pndm"])
@pytest.mark.parametrize("S,grid", [(10, "uniform"), (40, "uniform"), (10, "quad"), (10, "trailing")])
def test_pndm_matches_pndm_code_loops(method, S, grid):
    # S = 40 has odd steps of 25: F-PNDM's mid-points are half-integers (diffusers can't say).
    ours, info = sample(toy_eps, x_T(6), SCHED, sampler=method, steps=S, grid=grid)
    ref = pndm_code_loop(x_T(6), info["timesteps"], toy_eps, method)
    torch.testing.assert_close(ours, ref, **TOL)


# -- DEIS coefficients against quadrature done another way ----------------------------------
def _simpson_rho_integral(p, dp, t, s):
    """∫_t^s p dρ = p(s)ρ(s) − p(t)ρ(t) + ∫_s^t p′ρ dτ; Simpson after τ = k + u² per unit."""
    rho = lambda tau: ((1 - SCHED.alpha_bar_continuous(tau)) / SCHED.alpha_bar_continuous(tau)).sqrt()
    u = torch.linspace(0, 1, 201, dtype=torch.float64)
    w = torch.ones(201, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    tau = torch.arange(s, t, dtype=torch.float64)[:, None] + u**2
    inner = (dp(tau) * rho(tau) * 2 * u * w / 600).sum()
    return p(s) * rho(torch.tensor(float(s))) - p(t) * rho(torch.tensor(float(t))) + inner


@pytest.mark.parametrize("grid", ["uniform", "quad"])
def test_deis_coefficients_integrate_polynomials_exactly(grid):
    """Σ_j C_j·p(node_j) = √ᾱ_s·∫ p dρ for deg p ≤ the step's order (tAB: in t, ρAB: in ρ)."""
    walked = timestep_grid(grid, 10, T)
    times = walked.tolist()
    abar = SCHED.alpha_bar(walked)
    rho = ((1 - abar) / abar).sqrt()
    tab = deis_coefficients(SCHED, tuple(times), 3, "t")
    rab = deis_coefficients(SCHED, tuple(times), 3, "rho")
    for i in range(1, len(times) - 1):
        k = min(3, i)
        for m in range(k + 1):
            p = lambda tau: ((torch.as_tensor(tau, dtype=torch.float64) - 450) / 450) ** m
            dp = lambda tau: m * ((tau - 450) / 450) ** max(m - 1, 0) / 450
            exact = abar[i + 1].sqrt() * _simpson_rho_integral(p, dp, times[i], times[i + 1])
            got = sum(c * p(times[i - j]) for j, c in enumerate(tab[i][1]))
            assert float(got) == pytest.approx(float(exact), rel=1e-8, abs=1e-12)
            exact = abar[i + 1].sqrt() * (rho[i + 1] ** (m + 1) - rho[i] ** (m + 1)) / (m + 1)
            got = sum(c * rho[i - j] ** m for j, c in enumerate(rab[i][1]))
            assert float(got) == pytest.approx(float(exact), rel=1e-11)
