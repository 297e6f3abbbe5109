import dataclasses
from pathlib import Path

import pytest
import yaml

from s2dm.errors import UserError
from s2dm.io.config import Config, config_from_dict, load_config


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("name", ["digits", "cifar10", "celeba", "fashion_mnist"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(f"configs/{name}.yaml")
    cfg.dump(tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_required_keys_and_defaults():
    cfg = Config()
    assert (cfg.loss.type, cfg.loss.skip, cfg.loss.tau) == ("s2", 9, 0.99)
    assert (cfg.loss.variant, cfg.loss.reduction, cfg.loss.t_sampling) == ("independent", "mean", "antithetic")
    for key in ("steps", "batch_size", "seed", "checkpoint_every", "sample_every"):
        assert hasattr(cfg.train, key)


def test_cifar10_matches_paper_setup():
    cfg = load_config("configs/cifar10.yaml")
    assert cfg.model.ch == 128 and cfg.model.ch_mult == [1, 2, 2, 2] and cfg.model.attn_resolutions == [16]
    assert cfg.optim.lr == 2e-4 and cfg.optim.grad_clip == 1.0 and cfg.train.ema_decay == 0.9999
    assert cfg.train.batch_size == 128 and cfg.data.random_flip and cfg.model.dropout == 0.1


def test_overrides_parse_yaml_values():
    cfg = load_config("configs/digits.yaml", ["train.steps=200", "loss.type=l0", "optim.lr=1e-3",
                                              "model.ch_mult=[1,2]", "data.random_flip=true"])
    assert cfg.train.steps == 200 and cfg.loss.type == "l0" and cfg.optim.lr == 1e-3
    assert cfg.model.ch_mult == [1, 2] and cfg.data.random_flip is True


@pytest.mark.parametrize("override,key", [
    ("loss.tauu=0.5", "loss.tauu"),
    ("train.stepz=3", "train.stepz"),
    ("bogus.x=1", "bogus"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("loss.tau=1.5", "loss.tau"),
    ("loss.skip=0", "loss.skip"),
    ("loss.skip=1000", "loss.skip"),
    ("train.steps=0", "train.steps"),
    ("loss.type=l1", "loss.type"),
    ("loss.variant=both", "loss.variant"),
    ("model.ch_mult=[1,a]", "model.ch_mult[1]"),
    ("data.random_flip=3", "data.random_flip"),
    # what torch.optim.Adam would refuse with a traceback at the first step's set-up
    ("optim.beta1=1.5", "optim.beta1"),
    ("optim.beta2=1.0", "optim.beta2"),
    ("optim.eps=-1", "optim.eps"),
    ("optim.eps=0", "optim.eps"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    # infinities: lr .inf trained on NaN, eps .inf froze the weights, with no word of the key
    ("optim.lr=.inf", "optim.lr"),
    ("optim.eps=.inf", "optim.eps"),
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("loss.tau=-.inf", "loss.tau"),
    ("train.ema_decay=.nan", "train.ema_decay"),
    # YAML 1.1's other number forms are text here, not a silently changed number
    ("train.steps=1:30", "train.steps"),
    ("train.eval.n=0x400", "train.eval.n"),
])
def test_errors_name_the_dotted_key(override, key):
    with pytest.raises(UserError) as err:
        load_config("configs/digits.yaml", [override])
    assert str(err.value).startswith(key), str(err.value)


def test_numbers_are_read_as_written(tmp_path):
    """YAML 1.1 read 010 as 8 and 0777 as 511 (octal); a seed or step count keeps its digits,
    and 2e3 (no dot) is a number, 2000 where an integer is wanted."""
    cfg = load_config("configs/digits.yaml", ["train.steps=010", "train.seed=0777", "train.eval.n=2e3",
                                              "optim.lr=2e-4", "optim.eps=1E-8", "train.checkpoint_every=1_000"])
    assert (cfg.train.steps, cfg.train.seed, cfg.train.eval.n, cfg.train.checkpoint_every) == (10, 777, 2000, 1000)
    assert (cfg.optim.lr, cfg.optim.eps) == (2e-4, 1e-8)
    p = write(tmp_path, "train:\n  steps: 0100\n  seed: 1e3\n")
    assert (load_config(p).train.steps, load_config(p).train.seed) == (100, 1000)
    # text that reads as a number is quoted in config.yaml, so a run resumes with it as text
    cfg = load_config("configs/digits.yaml", ["data.dataset=folder", "data.root='2e3'", "train.steps=010"])
    cfg.dump(tmp_path / "out.yaml")
    assert "root: '2e3'" in (tmp_path / "out.yaml").read_text()
    assert load_config(tmp_path / "out.yaml") == cfg and cfg.data.root == "2e3"


def test_a_key_given_twice_is_refused_and_merges_still_override(tmp_path):
    """YAML keeps the last of a repeated key in silence; a merge (<<: *anchor) may be overridden."""
    with pytest.raises(UserError, match=r"c.yaml, line 3, column 3: the key 'steps' is given twice in one section"):
        load_config(write(tmp_path, "train:\n  steps: 10\n  steps: 20\n"))
    with pytest.raises(UserError, match=r"override 'train.eval=\{n: 100, n: 200\}': the key 'n' is given twice"):
        load_config("configs/digits.yaml", ["train.eval={n: 100, n: 200}"])
    with pytest.raises(UserError, match=r"YAML syntax error \(line 2, column 5\): found unhashable key"):
        load_config(write(tmp_path, "train:\n  ? [a, b]\n  : 1\n"))
    merged = "base: &b {steps: 5, seed: 3}\ntrain:\n  <<: *b\n  steps: 7\n"
    from s2dm.util.yamlio import load_yaml
    assert load_yaml(merged)["train"] == {"steps": 7, "seed": 3}


def test_a_config_that_is_not_utf8_is_one_error_line(tmp_path, capsys):
    from s2dm.cli import main

    p = tmp_path / "latin1.yaml"
    p.write_bytes("data:\n  dataset: folder\n  root: /donn\xe9es\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 0xe9 on line 3\); save the file as UTF-8"):
        load_config(p)
    assert main(["train", "--config", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {p}: not UTF-8 text") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "train:\n  steps: 10\n  seed: [1, 2\n")
    with pytest.raises(UserError, match=r"YAML syntax error \(line"):
        load_config(p)


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config("configs/digits.yaml", ["train.steps"])


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="^loss: expected a mapping"):
        load_config(write(tmp_path, {"loss": 3}))


def test_levels_must_divide_image_size():
    with pytest.raises(UserError, match="model.ch_mult"):
        load_config("configs/digits.yaml", ["model.ch_mult=[1,2,2,2,2]"])


def test_bare_names_find_the_shipped_configs(tmp_path, monkeypatch, capsys):
    from s2dm.cli import main
    from s2dm.io.config import CONFIG_DIR, find_config

    monkeypatch.chdir(tmp_path)  # nowhere near the repository's configs/ folder
    assert find_config("cifar10.yaml") == find_config("cifar10") == CONFIG_DIR / "cifar10.yaml"
    assert load_config("cifar10.yaml").model.ch_mult == [1, 2, 2, 2]
    local = write(tmp_path, {"train": {"steps": 7}})  # a path that exists wins
    assert load_config(local).train.steps == 7
    # a file of the current folder shadows the shipped config of its name, with or without .yaml
    (tmp_path / "digits.yaml").write_text("train:\n  steps: 3\n")
    assert find_config("digits") == find_config("digits.yaml") == Path("digits.yaml")
    assert load_config("digits").train.steps == 3
    with pytest.raises(UserError, match=r"config file not found: cifar11.yaml \(shipped configs.*cifar10.yaml"):
        load_config("cifar11.yaml")
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("digits.yaml", "cifar10.yaml", "celeba.yaml", "study_digits.yaml"))


def test_num_workers_auto_and_capped(monkeypatch):
    from s2dm.util import dist

    assert load_config("configs/cifar10.yaml").data.num_workers == "auto"
    with pytest.raises(UserError, match="data.num_workers"):
        load_config("configs/digits.yaml", ["data.num_workers=many"])
    monkeypatch.setattr(dist, "available_cpus", lambda: 2)
    assert dist.loader_workers("auto") == 1 and dist.loader_workers(4) == 2 and dist.loader_workers(0) == 0
    monkeypatch.setattr(dist, "available_cpus", lambda: 32)
    assert dist.loader_workers("auto") == 8 and dist.loader_workers(4) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks share the node's 32 CPUs
    assert dist.loader_workers("auto") == 3


@pytest.mark.parametrize("overrides,key,words", [
    (["sample.sampler=dimm"], "sample.sampler", "unknown sampler 'dimm'; choose one of ddim, ddpm"),
    (["sample.grid=cosine"], "sample.grid", "unknown grid 'cosine'"),
    (["sample.order=4"], "sample.order", "DEIS order must be one of (0, 1, 2, 3)"),
    (["sample.eps_scale=skip:0"], "sample.eps_scale", "skip must be an integer"),
    (["sample.eps_scale=shrink"], "sample.eps_scale", "cannot parse 'shrink'"),
    (["sample.steps=2000"], "sample.steps", "exceeds"),
    (["sample.steps=0"], "sample.steps", "positive"),
    (["sample.sampler=pndm", "sample.steps=3"], "sample.steps", "at least 4"),
    (["sample.eta=-0.5"], "sample.eta", ">= 0"),
    (["sample.sampler=deis", "sample.eta=0.5"], "sample.eta", "sampler 'ddim' only"),
    (["sample.grid=trailing", "sample.legacy_pndm_index=true"], "sample.legacy_pndm_index", "<= 998"),
    (["sample.batch_size=0"], "sample.batch_size", "positive"),
    (["sample.batch_size=-3"], "sample.batch_size", "positive"),
    (["sample.seed=-1"], "sample.seed", ">= 0"),
    (["sample.mosaic_images=0"], "sample.mosaic_images", "positive"),
    (["train.seed=-1"], "train.seed", ">= 0"),
])
def test_sample_options_are_checked_at_load(overrides, key, words):
    """Every sampler option of the sample: section gets the check `s2dm sample` makes, at
    config load (before step 1, not at the first preview grid), naming the key."""
    with pytest.raises(UserError) as err:
        load_config("configs/digits.yaml", overrides)
    assert str(err.value).startswith(f"{key}: ") and words in str(err.value), str(err.value)


def test_sample_section_has_the_sampler_options():
    from s2dm.io.config import SampleConfig
    from s2dm.samplers.options import SampleOptions

    names = [f.name for f in dataclasses.fields(SampleConfig)]
    assert names[:len(dataclasses.fields(SampleOptions))] == [f.name for f in dataclasses.fields(SampleOptions)]
    assert names[len(dataclasses.fields(SampleOptions)):] == ["mosaic_images", "seed", "batch_size"]
    cfg = load_config("configs/digits.yaml", ["sample.sampler=deis", "sample.order=2",
                                              "sample.eps_scale=skip:9,tau:0.99", "sample.legacy_pndm_index=true"])
    assert SampleOptions.of(cfg.sample) == SampleOptions(sampler="deis", steps=50, order=2,
                                                         eps_scale="skip:9,tau:0.99", legacy_pndm_index=True)


def test_a_sample_typo_fails_before_the_run_folder_exists(tmp_path, capsys):
    from conftest import tiny_args

    from s2dm.cli import main

    out = tmp_path / "runs" / "typo"
    assert main(tiny_args(out, 5, "sample.sampler=dimm")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sample.sampler: unknown sampler 'dimm'") and err.count("\n") == 1
    assert not out.exists() and not out.parent.exists()


def test_saved_configs_with_older_key_names_load_and_resume(tmp_path):
    from s2dm.io.config import config_from_saved
    from s2dm.training.state import check_resumable

    cfg = load_config("configs/digits.yaml")
    saved = cfg.to_dict()
    saved["sample"]["grid_images"] = saved["sample"].pop("mosaic_images")  # the name before "mosaic"
    assert config_from_saved(saved).sample.mosaic_images == cfg.sample.mosaic_images == 100
    check_resumable(cfg, saved)  # no error: the same run
    saved["sample"]["grid_images"] = 7
    with pytest.raises(UserError, match="sample.mosaic_images: the run folder was trained with 7"):
        check_resumable(cfg, saved)
