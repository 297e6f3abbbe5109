"""``SampleOptions``: the sampler options declared once (samplers/options.py), and the flags,
config keys and records made from them."""
import dataclasses
import inspect
import json

import pytest

from s2dm.cli import EVAL_LISTS, build_parser, main, options_from_args
from s2dm.core.schedule import NoiseSchedule
from s2dm.errors import UserError
from s2dm.samplers import DEFAULTS, GRIDS, ORDERS, SAMPLERS, check_options, sample
from s2dm.samplers.generate import generate
from s2dm.samplers.options import SampleOptions

SCHED = NoiseSchedule.linear(1000)
EVAL_REQUIRED = ["--ckpt", "x", "--n", "2", "--ref", "r.npz", "--out", "o"]


def verb_parser(verb):
    return build_parser()._subparsers._group_actions[0].choices[verb]


@pytest.mark.parametrize("verb,skip,required", [("sample", (), []), ("eval", EVAL_LISTS, EVAL_REQUIRED)])
def test_every_option_has_a_flag_with_its_default_and_help(verb, skip, required):
    parser = verb_parser(verb)
    flags = {s: a for a in parser._actions for s in a.option_strings}
    args = parser.parse_args(required)
    for f in dataclasses.fields(SampleOptions):
        flag = "--" + f.name.replace("_", "-")
        if f.name in skip:  # eval: the comma-separated --samplers / --steps lists instead
            continue
        assert flag in flags, f"s2dm {verb} has no {flag}"
        assert flags[flag].dest == f.name and getattr(args, f.name) == f.default, flag
        assert flags[flag].help.startswith(f.metadata["help"]), flag
    if verb == "eval":
        assert flags["--steps"].default == "10,20,50,100" and "--samplers" in flags and "--sampler" not in flags


def test_flags_reach_the_options():
    args = build_parser().parse_args(["sample", "--sampler", "deis", "--steps", "7", "--grid", "quad", "--eta", "0",
                                      "--order", "2", "--eps-scale", "1.01", "--legacy-pndm-index"])
    assert args.func.__name__ == "cmd_sample"
    assert options_from_args(args) == SampleOptions("deis", 7, "quad", 0.0, 2, "1.01", True)
    args = build_parser().parse_args(["eval", *EVAL_REQUIRED, "--legacy-pndm-index", "--order", "1"])
    assert options_from_args(args, skip=EVAL_LISTS) == SampleOptions(order=1, legacy_pndm_index=True)


def test_choices_come_from_the_registries():
    meta = {f.name: f.metadata for f in dataclasses.fields(SampleOptions)}
    assert meta["sampler"]["choices"] == SAMPLERS and meta["grid"]["choices"] == GRIDS
    assert meta["order"]["choices"] == ORDERS
    assert all(m.get("help") for m in meta.values())


@pytest.mark.parametrize("options,name,words", [
    (SampleOptions(sampler="dimm"), "sampler", "unknown sampler 'dimm'; choose one of ddim"),
    (SampleOptions(grid="cosine"), "grid", "unknown grid 'cosine'"),
    (SampleOptions(steps=1001), "steps", "exceeds"),
    (SampleOptions(sampler="spndm", steps=1), "steps", "at least 2"),
    (SampleOptions(order=5), "order", "(0, 1, 2, 3)"),
    (SampleOptions(eta=9.0), "eta", "too large"),
    (SampleOptions(eps_scale="skip:1000"), "eps_scale", "skip must be"),
    (SampleOptions(grid="trailing", legacy_pndm_index=True), "legacy_pndm_index", "<= 998"),
])
def test_validate_names_the_option(options, name, words):
    with pytest.raises(UserError) as err:
        options.validate(SCHED)
    assert str(err.value).startswith(f"{name}: ") and words in str(err.value), str(err.value)
    with pytest.raises(UserError) as err:
        options.validate(SCHED, prefix="sample.")
    assert str(err.value).startswith(f"sample.{name}: ")


def test_an_unknown_grid_offers_the_names_only():
    """SampleOptions (configs, flags) hold a grid's name; a list of timesteps is for Python
    callers of generate, so the error offers the names alone."""
    with pytest.raises(UserError) as err:
        SampleOptions(grid="cosine").validate(SCHED)
    assert str(err.value) == "grid: unknown grid 'cosine'; choose one of uniform, quad, trailing"


def test_validate_is_check_options():
    options = SampleOptions(sampler="deis", steps=12, order=2, eps_scale="skip:9,tau:0.99")
    assert options.validate(SCHED) == check_options(SCHED, **options.as_kwargs())
    assert options.as_kwargs()["eps_scale"] == {"skip": 9, "tau": 0.99}
    assert SampleOptions().as_kwargs() == dict(sampler="ddim", steps=50, grid="uniform", eta=0.0, order=3,
                                               eps_scale=None, legacy_pndm_index=False)


def test_folder_names():
    assert SampleOptions(steps=20).folder_name() == "ddim-20"
    assert SampleOptions(steps=20, grid="quad", eta=0.5).folder_name(use_ema=False) == "ddim-20-quad-eta0.5-noema"
    assert SampleOptions("deis", 10, order=2).folder_name() == "deis-10-order2"
    assert SampleOptions("ddim", 10, order=2).folder_name() == "ddim-10"  # order is DEIS's only
    assert SampleOptions("pndm", 10, legacy_pndm_index=True).folder_name() == "pndm-10-legacy"
    assert SampleOptions("ddim", 10, eps_scale="skip:9,tau:0.99").folder_name() == "ddim-10-epsskip_9_tau_0.99"


def test_eval_takes_legacy_pndm_index_and_records_it(tiny_run, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--out", str(ref)]) == 0
    base = ["eval", "--ckpt", str(tiny_run), "--samplers", "pndm", "--steps", "4", "--n", "4", "--ref", str(ref),
            "--features", "pixels", "--batch-size", "4"]
    assert main(base + ["--out", str(tmp_path / "legacy"), "--legacy-pndm-index"]) == 0
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    legacy = json.loads((tmp_path / "legacy" / "cells" / "tiny" / "pndm-4-legacy.json").read_text())
    plain = json.loads((tmp_path / "plain" / "cells" / "tiny" / "pndm-4.json").read_text())
    assert legacy["key"]["legacy_pndm_index"] is True
    assert "legacy_pndm_index" not in plain["key"]  # records made before the option still match
    meta = json.loads((tmp_path / "legacy" / "samples" / "tiny" / "pndm-4-legacy" / "metadata.json").read_text())
    assert meta["settings"]["legacy_pndm_index"] is True and meta["nfe"] == 4 + 9
    assert legacy["row"]["value"] != plain["row"]["value"]  # another pairing, other images
    capsys.readouterr()


def test_eval_checks_every_cell_before_sampling(tiny_run, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--out", str(ref)]) == 0
    capsys.readouterr()
    args = ["eval", "--ckpt", str(tiny_run), "--samplers", "ddim,pndm", "--steps", "3", "--n", "4", "--ref", str(ref),
            "--features", "pixels", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("error: --steps: pndm needs at least 4 steps")  # the flag, by its key
    assert not (tmp_path / "o").exists()  # not even the ddim cell was sampled


def test_the_options_defaults_are_one_declaration():
    """sample(), check_options() and SampleOptions (the CLI's flags, a config's sample: section)
    default alike: a Python caller and `s2dm sample` get the same images (they once took 20
    and 50 steps)."""
    options = SampleOptions()
    for fn in (sample, check_options):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in DEFAULTS} == DEFAULTS == {k: getattr(options, k) for k in DEFAULTS}
    assert "steps" not in inspect.signature(generate).parameters  # generate passes its options on to sample()
