"""NFE: the count ``check_options`` predicts (what ``s2dm sample`` writes into metadata.json
before sampling) equals the network calls ``sample()`` makes, and the hand count: F-PNDM
S+9 (three Runge-Kutta warm-up steps of four calls), S-PNDM S+1, every other sampler S."""
import pytest
import torch

from s2dm.core.schedule import NoiseSchedule
from s2dm.samplers import check_options, sample

SCHED = NoiseSchedule.linear(1000)
HAND = {"ddim": 0, "ddpm": 0, "pndm": 9, "spndm": 1, "deis": 0, "deis-rho": 0}


class CountingNet:
    """ε(x, t) = 0.1·x, counting its calls and the rows it was given."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],)
        return 0.1 * x


@pytest.mark.parametrize("S", [4, 10, 25])
@pytest.mark.parametrize("sampler, order", [("ddim", 3), ("ddpm", 3), ("pndm", 3), ("spndm", 3)]
                         + [(d, o) for d in ("deis", "deis-rho") for o in (0, 1, 2, 3)])
def test_predicted_nfe_is_the_number_of_network_calls(sampler, order, S):
    options = dict(sampler=sampler, steps=S, order=order, eps_scale="skip:9,tau:0.99")
    net = CountingNet()
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample(net, x, SCHED, **options)
    assert net.calls == S + HAND[sampler]
    assert check_options(SCHED, **options)["nfe"] == net.calls


@pytest.mark.parametrize("options", [dict(sampler="ddim", eta=0.5), dict(sampler="pndm", legacy_pndm_index=True),
                                     dict(sampler="ddim", grid="trailing"), dict(sampler="spndm", grid=[999, 600, 300, 10])])
def test_other_options_keep_the_count(options):
    net = CountingNet()
    S = options.get("steps", 12) if not isinstance(options.get("grid"), list) else len(options["grid"])
    kwargs = {"steps": S, **options}
    sample(net, torch.ones(1, 1, 2, 2, dtype=torch.float64), SCHED, **kwargs)
    assert net.calls == S + HAND[options["sampler"]] == check_options(SCHED, **kwargs)["nfe"]


@pytest.mark.parametrize("sampler", ["ddim", "pndm", "spndm"])
def test_a_progress_callable_gets_each_calls_share_of_the_images(sampler):
    """One share per network call, B/NFE each: an image bar that reaches B at the batch's end."""
    shares = []
    _, info = sample(CountingNet(), torch.randn(5, 1, 4, 4), SCHED, sampler=sampler, steps=6, progress=shares.append)
    assert len(shares) == info["nfe"] == 6 + HAND[sampler]
    assert shares == [5 / info["nfe"]] * info["nfe"] and sum(shares) == pytest.approx(5, rel=1e-12)
