"""Atomic writes: files follow the umask (as open()'s do); the temp files a killed write leaves are removed."""
import os
import stat

import pytest

from conftest import tiny_args
from s2dm.cli import main
from s2dm.util.fileio import atomic_write_text, remove_stale_temps


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
    assert {"latest", "ckpt_00000002.pt", "config.yaml", "log.jsonl", "000002.png", "mosaic.png",
            "metadata.json", "ref.npz"} <= names
    assert {p.name: oct(mode(p)) for p in files if mode(p) != 0o644} == {}


def test_remove_stale_temps_matches_only_the_named_files(tmp_path):
    a = atomic_write_text(tmp_path / "log.jsonl", "x\n")
    stale = [tmp_path / ".log.jsonl.abcd1234.tmp", tmp_path / ".log.jsonl.zz_9.tmp"]
    other = [tmp_path / ".config.yaml.abcd1234.tmp", tmp_path / "log.jsonl.tmp", tmp_path / ".log.jsonl"]
    for p in stale + other:
        p.write_text("partial")
    assert sorted(remove_stale_temps(tmp_path, "log.jsonl")) == sorted(stale)
    assert all(p.exists() for p in other) and a.read_text() == "x\n"
    assert remove_stale_temps(tmp_path / "missing") == []
    assert remove_stale_temps(tmp_path) == [other[0]]  # every name: only the hidden .NAME.*.tmp form
