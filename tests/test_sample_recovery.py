"""A sample folder survives a kill while its metadata.json is written, and a corrupt
metadata.json is one error line that says how to recover (and recovering that way works)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from s2dm.cli import main

N = 5


def sample_args(run, out):
    return ["sample", "--ckpt", str(run), "--out", str(out), "--n", str(N), "--steps", "2", "--device", "cpu"]


def pngs(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("[0-9]*.png")}


def temps(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob(".*.tmp"))


def check_complete(out, stamps):
    """Every image, unrewritten; a valid metadata.json that counts them; no temp file."""
    assert pngs(out) == stamps and len(stamps) == N
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["n_images"] == N and meta["seeds"] == f"0-{N - 1}" and meta["settings"]["steps"] == 2
    assert meta["complete"] is True
    assert (out / "preview" / "mosaic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert temps(out) == []


# A SIGKILL right before the final metadata.json's temp file is renamed onto its name (the
# first rename puts the settings on record before any image): every PNG is on disk,
# metadata.json holds only the settings, the complete file is a temp file. (If metadata.json
# were written in place, the rename would never happen and the process would exit 0: the test
# checks -9.)
KILL_AT_METADATA_RENAME = """
import os, signal, sys
import s2dm.util.fileio as fileio
_replace = os.replace
renames = []
def dying_replace(src, dst, *a, **k):
    if os.path.basename(dst) == "metadata.json":
        renames.append(dst)
        if len(renames) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *a, **k)
fileio.os.replace = dying_replace
from s2dm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_while_writing_metadata_then_rerun(tiny_run, tmp_path):
    out = tmp_path / "samples"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_METADATA_RENAME, *sample_args(tiny_run, out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    stamps = pngs(out)
    assert len(stamps) == N and json.loads((out / "metadata.json").read_text())["complete"] is False
    assert [t.split(".")[1] for t in temps(out)] == ["metadata"]  # the killed write's temp file
    # the same command again: no image is redone, metadata.json and the mosaic are written
    proc = subprocess.run([sys.executable, "-m", "s2dm", *sample_args(tiny_run, out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_complete(out, stamps)


@pytest.mark.parametrize("text", ['{"settings": ', "", "\x00\x00\x00", "[]", '{"n_images": 5}'])
def test_corrupt_metadata_is_one_error_line_and_deleting_it_recovers(tiny_run, tmp_path, capsys, text):
    out = tmp_path / "samples"
    assert main(sample_args(tiny_run, out)) == 0
    stamps = pngs(out)
    (out / "metadata.json").write_text(text)  # e.g. cut by a full disk or a copy
    capsys.readouterr()
    assert main(sample_args(tiny_run, out)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1 and "Traceback" not in err
    assert lines[-1].startswith(f"error: {out / 'metadata.json'} is truncated or corrupt")
    assert "delete it and rerun the same command" in lines[-1]
    assert pngs(out) == stamps  # nothing lost
    # what the message says works: the images are kept, metadata.json is rebuilt
    (out / "metadata.json").unlink()
    assert main(sample_args(tiny_run, out)) == 0
    check_complete(out, stamps)


KILL_AFTER_IMAGES = """
import os, signal, sys
import s2dm.sampling.folder as folder
_save = folder.save_png
saved = []
def dying_save(img, path):
    _save(img, path)
    saved.append(path)
    if len(saved) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
folder.save_png = dying_save
from s2dm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_run_is_resumed_only_with_its_own_settings(tiny_run, tmp_path, capsys):
    """Killed after 3 of 5 images, before its final metadata.json: a rerun with another sampler
    is refused (it took the 3 images as its own), the same command finishes the folder."""
    out = tmp_path / "samples"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_IMAGES, *sample_args(tiny_run, out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(pngs(out)) == 3
    capsys.readouterr()
    assert main(sample_args(tiny_run, out) + ["--sampler", "ddpm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: --out: {out} holds images made with sampler ddim, not ddpm; choose another output folder"
    assert len(pngs(out)) == 3
    assert main(sample_args(tiny_run, out)) == 0
    check_complete(out, pngs(out))


def test_a_rerun_removes_the_temp_files_of_a_killed_run(tiny_run, tmp_path):
    out = tmp_path / "samples"
    assert main(sample_args(tiny_run, out)) == 0
    stamps = pngs(out)
    left = [out / ".metadata.json.k1ll3d0_.tmp", out / ".000003.png.abcdefgh.tmp",
            out / "preview" / ".mosaic.png.x_y_z123.tmp"]
    for p in left:
        p.write_bytes(b"half a file")
    mine = out / ".notes.txt.12345678.tmp"  # not a name the sample folder writes: kept
    mine.write_text("x")
    assert main(sample_args(tiny_run, out)) == 0
    assert not any(p.exists() for p in left) and mine.exists()
    mine.unlink()
    check_complete(out, stamps)



def test_a_corrupt_sample_png_says_how_to_make_it_again(tiny_run, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(sample_args(tiny_run, out)) == 0
    stamps = pngs(out)
    bad = out / "000001.png"
    bad.write_bytes(bad.read_bytes()[:30])  # cut short, e.g. by a copy
    capsys.readouterr()
    assert main(sample_args(tiny_run, out)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: cannot decode image") and str(bad) in last
    assert last.endswith("; delete it and rerun the same command to make it again")
    bad.unlink()  # what the message says works: that image is made again, the others kept
    assert main(sample_args(tiny_run, out)) == 0
    del stamps["000001.png"]
    assert {k: v for k, v in pngs(out).items() if k != "000001.png"} == stamps and bad.is_file()
