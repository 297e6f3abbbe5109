"""Losses against hand computations in float64 with injected noise (docs/method.md §2)."""
import numpy as np
import pytest
import torch

from s2dm.core.losses import l0_loss, skip_step_loss
from s2dm.errors import ConfigError
from s2dm.core.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear()


class Toy(torch.nn.Module):
    """ε_θ(x, t) = w·x + b·t/1000, with a call counter."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(-0.3, dtype=torch.float64))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.w * x + self.b * (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)


def data(t_list, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(t_list)
    x0 = torch.randn(n, 1, 3, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, 3, 2, generator=g, dtype=torch.float64)
    eps2 = torch.randn(n, 1, 3, 2, generator=g, dtype=torch.float64)
    return x0, torch.tensor(t_list), eps, eps2


def by_hand(x0, t, eps, eps_prime, skip, tau, reduction, loss_type):
    """Per-sample loss written out with numpy from the definitions."""
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas = 1 - betas
    out = []
    for i, ti in enumerate(t.tolist()):
        abar = np.prod(alphas[: ti + 1])
        xt = np.sqrt(abar) * x0[i].numpy() + np.sqrt(1 - abar) * eps[i].numpy()
        pred = 0.7 * xt - 0.3 * ti / 1000
        red = np.mean if reduction == "mean" else np.sum
        l0 = red((eps[i].numpy() - pred) ** 2)
        if loss_type == "l0" or ti < skip:
            out.append(l0)
            continue
        a_skip = np.prod(alphas[ti - skip + 1: ti + 1])
        c = np.sqrt((1 - a_skip) / a_skip)
        lskip = red((eps_prime[i].numpy() - c * pred) ** 2)
        out.append(tau * l0 + (1 - tau) * lskip)
    return np.array(out)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_l0_matches_hand_computation(reduction):
    x0, t, eps, _ = data([0, 5, 400, 999])
    loss, terms = l0_loss(Toy(), x0, t, SCHED, noise=eps, reduction=reduction, return_terms=True)
    expected = by_hand(x0, t, eps, None, 9, 0.99, reduction, "l0")
    np.testing.assert_allclose(terms["loss"].numpy(), expected, rtol=1e-12)
    assert loss.item() == pytest.approx(expected.mean(), rel=1e-12)


def test_sum_is_mean_times_pixels():
    x0, t, eps, eps2 = data([3, 50, 700])
    m = skip_step_loss(Toy(), x0, t, SCHED, noise=eps, skip_noise=eps2, reduction="mean")
    s = skip_step_loss(Toy(), x0, t, SCHED, noise=eps, skip_noise=eps2, reduction="sum")
    assert s.item() == pytest.approx(6 * m.item(), rel=1e-12)


@pytest.mark.parametrize("skip,tau", [(9, 0.99), (1, 0.5), (49, 0.9)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_skip_step_independent_matches_hand_computation(skip, tau, reduction):
    x0, t, eps, eps2 = data([0, 8, 9, 10, 48, 49, 500, 999], seed=skip)
    model = Toy()
    loss, terms = skip_step_loss(model, x0, t, SCHED, skip=skip, tau=tau, noise=eps, skip_noise=eps2,
                                 reduction=reduction, return_terms=True)
    expected = by_hand(x0, t, eps, eps2, skip, tau, reduction, "s2")
    np.testing.assert_allclose(terms["loss"].numpy(), expected, rtol=1e-12)
    assert loss.item() == pytest.approx(expected.mean(), rel=1e-12)
    assert model.calls == 1  # one network evaluation for both terms


def test_shared_variant_uses_the_same_noise():
    x0, t, eps, eps2 = data([2, 30, 999])
    loss = skip_step_loss(Toy(), x0, t, SCHED, noise=eps, skip_noise=eps2, variant="shared")
    expected = by_hand(x0, t, eps, eps, 9, 0.99, "mean", "s2")
    assert loss.item() == pytest.approx(expected.mean(), rel=1e-12)
    other = skip_step_loss(Toy(), x0, t, SCHED, noise=eps, skip_noise=eps2, variant="independent")
    assert abs(other.item() - loss.item()) > 1e-6


def test_below_skip_the_loss_is_l0():
    x0, t, eps, eps2 = data([0, 1, 5, 8])
    s2 = skip_step_loss(Toy(), x0, t, SCHED, skip=9, noise=eps, skip_noise=eps2)
    l0 = l0_loss(Toy(), x0, t, SCHED, noise=eps)
    assert s2.item() == l0.item()


def test_tau_one_is_l0_and_skip_noise_from_generator_is_reproducible():
    x0, t, eps, _ = data([20, 300, 999])
    assert skip_step_loss(Toy(), x0, t, SCHED, tau=1.0, noise=eps).item() == pytest.approx(
        l0_loss(Toy(), x0, t, SCHED, noise=eps).item(), rel=1e-12)
    a = skip_step_loss(Toy(), x0.float(), t, SCHED, noise=eps.float(), generator=torch.Generator().manual_seed(3))
    b = skip_step_loss(Toy().float(), x0.float(), t, SCHED, noise=eps.float(), generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


def test_gradients_flow_to_parameters():
    x0, t, eps, eps2 = data([10, 500, 999])
    model = Toy()
    skip_step_loss(model, x0, t, SCHED, noise=eps, skip_noise=eps2).backward()
    assert model.w.grad is not None and model.w.grad.abs() > 0 and model.b.grad.abs() > 0


def test_shrink_factor_is_the_optimum_of_the_independent_loss():
    """With E[ε′] = 0, the gradient of E[L] vanishes at ε_θ = ε·τ/(τ + (1−τ)c²)."""
    t = torch.tensor([9, 100, 999])
    f = SCHED.shrink_factor(t, 9, 0.99)
    eps = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pred = torch.nn.Parameter(eps * f.view(-1, 1, 1, 1))
    model = lambda x, tt: pred  # noqa: E731 - the prediction itself is the parameter
    loss = skip_step_loss(model, torch.zeros_like(eps), t, SCHED, noise=eps, skip_noise=torch.zeros_like(eps))
    loss.backward()
    assert pred.grad.abs().max().item() < 1e-12
    assert SCHED.shrink_factor(torch.tensor([8]), 9, 0.99).item() == 1.0


def test_shrink_factor_values_quoted_in_method():
    assert SCHED.shrink_factor(torch.tensor([999]), 9, 0.99).item() == pytest.approx(0.998, abs=5e-4)
    assert SCHED.shrink_factor(torch.tensor([999]), 49, 0.99).item() == pytest.approx(0.984, abs=1e-3)


def test_bad_arguments_raise():
    x0, t, eps, _ = data([10])
    # ConfigError: the same checks as the config's loss.variant, loss.tau, loss.skip, loss.reduction
    with pytest.raises(ConfigError):
        skip_step_loss(Toy(), x0, t, SCHED, variant="other")
    with pytest.raises(ConfigError):
        skip_step_loss(Toy(), x0, t, SCHED, tau=1.5)
    with pytest.raises(ConfigError):
        skip_step_loss(Toy(), x0, t, SCHED, skip=0)
    with pytest.raises(ConfigError):
        l0_loss(Toy(), x0, t, SCHED, reduction="median")
