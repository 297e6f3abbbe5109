"""The Python API as a notebook uses it: arguments given as one value, typed errors, the
caller's random state left alone, no progress bar when asked for none."""
import pytest
import torch

from conftest import tiny_args
from s2dm import NoiseSchedule, build_model, l0_loss, load_checkpoint, load_config, skip_step_loss
from s2dm.cli import main
from s2dm.errors import ConfigError, RunError, SamplerError
from s2dm.samplers import sample
from s2dm.util.listargs import listed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(tiny_args(out, 2, "train.checkpoint_every=2", "model.ch=16")) == 0
    return out


def test_one_value_where_a_list_is_expected_is_a_list_of_it(tmp_path):
    assert listed("ddim") == ["ddim"] and listed(10) == [10] and listed(tmp_path) == [tmp_path]
    assert listed(range(3)) == [0, 1, 2] and listed(("a", "b")) == ["a", "b"]
    # it read "model.ch=16" as the overrides "m", "o", ... ("override 'm': expected KEY=VALUE")
    assert load_config("configs/digits.yaml", "model.ch=16").model.ch == 16


def test_evaluate_takes_one_checkpoint_sampler_and_step_count(run, tmp_path):
    """evaluate("RUN", samplers="ddim", steps=2) read the run folder's letters as checkpoints,
    "ddim" as the samplers d, d, i, m, and failed on steps=2 with a bare TypeError."""
    from s2dm.metrics.evaluate import evaluate

    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--out", str(ref)]) == 0
    common = dict(n=8, ref=str(ref), features="pixels", batch_size=8, progress=False)
    one = evaluate(str(run), samplers="ddim", steps=2, out=str(tmp_path / "one"), **common)
    lists = evaluate([str(run)], samplers=["ddim"], steps=[2], out=str(tmp_path / "lists"), **common)
    assert len(one) == 1 and one[0]["value"] == lists[0]["value"] and one[0]["nfe"] == 2
    for steps in (2.5, True, "2"):
        with pytest.raises(SamplerError) as exc:
            evaluate(str(run), samplers="ddim", steps=steps, out=str(tmp_path / "bad"), **common)
        assert exc.value.key == "steps"


def test_evaluate_and_sample_to_folder_draw_no_bar_when_asked(run, tmp_path, capsys):
    from s2dm.sampling.folder import sample_to_folder

    sample_to_folder(str(run), str(tmp_path / "quiet"), seeds=range(4), batch_size=4, progress=False)
    assert "img" not in capsys.readouterr().err
    sample_to_folder(str(run), str(tmp_path / "loud"), seeds=range(4), batch_size=4)
    assert "4/4" in capsys.readouterr().err


def test_load_checkpoint_picks_its_device_as_sampling_does_and_leaves_the_caller_rng(run):
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    ck = load_checkpoint(run, device="auto")  # it built two UNets, drawing their initial weights
    assert torch.equal(torch.rand(4), expected)
    assert next(ck.ema.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RunError) as exc:
        load_checkpoint(run, device="gpu")
    assert exc.value.key == "device"


def test_the_losses_are_reproducible_from_their_generator_alone():
    """skip_step_loss(generator=g) drew ε from the global RNG and only ε′ from g."""
    schedule = NoiseSchedule.linear()
    net = build_model(load_config("configs/digits.yaml", ["model.ch=16"]))
    x0, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900])
    for loss in (skip_step_loss, l0_loss):
        values = []
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            values.append(float(loss(net, x0, t, schedule, generator=torch.Generator().manual_seed(0)).detach()))
        assert values[0] == values[1], loss.__name__
    # ε from the generator, then ε′: the loss with both given equals the one drawn
    g = torch.Generator().manual_seed(0)
    noise, skip_noise = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    drawn = skip_step_loss(net, x0, t, schedule, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, skip_step_loss(net, x0, t, schedule, noise=noise, skip_noise=skip_noise))


@pytest.mark.parametrize("kwargs, key", [({"variant": "bogus"}, "variant"), ({"tau": 2.0}, "tau"),
                                         ({"tau": float("nan")}, "tau")])
def test_the_loss_optimum_checks_tau_and_variant_as_the_loss_does(kwargs, key):
    """shrink_factor raised a bare ValueError for a bad variant and took any τ (τ = 2 gave 1.05)."""
    schedule = NoiseSchedule.linear()
    with pytest.raises(ConfigError) as exc:
        schedule.shrink_factor(torch.tensor([100]), 9, **{"tau": 0.99, **kwargs})
    assert exc.value.key == key


def test_an_eps_fn_of_the_wrong_shape_is_a_sampler_error():
    schedule = NoiseSchedule.linear()
    with pytest.raises(SamplerError) as exc:
        sample(lambda x, t: x[:, :1], torch.randn(2, 3, 4, 4), schedule, sampler="ddim", steps=2)
    assert exc.value.key == "eps_fn"


def test_build_model_and_train_read_what_a_checkpoint_or_a_path_gives(tmp_path):
    """A saved config's older key names are read (a dict with sample.grid_images was an
    unknown key); train() takes a YAML path as build_model does."""
    from s2dm.training.loop import train

    model = build_model({"model": {"ch": 16}, "sample": {"grid_images": 4}})
    assert model.conv_in.out_channels == 16
    assert build_model({"model": {"ch": 16}, "sample": None}).conv_in.out_channels == 16  # "sample:" in YAML
    with pytest.raises(ConfigError, match="sample: expected a mapping"):
        build_model({"sample": ["grid_images"]})
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {ch: 16}\ntrain: {steps: 1, batch_size: 8, checkpoint_every: 1, sample_every: 1}\n"
                   "sample: {steps: 2, mosaic_images: 4}\n")
    assert train(str(cfg), tmp_path / "run", progress=False).name == "ckpt_00000001.pt"
    assert load_checkpoint(tmp_path / "run").config.model.ch == 16
