import math
import re
import warnings

import numpy as np
import pytest
import torch

from s2dm.core.schedule import NoiseSchedule, timestep_grid
from s2dm.errors import UserError


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear()


def test_linear_betas_closed_form(sched):
    assert sched.betas.dtype == torch.float64 and sched.T == 1000
    assert sched.betas[0].item() == pytest.approx(1e-4, abs=0)
    assert sched.betas[-1].item() == pytest.approx(0.02, abs=0)
    t = np.arange(1000)
    np.testing.assert_allclose(sched.betas.numpy(), 1e-4 + (0.02 - 1e-4) * t / 999, rtol=0, atol=1e-15)


def test_alphas_cumprod_is_product(sched):
    betas = sched.betas.numpy()
    for t in (0, 1, 9, 500, 999):
        assert sched.alphas_cumprod[t].item() == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-12)
    assert sched.alphas_cumprod.dtype == torch.float64


def test_alpha_bar_minus_one_is_one_and_vectorised(sched):
    assert sched.alpha_bar(-1).item() == 1.0
    t = torch.tensor([-1, 0, 999])
    got = sched.alpha_bar(t)
    assert got.dtype == torch.float64
    assert got.tolist() == [1.0, sched.alphas_cumprod[0].item(), sched.alphas_cumprod[999].item()]
    with pytest.raises(ValueError):
        sched.alpha_bar(1000)
    with pytest.raises(ValueError):
        sched.alpha_bar(-2)


def test_continuous_alpha_bar_interpolates(sched):
    ints = torch.tensor([-1.0, 0.0, 10.0, 999.0])
    torch.testing.assert_close(sched.alpha_bar_continuous(ints), sched.alpha_bar(ints.long()), rtol=0, atol=0)
    mid = sched.alpha_bar_continuous(torch.tensor([4.5]))
    expected = 0.5 * (sched.alphas_cumprod[4] + sched.alphas_cumprod[5])
    assert mid.item() == pytest.approx(expected.item(), rel=1e-14)
    assert sched.alpha_bar_continuous(-0.5).item() == pytest.approx(0.5 * (1 + sched.alphas_cumprod[0].item()))


def test_skip_alpha_is_product_of_alphas(sched):
    alphas = 1 - sched.betas.numpy()
    for t, skip in ((999, 9), (500, 49), (9, 9), (1, 1)):
        expected = np.prod(alphas[t - skip + 1: t + 1])
        assert sched.skip_alpha(t, skip).item() == pytest.approx(expected, rel=1e-12)


def test_uniform_grid_exact_steps():
    g = timestep_grid("uniform", 10, 1000)
    assert g.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0, -1]
    for S in (3, 7, 10, 20, 30, 50, 64, 100, 300, 600, 1000):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            g = timestep_grid("uniform", S, 1000)
        assert len(g) == S + 1 and g[-1] == -1 and g[-2] == 0
        assert (g[:-1] == torch.arange(S - 1, -1, -1) * (1000 // S)).all()
        # An S whose grid starts more than one spacing short of T − T//S warns (300: 897, 100
        # short of 997, spacing 3); 30 starts 10 short of 967, a third of its spacing, and does not.
        assert len(caught) == (S in (64, 300, 600)), (S, caught)
        if S == 600:
            assert str(caught[0].message) == (
                "uniform grid: 600 steps do not divide T=1000, so its points are multiples of 1 and the first is "
                "599, 400 timesteps short of 999; the trailing grid starts at 999 for any steps")


def test_trailing_grid_matches_formula():
    assert timestep_grid("trailing", 10, 1000).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99, -1]
    for S in (10, 20, 30, 50, 100, 1000):
        g = timestep_grid("trailing", S, 1000)
        expected = (np.round(np.arange(1000, 0, -1000 / S)) - 1).astype(int).tolist()
        assert g[:-1].tolist() == expected and len(g) == S + 1


def test_trailing_grid_has_exactly_s_points_for_every_s():
    """For 62 of the S ≤ 1000 (61, 103, ...) diffusers' float arange gives S + 1 points, the last
    −1; s2dm keeps the first S, which are diffusers' points wherever diffusers has S of them."""
    long = 0
    for S in range(1, 1001):
        g = timestep_grid("trailing", S, 1000)
        assert len(g) == S + 1 and g[0] == 999 and g[-2] >= 0 and (g[:-1] > g[1:]).all()
        diffusers = (np.round(np.arange(1000, 0, -1000 / S)) - 1).astype(int).tolist()
        if len(diffusers) == S:
            assert g[:-1].tolist() == diffusers
        else:
            long += 1
            assert diffusers[-1] == -1 and g[:-1].tolist() == diffusers[:-1]
    assert long == 62


def test_quad_grid_matches_ddim_code_and_dedups():
    g = timestep_grid("quad", 10, 1000)
    expected = [int(s) for s in np.linspace(0, math.sqrt(800), 10) ** 2][::-1]
    assert g[:-1].tolist() == expected and g[0] == 800
    assert len(timestep_grid("quad", 20, 1000)) == 21
    # The DDIM code's quad grid repeats t=0 from S=30 on (800/(S-1)^2 < 1): a wasted network call.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(timestep_grid("quad", 29, 1000)) == 30
    for S, walked in ((30, 29), (50, 49), (100, 96)):
        with pytest.warns(UserWarning, match="coincide"):
            g = timestep_grid("quad", S, 1000)
        expected = sorted({int(s) for s in np.linspace(0, math.sqrt(800), S) ** 2}, reverse=True)
        assert g[:-1].tolist() == expected and len(g) - 1 == walked


def test_explicit_grid_and_errors():
    assert timestep_grid([0, 500, 999], 0, 1000).tolist() == [999, 500, 0, -1]
    for bad in ([5, 5, 1], [1000], [-3, 4]):
        with pytest.raises(UserError):
            timestep_grid(bad, 0, 1000)
    with pytest.raises(UserError, match="exceeds"):
        timestep_grid("uniform", 1001, 1000)
    with pytest.raises(UserError):
        timestep_grid("uniform", 0, 1000)
    with pytest.raises(UserError, match="unknown grid"):
        timestep_grid("cosine", 10, 1000)


def test_a_uniform_grid_that_starts_near_t0_warns():
    """S = 1 on the uniform grid is t = 0 only: x_T is taken for x_0, the image is noise."""
    from s2dm.errors import GridWarning

    with pytest.warns(GridWarning, match=r"with 1 step of T=1000 the first point is t=0.*trailing grid starts at 999"):
        assert timestep_grid("uniform", 1, 1000).tolist() == [0, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert timestep_grid("uniform", 2, 1000).tolist() == [500, 0, -1]  # from T/2 on: no word
        assert timestep_grid("trailing", 1, 1000).tolist() == [999, -1]


@pytest.mark.parametrize("grid,steps,message", [
    (None, 10, "grid: expected one of uniform, quad, trailing or a list of timesteps, got None"),
    ("uniform", True, "steps must be a positive integer, got True"),
])
def test_a_grid_or_steps_of_the_wrong_type_is_a_sampler_error(grid, steps, message):
    from s2dm.errors import SamplerError

    with pytest.raises(SamplerError, match=re.escape(message)):
        timestep_grid(grid, steps, 1000)
