"""Typed errors: one class per kind of problem (s2dm/errors.py), one ``error:`` line each from
the CLI, library messages in API/config terms and the CLI naming the flag by the error's key."""
import ast
import pickle
import re

import pytest
import torch
from conftest import ROOT, tiny_args

from s2dm import errors
from s2dm.cli import build_parser, main
from s2dm.cli_errors import error_message, flag_of
from s2dm.core.losses import l0_loss, skip_step_loss
from s2dm.core.schedule import NoiseSchedule
from s2dm.errors import (CheckpointError, ConfigError, DataError, InteropError, Interrupted, MetricError,
                         RunError, S2dmError, SamplerError, StudyError, UserError)
from s2dm.interop.convert import convert
from s2dm.io.checkpoint import load_checkpoint
from s2dm.io.config import load_config
from s2dm.io.data import load_dataset
from s2dm.metrics.evaluate import evaluate
from s2dm.samplers.options import SampleOptions
from s2dm.study.spec import load_study
from s2dm.training.loop import train

KINDS = (ConfigError, DataError, CheckpointError, SamplerError, MetricError, RunError, StudyError, InteropError)
DIGITS = "configs/digits.yaml"


def error_line(capsys, argv) -> str:
    """Run the CLI: exit status 2 and exactly one line on stderr, ``error: ...``, no traceback."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_every_kind_is_an_s2dm_error_and_user_error_is_its_old_name():
    assert UserError is S2dmError and issubclass(S2dmError, Exception)
    for cls in KINDS:
        assert issubclass(cls, S2dmError) and cls is not S2dmError
    assert not issubclass(errors.Interrupted, S2dmError)  # a stop on request is not a user error


def test_key_and_all_ranks_are_real_fields():
    plain = S2dmError("boom")
    assert plain.key is None and plain.all_ranks is False and str(plain) == "boom"
    err = SamplerError("steps must be positive", key="steps", all_ranks=True)
    assert err.all_ranks is True and err.key == "steps"
    told = err.retold("steps: steps must be positive")  # adding context keeps class, key, all_ranks
    assert type(told) is SamplerError and told.key == "steps" and told.all_ranks is True


def test_a_remedy_follows_the_problem_and_a_caller_can_replace_it():
    err = RunError("model.ch: the run folder was trained with 16", key="model.ch", remedy="start over")
    assert str(err) == "model.ch: the run folder was trained with 16; start over"
    other = err.remedied("delete that run folder")
    assert type(other) is RunError and other.key == "model.ch" and other.remedy == "delete that run folder"
    assert str(other) == "model.ch: the run folder was trained with 16; delete that run folder"
    back = pickle.loads(pickle.dumps(other))  # a study worker's (or a torchrun rank's) error arrives pickled
    assert (str(back), back.problem, back.remedy, back.key) == (str(other), other.problem, other.remedy, "model.ch")
    agreed = back.copy(all_ranks=True)  # what dist.same_outcome raises on every rank
    assert (type(agreed), str(agreed), agreed.remedy, agreed.key, agreed.all_ranks) == (
        RunError, str(other), "delete that run folder", "model.ch", True)


# ---------------------------------------------------------------- one CLI case per class

def _missing_data(tmp):
    return ("data.dataset=cifar10", f"data.root={tmp / 'nowhere'}", "data.channels=3", "data.image_size=32")


def test_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, ["loss.bogus=1"])
    assert info.value.key == "loss.bogus"
    line = error_line(capsys, tiny_args(tmp_path / "o", 2, "loss.bogus=1"))
    assert line.startswith("error: loss.bogus: unknown key")  # a config key stays as it is


def test_data_error(tmp_path, capsys):
    with pytest.raises(DataError, match="CIFAR10"):
        load_dataset(load_config(DIGITS, list(_missing_data(tmp_path))).data)
    assert "CIFAR10" in error_line(capsys, tiny_args(tmp_path / "o", 2, *_missing_data(tmp_path)))


def test_checkpoint_error(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(junk)
    line = error_line(capsys, ["sample", "--ckpt", junk, "--out", tmp_path / "s", "--n", "2", "--device", "cpu"])
    assert "corrupt or truncated" in line


def test_sampler_error(tmp_path, capsys):
    with pytest.raises(SamplerError) as info:
        SampleOptions(sampler="dimm").validate(NoiseSchedule.linear())
    assert info.value.key == "sampler" and str(info.value).startswith("sampler: unknown sampler 'dimm'")
    with pytest.raises(SamplerError) as info:  # the same check from the config: the same class
        load_config(DIGITS, ["sample.sampler=dimm"])
    assert info.value.key == "sample.sampler"
    line = error_line(capsys, tiny_args(tmp_path / "o", 2, "sample.sampler=dimm"))
    assert line.startswith("error: sample.sampler: unknown sampler 'dimm'")
    line = error_line(capsys, ["eval", "--ckpt", tmp_path / "x.pt", "--samplers", "ddim,dimm", "--n", "8",
                               "--ref", tmp_path / "r.npz", "--out", tmp_path / "e"])
    assert line.startswith("error: --samplers: unknown sampler 'dimm'")


def test_metric_error(tmp_path, capsys):
    with pytest.raises(MetricError) as info:
        evaluate([str(tmp_path / "x.pt")], samplers=["ddim"], steps=[10], n=8, ref=str(tmp_path), out=str(tmp_path / "e"))
    assert info.value.key == "ref" and str(info.value).startswith("ref must be a .npz")
    line = error_line(capsys, ["eval", "--ckpt", tmp_path / "x.pt", "--n", "8", "--ref", tmp_path,
                               "--out", tmp_path / "e"])
    assert line.startswith("error: --ref must be a .npz statistics file")


def test_run_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"  # under a file: not a folder anyone can create
    with pytest.raises(RunError) as info:
        train(load_config(DIGITS, ["train.steps=2", "train.device=cpu"]), out)
    assert info.value.key == "out"
    line = error_line(capsys, tiny_args(out, 2))
    assert line.startswith("error: --out: cannot create output folder")


def test_study_error(tmp_path, capsys):
    with pytest.raises(StudyError) as info:
        load_study(DIGITS)
    assert info.value.key == "config"
    line = error_line(capsys, ["study", "--config", DIGITS])
    assert line.startswith(f"error: --config: {DIGITS} is a training config")


def test_interop_error(tmp_path, capsys):
    with pytest.raises(InteropError, match="no such file or folder"):
        convert("diffusers", tmp_path / "missing", tmp_path / "x.ckpt")
    line = error_line(capsys, ["convert", tmp_path / "missing", "--from", "diffusers", "--out", tmp_path / "x.ckpt"])
    assert line == f"error: {tmp_path / 'missing'}: no such file or folder"  # a positional: no flag


# ---------------------------------------------------------------- flags: only the CLI names them

def test_the_cli_names_the_flag_of_the_key(tmp_path, capsys):
    with pytest.raises(MetricError) as info:
        evaluate(["x.pt"], samplers=["ddim"], steps=[10], n=1, ref="r.npz", out=str(tmp_path / "e"))
    assert info.value.key == "n" and str(info.value) == "n must be at least 2 (a covariance needs 2 images), not 1"
    line = error_line(capsys, ["eval", "--ckpt", "x.pt", "--n", "1", "--ref", "r.npz", "--out", tmp_path / "e"])
    assert line == "error: --n must be at least 2 (a covariance needs 2 images), not 1"
    # a key at the start of the message becomes the flag (eps_scale → --eps-scale)
    line = error_line(capsys, ["eval", "--ckpt", "x.pt", "--n", "8", "--ref", "r.npz", "--out", tmp_path / "e",
                               "--seeds-offset", "-1"])
    assert line == "error: --seeds-offset must be >= 0, not -1"


def test_flag_of_and_error_message():
    parser = build_parser()
    assert flag_of(parser, "sample", "eps_scale") == "--eps-scale"
    assert flag_of(parser, "sample", "n") == "--n"  # not its alias --num-images
    assert flag_of(parser, "train", "overrides") == "--set"
    assert flag_of(parser, "convert", "layout") == "--from"
    assert flag_of(parser, "train", "sample.sampler") is None  # config keys stay
    assert flag_of(parser, "convert", "source") is None  # a positional argument
    assert flag_of(parser, "train", "n") is None and flag_of(parser, "train", None) is None
    err = MetricError("n 5: the folder holds only 3 images", key="n")
    assert error_message(err, "--n") == "--n 5: the folder holds only 3 images"
    err = MetricError("no images found in x", key="n")  # starts with the letter n, not the key
    assert error_message(err, "--n") == "--n: no images found in x"
    assert error_message(err, None) == "no images found in x"


def _raise_strings(node):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value  # plain strings and the literal parts of f-strings


def test_library_messages_name_no_flags():
    flag = re.compile(r"--[A-Za-z]")
    found = []
    for path in sorted((ROOT / "s2dm").rglob("*.py")):
        if path == ROOT / "s2dm" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            told = None
            if isinstance(node, ast.Raise) and node.exc is not None:
                told = node.exc
            elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in SPOKEN:
                told = node
            if told is not None:
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}"
                          for text in _raise_strings(told) if flag.search(text)]
    assert not found, "library errors, notes or warnings name command-line flags:\n" + "\n".join(found)


SPOKEN = ("note", "warn")  # what the library says besides its errors: dist.note, warnings.warn


# ---------------------------------------------------------------- one check, one class

class Toy(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


@pytest.mark.parametrize("call, key", [
    (lambda x0, t, s: l0_loss(Toy(), x0, t, s, reduction="max"), "loss.reduction"),
    (lambda x0, t, s: skip_step_loss(Toy(), x0, t, s, variant="x"), "loss.variant"),
    (lambda x0, t, s: skip_step_loss(Toy(), x0, t, s, tau=2.0), "loss.tau"),
    (lambda x0, t, s: skip_step_loss(Toy(), x0, t, s, skip=0), "loss.skip"),
])
def test_the_losses_checks_raise_what_the_configs_raise(call, key):
    sched = NoiseSchedule.linear(100)
    x0, t = torch.zeros(2, 1, 4, 4), torch.tensor([10, 50])
    with pytest.raises(ConfigError) as info:
        call(x0, t, sched)
    assert info.value.key == key.split(".")[1]
    bad = {"loss.reduction": "max", "loss.variant": "x", "loss.tau": 2.0, "loss.skip": 0}[key]
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, [f"{key}={bad}"])
    assert info.value.key == key


def test_the_timestep_checks_are_sampler_errors_everywhere():
    sched = NoiseSchedule.linear(100)
    with pytest.raises(SamplerError):
        SampleOptions(steps=1000).validate(sched)
    with pytest.raises(SamplerError):
        load_config(DIGITS, ["sample.steps=5000"])
    with pytest.raises(ConfigError):  # the schedule's own β range is a config value
        NoiseSchedule(torch.tensor([0.5, 1.5]))


def test_same_outcome_keeps_the_class_and_key_and_marks_all_ranks(monkeypatch):
    """``same_outcome`` re-raises the first rank's error of its class and key, on every rank."""
    from s2dm.util import dist

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda obj: [None, pickle.loads(pickle.dumps(obj))])
    with pytest.raises(CheckpointError) as info:
        with dist.same_outcome():
            raise CheckpointError("init_from: checkpoint not found: x", key="init_from", remedy="train it first")
    assert info.value.all_ranks is True and info.value.key == "init_from" and info.value.remedy == "train it first"
    assert str(info.value) == "init_from: checkpoint not found: x; train it first"


def test_errors_cross_a_process_boundary_whole():
    """A study worker's error or stop reaches the parent pickled: class, message, key and exit
    code survive the round trip."""
    stop = pickle.loads(pickle.dumps(Interrupted("stopped by signal 15 at step 7; saved x", 143)))
    assert type(stop) is Interrupted and str(stop).startswith("stopped by signal 15") and stop.exit_code == 143
    err = pickle.loads(pickle.dumps(RunError("workers: bad", key="workers", all_ranks=True)))
    assert type(err) is RunError and str(err) == "workers: bad" and err.key == "workers" and err.all_ranks
