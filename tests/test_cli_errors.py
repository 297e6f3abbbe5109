"""The command line's answers to bad input found by a newcomer's review: each one ``error:`` line
with exit status 2 (argparse's included), nothing written before the check, flags spelt as
flags, and the small things a user reads (plurals, help texts, --version, warnings)."""
import re
import warnings

import pytest
import torch

from s2dm import cli
from s2dm._version import __version__
from s2dm.cli import build_parser, main
from s2dm.cli_errors import spell_option, spell_options
from s2dm.errors import ConfigError, InteropError
from s2dm.interop.convert import convert
from s2dm.io.config import load_config, shipped_configs
from s2dm.util.textfmt import first_sentence


def error_line(capsys, argv) -> str:
    """Exit status 2 and exactly one line on stderr, ``error: ...``, no traceback."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ---------------------------------------------------------------- batch sizes and seeds

@pytest.mark.parametrize("verb, flag", [("sample", "--batch-size"), ("eval", "--batch-size"),
                                        ("eval", "--fid-batch-size"), ("fid", "--batch-size")])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_batch_size_below_one_is_one_line_and_writes_nothing(tmp_path, capsys, verb, flag, value):
    out = tmp_path / "out"
    args = {"sample": ["sample", "--ckpt", tmp_path / "x.pt", "--n", "2", "--out", out],
            "eval": ["eval", "--ckpt", tmp_path / "x.pt", "--n", "2", "--ref", tmp_path / "r.npz", "--out", out],
            "fid": ["fid", tmp_path / "a", tmp_path / "b"]}[verb]
    line = error_line(capsys, args + [flag, value])
    assert line.startswith(f"error: {flag}: must be a positive integer, not {value}"), line
    assert not out.exists()


def test_a_missing_checkpoint_is_reported_before_the_missing_out(tmp_path, capsys):
    line = error_line(capsys, ["sample", "--ckpt", tmp_path / "nothing", "--n", "4"])
    assert line == f"error: checkpoint not found: {tmp_path / 'nothing'}"


def test_n_and_seeds_are_alternatives(tmp_path, capsys):
    line = error_line(capsys, ["sample", "--ckpt", tmp_path / "x.pt", "--seeds", "1", "--n", "4",
                               "--out", tmp_path / "s"])
    assert "--seeds" in line and "--n" in line and "not allowed" in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("how", [["--seeds", "0-100000000000"], ["--n", "100000000000"]])
def test_too_many_seeds_is_an_error_not_a_memory_error(tmp_path, capsys, how):
    line = error_line(capsys, ["sample", "--ckpt", tmp_path / "x.pt", "--out", tmp_path / "s"] + how)
    assert line.startswith(f"error: {how[0]} ") and "100,000,00" in line and "more than" in line, line


def test_sample_counts_in_words(tiny_run, tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tiny_run), "--n", "1", "--steps", "2", "--out", str(tmp_path / "s"),
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(f"1 image in {tmp_path / 's'} (")


# ---------------------------------------------------------------- writing where one cannot

def test_plot_into_an_unwritable_place_is_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")  # a folder under a file: fails for root too
    out = tmp_path / "afile" / "x" / "curves.png"
    line = error_line(capsys, ["plot", tiny_run, "--out", out])
    assert line.startswith(f"error: --out: cannot write {out}: Not a directory")


@pytest.mark.parametrize("to, name", [("diffusers", "x"), ("ddim", "x.ckpt")])
def test_export_into_an_unwritable_place_is_one_line(tiny_run, tmp_path, capsys, to, name):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / name
    line = error_line(capsys, ["export", "--to", to, "--ckpt", tiny_run, "--out", out])
    assert line.startswith(f"error: --out: cannot write {out}: ")
    assert (tmp_path / "afile").read_text() == "x"


def test_convert_into_an_unwritable_place_is_one_line(tiny_run, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    src = tmp_path / "weights.ckpt"
    torch.save(torch.load(sorted((tiny_run / "checkpoints").glob("ckpt_*.pt"))[-1], weights_only=False)["ema"], src)
    out = tmp_path / "afile" / "c.ckpt"
    line = error_line(capsys, ["convert", src, "--from", "ddim", "--image-size", "8", "--out", out,
                               "--set", "model.ch=32", "--set", "model.ch_mult=[1,2]"])
    assert line.startswith(f"error: --out: cannot write {out}: ")


def test_plot_refuses_a_name_that_is_not_png(tiny_run, tmp_path, capsys):
    line = error_line(capsys, ["plot", tiny_run, "--out", tmp_path / "x.txt"])
    assert "PNG" in line and not (tmp_path / "x.txt").exists()


def test_fid_dims_with_pixel_features_is_an_error(tmp_path, capsys):
    line = error_line(capsys, ["fid", tmp_path / "a", tmp_path / "b", "--features", "pixels", "--dims", "64"])
    assert line == "error: --dims chooses an Inception block; --features pixels has none"


# ---------------------------------------------------------------- configs

def test_an_empty_config_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(empty)
    line = error_line(capsys, ["train", "--config", empty, "--out", tmp_path / "run"])
    assert line == f"error: --config: {empty} is empty"
    assert not (tmp_path / "run").exists()


def test_a_study_config_given_to_train_says_so(tmp_path, capsys):
    line = error_line(capsys, ["train", "--config", "study_digits.yaml", "--out", tmp_path / "run"])
    assert "study_digits.yaml is a study config" in line and "s2dm study" in line
    assert not (tmp_path / "run").exists()


def test_configs_shows_whole_first_sentences(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == len(shipped_configs())
    for line in lines:
        summary = line.split(None, 2)[2]
        assert summary.endswith((".", "?", "!")) and summary.count("(") == summary.count(")"), line
    assert any("(FD-pixels and FD-cnn, scored on the same sampled images)" in ln for ln in lines)


def test_first_sentence_never_cuts_inside_parentheses():
    assert first_sentence("A (b. c) d. E f.") == "A (b. c) d."
    assert first_sentence("file .format_version: bad.\nMore advice.") == "file .format_version: bad."
    assert first_sentence("no end") == "no end"


def test_convert_keeps_the_first_sentence_of_a_corrupt_files_error(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.zeros(1000)}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    line = error_line(capsys, ["convert", bad, "--from", "ddim", "--image-size", "32", "--out", tmp_path / "o.ckpt"])
    assert line.endswith("(RuntimeError: PytorchStreamReader failed reading zip archive: "
                         "failed finding central directory.)"), line


# ---------------------------------------------------------------- options spelt as flags

def test_library_messages_spell_options_as_python_and_the_cli_as_flags(tmp_path, capsys):
    out = tmp_path / "exists.ckpt"
    out.write_text("x")
    (tmp_path / "w.ckpt").write_text("x")  # a source that exists: the size is asked for before it is read
    with pytest.raises(InteropError, match=r"overwrite it with force=True"):
        convert("ddim", tmp_path / "w.ckpt", out, image_size=32)
    line = error_line(capsys, ["convert", tmp_path / "w.ckpt", "--from", "ddim", "--image-size", "32", "--out", out])
    assert line == f"error: {out} exists; overwrite it with --force"
    with pytest.raises(InteropError, match=r"give image_size=32"):
        convert("ddim", tmp_path / "w.ckpt", tmp_path / "new.ckpt")
    line = error_line(capsys, ["convert", tmp_path / "w.ckpt", "--from", "ddim", "--out", tmp_path / "new.ckpt"])
    assert "give --image-size 32 (CIFAR10) or --image-size 64 (CelebA), or a config that has data.image_size" in line


def test_train_refusals_name_flags(tiny_run, tmp_path, capsys):
    line = error_line(capsys, ["train", "--config", "digits.yaml", "--out", tiny_run, "--resume", "never"])
    assert line == f"error: {tiny_run} already holds checkpoints; start over with --force, or resume it with --resume auto"
    line = error_line(capsys, ["train", "--config", "digits.yaml", "--out", tiny_run, "--set", "model.ch=16"])
    assert line.endswith("start a new run folder, or start over with --resume never --force"), line


def test_spell_options():
    parser = build_parser()
    spell = lambda name, value: spell_option(parser, "export", name, value)  # noqa: E731
    assert spell_options("with use_ema=False", spell) == "with --no-ema"
    assert spell_options("with force=True, to='ddim'", spell) == "with --force --to ddim"
    assert spell_options("with force=True, or to='ddim'", spell) == "with --force, or --to ddim"
    # not a flag of export, a config key, a value not spelt as Python: left as they are
    assert spell_options("with resume='never', force=True", spell) == "with resume='never', force=True"
    assert spell_options("model.ch=32 and ch=32 and force=yes", spell) == "model.ch=32 and ch=32 and force=yes"


def test_force_goes_with_resume_never(tmp_path, capsys):
    line = error_line(capsys, ["train", "--config", "digits.yaml", "--out", tmp_path / "run", "--force"])
    assert "--force" in line and "--resume never" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- help, version, warnings

def test_every_verb_has_a_description_and_no_doubled_percent(capsys):
    verbs = next(a for a in build_parser()._actions if a.dest == "verb").choices
    for name, sub in verbs.items():
        assert sub.description, name
        assert main([name, "--help"]) == 0
        assert "%%" not in capsys.readouterr().out, name


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"s2dm {__version__}\n"


def test_a_warning_is_one_line(monkeypatch, capsys):
    def warns(args):
        warnings.warn("points coincide", UserWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_configs", warns)
    before = warnings.showwarning
    assert main(["configs"]) == 0
    assert capsys.readouterr().err == "warning: points coincide\n"
    assert warnings.showwarning is before  # only while the CLI runs


def test_a_bad_argument_is_one_line(capsys):
    line = error_line(capsys, ["sample", "--sampler"])
    assert re.match(r"error: --sampler: expected one argument", line), line


def test_second_review_messages(tiny_run, tmp_path, capsys):
    """A flag is not named twice (`--steps: --steps ...`, `--ema:` before `--no-ema`), and a
    device error of train names its config key."""
    from s2dm.cli_errors import error_message, flag_of
    from s2dm.errors import CheckpointError

    line = error_line(capsys, ["sample", "--ckpt", tiny_run, "--out", tmp_path / "s", "--steps", "0"])
    assert line == "error: --steps must be a positive integer, got 0"
    line = error_line(capsys, ["sample", "--ckpt", tiny_run, "--out", tmp_path / "s", "--steps", "2000"])
    assert line == "error: --steps: 2000 exceeds the number of training timesteps T=1000"
    parser = build_parser()
    exc = CheckpointError("x.pt holds no EMA weights; sample the raw ones with use_ema=False", key="use_ema")
    spell = lambda name, value: spell_option(parser, "sample", name, value)  # noqa: E731
    assert error_message(exc, flag_of(parser, "sample", "use_ema"), spell) == \
        "x.pt holds no EMA weights; sample the raw ones with --no-ema"
    line = error_line(capsys, ["train", "--config", "digits.yaml", "--out", tmp_path / "r", "--set", "train.device=foo"])
    assert line == "error: train.device 'foo' is not a device (try cpu, cuda, cuda:1)"


def test_a_file_where_a_folder_goes_is_not_sent_to_force(tiny_run, tmp_path, capsys):
    """export/convert/fid ref said "exists; overwrite it with --force" of an --out of the wrong
    kind, and with --force that it was the wrong kind: it is now said first."""
    folder, file = tmp_path / "taken.ckpt", tmp_path / "taken"
    folder.mkdir()
    (folder / "x").write_text("x")
    file.write_text("x")
    cases = [
        (["export", "--to", "ddim", "--ckpt", tiny_run, "--out", folder], "is a folder; the ddim layout is one file"),
        (["export", "--to", "diffusers", "--ckpt", tiny_run, "--out", file], "is a file; the diffusers layout is a folder"),
        (["convert", "--from", "ddim", file, "--image-size", "8", "--out", folder], "is a folder; the s2dm checkpoint is one file"),
        (["fid", "ref", "--config", "digits.yaml", "--features", "pixels", "--out", tmp_path / "stats.npz"],
         "is a folder; the statistics are one .npz file"),
    ]
    (tmp_path / "stats.npz").mkdir()
    for args, says in cases:
        for force in ([], ["--force"]):
            line = error_line(capsys, args + force)
            assert says in line and "--force" not in line, line
