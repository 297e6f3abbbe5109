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
])
def test_errors_name_the_dotted_key(override, key):
    with pytest.raises(UserError) as err:
        load_config("configs/digits.yaml", [override])
    assert str(err.value).startswith(key), str(err.value)


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
