"""The EMA update and its warm-up, against hand computations."""
import pytest
import torch

from conftest import tiny_args
from s2dm.cli import main
from s2dm.core.ema import ema_decay_at, make_ema, update_ema
from s2dm.io.config import config_from_saved, load_config
from s2dm.training.state import new_state


def test_decay_schedule_by_hand():
    # (1 + k) / (10 + k): 1/10, 2/11, 3/12, ...; capped at the configured decay
    assert [ema_decay_at(k, 0.995, True) for k in range(3)] == [0.1, 2 / 11, 3 / 12]
    assert ema_decay_at(1790, 0.995, True) == pytest.approx(1791 / 1800)  # still ramping
    assert ema_decay_at(1791, 0.995, True) == 0.995  # 1792/1801 > 0.995: capped from here on
    assert ema_decay_at(0, 0.995, False) == ema_decay_at(10**6, 0.995, False) == 0.995


def test_update_is_the_convex_combination():
    model = torch.nn.Linear(2, 1)
    ema = make_ema(model)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.weight.copy_(torch.tensor([[3.0, -2.0]]))
    update_ema(ema, model, 0.75)
    # 0.75 * [1, 2] + 0.25 * [3, -2] = [1.5, 1.0]; exact in binary floating point
    assert ema.weight.tolist() == [[1.5, 1.0]]
    assert not ema.weight.requires_grad


def test_training_run_ema_follows_the_warm_up(tmp_path):
    """Rebuild the EMA of a 4-step run from its per-step checkpoints by hand."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, "train.checkpoint_every=1", "train.keep_last=10",
                          "train.ema_decay=0.999")) == 0
    ckpts = [torch.load(out / "checkpoints" / f"ckpt_{k:08d}.pt", weights_only=False) for k in range(1, 5)]
    key = "conv_out.weight"
    init = new_state(load_config(out / "config.yaml"), torch.device("cpu")).model.state_dict()[key]
    ema = init.double()  # the EMA starts as a copy of the initial weights
    for k, ck in enumerate(ckpts):
        d = (1 + k) / (10 + k)  # far below 0.999: the ramp decides
        ema = d * ema + (1 - d) * ck["model"][key].double()
        # measured: max |diff| 2.7e-9 (float32 lerp vs this float64 recurrence); 1e-7 is ~40x that
        torch.testing.assert_close(ck["ema"][key].double(), ema, rtol=0, atol=1e-7)
    # without the warm-up the first update keeps 99.9 % of the initial weights
    fixed = tmp_path / "fixed"
    assert main(tiny_args(fixed, 1, "train.ema_decay=0.999", "train.ema_warmup=false")) == 0
    ck = torch.load(fixed / "checkpoints" / "ckpt_00000001.pt", weights_only=False)
    want = 0.999 * init.double() + 0.001 * ck["model"][key].double()
    torch.testing.assert_close(ck["ema"][key].double(), want, rtol=0, atol=1e-7)  # one update: same rounding


def test_runs_saved_before_the_key_keep_their_fixed_decay():
    saved = load_config("configs/digits.yaml").to_dict()
    del saved["train"]["ema_warmup"]
    assert config_from_saved(saved).train.ema_warmup is False
    assert load_config("configs/digits.yaml").train.ema_warmup is True
