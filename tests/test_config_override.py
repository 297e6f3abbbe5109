"""``--set KEY=VALUE``: how io.config.parse_override reads the value, and its errors."""
import pytest

from s2dm.errors import UserError
from s2dm.io.config import apply_overrides, load_config, parse_override


@pytest.mark.parametrize("text, key, value", [
    ("train.steps=200", ["train", "steps"], 200),
    ("a.b=1_000", ["a", "b"], 1000),
    ("optim.lr=2.5e-3", ["optim", "lr"], 0.0025),
    ("optim.lr=0.5", ["optim", "lr"], 0.5),
    ("a.b=.5", ["a", "b"], 0.5),
    ("model.ch_mult=[1,2,2]", ["model", "ch_mult"], [1, 2, 2]),
    ("model.attn_resolutions=[]", ["model", "attn_resolutions"], []),
    ("data.random_flip=true", ["data", "random_flip"], True),
    ("data.random_flip=False", ["data", "random_flip"], False),
    ("data.root=/tmp/x", ["data", "root"], "/tmp/x"),
    ("loss.type= l0 ", ["loss", "type"], "l0"),
    ("data.root=", ["data", "root"], ""),  # an empty value is the empty string, not None
    ("data.root=   ", ["data", "root"], ""),
    ("data.root=null", ["data", "root"], None),
    ("a.b=c=d", ["a", "b"], "c=d"),  # split at the first '='
    ("sample.eps_scale=skip:9,tau:0.99", ["sample", "eps_scale"], "skip:9,tau:0.99"),
    ("a.b=[1,", ["a", "b"], "[1,"),  # not YAML: the text as given
    (" train.steps =3", ["train", "steps"], 3),
])
def test_values_are_read_as_yaml(text, key, value):
    got_key, got = parse_override(text)
    assert got_key == key and got == value and type(got) is type(value)


def test_scientific_notation_without_a_dot_becomes_a_float_in_the_config():
    # YAML 1.1 (PyYAML's own) read "1e-4" as a string; s2dm reads numbers as YAML 1.2 does
    assert parse_override("optim.lr=1e-4") == (["optim", "lr"], 1e-4)
    cfg = load_config("configs/digits.yaml", ["optim.lr=1e-4", "loss.tau=5E-1", "train.steps=200"])
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.loss.tau == 0.5 and cfg.train.steps == 200 and type(cfg.train.steps) is int


@pytest.mark.parametrize("text, words", [
    ("train.steps", "expected KEY=VALUE"),
    ("", "expected KEY=VALUE"),
    ("=3", "bad key ''"),
    (" =3", "bad key ''"),
    ("a..b=1", "bad key 'a..b'"),
    (".a=1", "bad key '.a'"),
    ("a.=1", "bad key 'a.'"),
])
def test_errors(text, words):
    with pytest.raises(UserError, match="override") as info:
        parse_override(text)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_apply_overrides_nests_and_refuses_a_value_as_section():
    data = {"train": {"steps": 1}, "loss": {"type": "s2"}}
    assert apply_overrides(data, ["train.steps=5", "model.ch=32"]) == {
        "train": {"steps": 5}, "loss": {"type": "s2"}, "model": {"ch": 32}}
    with pytest.raises(UserError, match="steps is not a section"):
        apply_overrides(data, ["train.steps.x=1"])


def test_an_override_fills_an_empty_yaml_section(tmp_path):
    """`train:` with no body loads as None; `--set train.steps=5` makes it a section (it was
    refused as 'train is not a section')."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\nloss:\n  type: l0\n")
    assert load_config(path).train.steps == load_config().train.steps
    cfg = load_config(path, ["train.steps=5", "train.eval.n=70"])
    assert cfg.train.steps == 5 and cfg.train.eval.n == 70 and cfg.loss.type == "l0"


def test_a_number_for_a_text_key_says_to_quote_it():
    with pytest.raises(UserError) as info:
        load_config(None, ["data.root=2024"])
    assert str(info.value) == ("data.root: expected str, got int 2024 (quote it as YAML text, '...'; an override "
                               "needs the quotes to reach s2dm, e.g. \"data.root='...'\" in a shell)")
    assert load_config(None, ["data.root='2024'"]).data.root == "2024"
