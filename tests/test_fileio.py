"""Files s2dm writes follow the umask, as files written by open() do."""
import os
import stat

import pytest

from conftest import tiny_args
from s2dm.cli import main
from s2dm.util.fileio import atomic_write_text


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_write_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    path = atomic_write_text(tmp_path / "a.txt", "x")
    plain = tmp_path / "b.txt"
    plain.write_text("x")
    assert mode(path) == mode(plain) == expected


def test_every_output_is_readable_by_others_under_umask_022(tmp_path, umask):
    umask(0o022)
    run = tmp_path / "run"
    assert main(tiny_args(run, 2, "train.checkpoint_every=2")) == 0
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--steps", "2", "--device", "cpu"]) == 0
    assert main(["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--n", "100",
                 "--out", str(run / "ref.npz")]) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"latest", "ckpt_00000002.pt", "config.yaml", "log.jsonl", "000002.png", "grid.png",
            "metadata.json", "ref.npz"} <= names
    assert {p.name: oct(mode(p)) for p in files if mode(p) != 0o644} == {}
