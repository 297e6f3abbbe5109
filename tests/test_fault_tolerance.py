"""Kill/resume exactness and the table of bad inputs (one error line, exit 2, nothing lost)."""
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_log, tiny_args
from s2dm import load_checkpoint
from s2dm.cli import main
from s2dm.io.checkpoint import LATEST, point, resolve_checkpoint

STEPS = 12
EXTRA = ("train.checkpoint_every=2", "train.log_every=2")


def digest(run):
    ck = load_checkpoint(run)
    h = hashlib.sha256()
    for module in (ck.model, ck.ema):
        for k, v in module.state_dict().items():
            h.update(k.encode() + v.numpy().tobytes())
    return ck.step, h.hexdigest()


def spawn(out, prelude="", extra=()):
    """`s2dm train` in a subprocess; ``prelude`` is Python run before main() (test hooks);
    ``extra``: more config overrides."""
    code = f"import sys\n{prelude}\nfrom s2dm.cli import main\nsys.exit(main(sys.argv[1:]))"
    # Bitwise equality needs the same thread count as the in-process runs (reduction order).
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-c", code, *tiny_args(out, STEPS, *EXTRA, *extra)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(out, step, proc, timeout=600):  # a hang guard, not a speed check
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        try:
            if any(r.get("step", 0) >= step and "loss" in r for r in read_log(out)):
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(tiny_args(out, STEPS, *EXTRA)) == 0
    return digest(out), [r["loss"] for r in read_log(out) if "loss" in r]


def finish_and_compare(out, reference):
    assert main(tiny_args(out, STEPS, *EXTRA)) == 0
    assert digest(out) == reference[0]
    records = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == list(range(2, STEPS + 1, 2))  # no gap, no duplicate
    assert [r["loss"] for r in records] == reference[1]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    for step in (3, 7):  # two kills at different points of the same run
        proc = spawn(out)
        wait_for_step(out, step, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finish_and_compare(out, reference)


# Dies (SIGKILL, no clean-up possible) in the middle of writing the checkpoint of step `at`.
KILL_DURING_SAVE = """
import os, signal, torch, s2dm.util.fileio as fileio
_save = torch.save
def dying_save(obj, f, *a, **k):
    if obj.get("step") == {at}:
        f.write(b"PK\\x03\\x04 half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *a, **k)
fileio.torch.save = dying_save
"""


@pytest.mark.slow
@pytest.mark.parametrize("at", [2, 6])
def test_sigkill_during_checkpoint_write(tmp_path, reference, at):
    out = tmp_path / "run"
    proc = spawn(out, KILL_DURING_SAVE.format(at=at))
    assert proc.wait() == -signal.SIGKILL
    names = [p.name for p in (out / "checkpoints").glob("ckpt_*.pt")]
    assert f"ckpt_{at:08d}.pt" not in names  # the half-written file never took the real name
    if at > 2:
        assert load_checkpoint(out).step == at - 2  # the previous one is intact and `latest`
    assert list((out / "checkpoints").glob(".ckpt_*.tmp"))  # the kill left the half-written temp file
    finish_and_compare(out, reference)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the next save removed it


def test_corrupt_newest_checkpoint_falls_back(tmp_path, reference, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(out, 6, *EXTRA)) == 0
    newest = out / "checkpoints" / "ckpt_00000006.pt"
    newest.write_bytes(newest.read_bytes()[: 1000])  # truncated, e.g. by a full disk elsewhere
    capsys.readouterr()
    finish_and_compare(out, reference)
    err = capsys.readouterr().err
    assert "ckpt_00000006.pt is corrupt or truncated" in err and "resuming from ckpt_00000004.pt" in err


def test_a_save_after_a_fallback_keeps_itself_and_latest(tmp_path, reference):
    """Resumed from step 4 past a corrupt ckpt 6, with keep_last 0: each new save prunes only
    the files before it (it pruned itself, as if the corrupt file were the newest, and left
    `latest` naming a deleted file)."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 6, *EXTRA)) == 0
    ckpts = out / "checkpoints"
    (ckpts / "ckpt_00000006.pt").write_bytes(b"PK\x03\x04 cut")
    (ckpts / "ckpt_00000002.pt").unlink()
    assert main(tiny_args(out, 5, *EXTRA, "train.keep_last=0")) == 0  # from 4 to 5 and a save
    assert sorted(p.name for p in ckpts.glob("ckpt_*.pt")) == ["ckpt_00000005.pt", "ckpt_00000006.pt"]
    assert resolve_checkpoint(out).name == "ckpt_00000005.pt" and load_checkpoint(out).step == 5


def test_a_kill_between_the_save_and_latest_is_mended_by_a_rerun(tmp_path, reference, capsys):
    """`latest` still names the previous checkpoint (killed after the final save, before the
    pointer): the rerun, already trained, points it at the newest it resumed from."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 6, *EXTRA)) == 0
    point(out / "checkpoints", LATEST, out / "checkpoints" / "ckpt_00000004.pt")
    assert main(tiny_args(out, 6, *EXTRA)) == 0
    assert "already trained to step 6" in capsys.readouterr().out
    assert resolve_checkpoint(out).name == "ckpt_00000006.pt" and load_checkpoint(out).step == 6


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_exact(tmp_path, reference):
    out = tmp_path / "run"
    proc = spawn(out)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    stopped = [r for r in read_log(out) if r.get("event") == "stopped"]
    assert len(stopped) == 1 and load_checkpoint(out).step == stopped[0]["step"]
    finish_and_compare(out, reference)


# SIGTERM arrives inside step 5, between two log lines (log_every 2): the saved log window makes
# the resumed run's step-6 line average steps 5 and 6, as the uninterrupted run's does.
TERM_DURING_STEP_5 = """
import os, signal, s2dm.training.loop as tr
_step = tr.train_step
def step(cfg, state, *a, **k):
    if state.step == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return _step(cfg, state, *a, **k)
tr.train_step = step
"""


@pytest.mark.slow
def test_sigterm_between_log_lines_resumes_with_the_same_log(tmp_path, reference):
    out = tmp_path / "run"
    proc = spawn(out, TERM_DURING_STEP_5)
    assert proc.wait(timeout=240) == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]
    stopped = [r for r in read_log(out) if r.get("event") == "stopped"]
    assert [r["step"] for r in stopped] == [5] and load_checkpoint(out).step == 5
    finish_and_compare(out, reference)


# -- bad input: one line, exit 2, nothing lost ---------------------------------------------
def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


def make_images(folder, sizes, corrupt=False):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("L", (size, size), color=i * 20).save(folder / f"{i}.png")
    if corrupt:
        (folder / "bad.png").write_bytes((folder / "0.png").read_bytes()[:20])
    return folder


def foreign_checkpoint(run, tmp_path, change):
    state = torch.load(load_checkpoint(run).path, weights_only=False)
    change(state)
    path = tmp_path / "foreign.pt"
    torch.save(state, path)
    return path


def bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("loss:\n  tau: [0.9\n")
    return p


CASES = {
    "yaml syntax": (lambda r, t: ["train", "--config", str(bad_yaml(t)), "--out", str(t / "o")], "YAML syntax error"),
    "unknown key": (lambda r, t: tiny_args(t / "o", 4, "loss.skp=3"), "loss.skp: unknown key"),
    "wrong type": (lambda r, t: tiny_args(t / "o", 4, "train.batch_size=many"), "train.batch_size: expected int"),
    "tau range": (lambda r, t: tiny_args(t / "o", 4, "loss.tau=1.2"), "loss.tau: must lie in [0, 1]"),
    "skip < 1": (lambda r, t: tiny_args(t / "o", 4, "loss.skip=0"), "loss.skip: must lie in"),
    "skip >= T": (lambda r, t: tiny_args(t / "o", 4, "loss.skip=1000"), "loss.skip: must lie in"),
    "steps <= 0": (lambda r, t: tiny_args(t / "o", 0), "train.steps: must be positive"),
    "missing data": (lambda r, t: tiny_args(t / "o", 4, "data.dataset=celeba", f"data.root={t}/none",
                                            "data.channels=3", "data.image_size=64"), "CelebA"),
    "empty folder": (lambda r, t: tiny_args(t / "o", 4, "data.dataset=folder", f"data.root={(t / 'e').mkdir() or t / 'e'}"),
                     "no images"),
    "unreadable image": (lambda r, t: tiny_args(t / "o", 4, "data.dataset=folder",
                                                f"data.root={make_images(t / 'c', [8, 8], corrupt=True)}"), "bad.png"),
    "image size": (lambda r, t: tiny_args(t / "o", 4, "data.dataset=folder",
                                          f"data.root={make_images(t / 's', [16, 16])}"), "16"),
    "checkpoint shape": (lambda r, t: ["sample", "--ckpt", str(foreign_checkpoint(
        r, t, lambda s: s["config"]["model"].update(ch=64))), "--out", str(t / "o"), "--n", "2"], "do not fit"),
    "newer format": (lambda r, t: ["sample", "--ckpt", str(foreign_checkpoint(
        r, t, lambda s: s.update(format_version=99))), "--out", str(t / "o"), "--n", "2"], "upgrade s2dm"),
    "unknown sampler": (lambda r, t: ["sample", "--ckpt", str(r), "--out", str(t / "o"), "--n", "2", "--sampler", "x"],
                        "unknown sampler"),
    "unknown grid": (lambda r, t: ["sample", "--ckpt", str(r), "--out", str(t / "o"), "--n", "2", "--grid", "x"],
                     "unknown grid"),
    "steps > T": (lambda r, t: ["sample", "--ckpt", str(r), "--out", str(t / "o"), "--n", "2", "--steps", "1001"],
                  "exceeds"),
    "out not writable": (lambda r, t: tiny_args((t / "file").write_text("x") and t / "file" / "run", 4),
                         "cannot create output folder"),
    "sample out not writable": (lambda r, t: ["sample", "--ckpt", str(r), "--n", "2",
                                              "--out", str((t / "f2").write_text("x") and t / "f2" / "o")],
                                "cannot create output folder"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_loses_nothing(name, run_copy, tmp_path, capsys):
    build, message = CASES[name]
    args = build(run_copy, tmp_path)
    before = snapshot(run_copy)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert snapshot(run_copy) == before


def test_disk_full_while_saving_keeps_earlier_checkpoints(run_copy, monkeypatch, capsys):
    import s2dm.util.fileio as fileio

    before = snapshot(run_copy / "checkpoints")

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.torch, "save", full)
    capsys.readouterr()
    assert main(tiny_args(run_copy, 30)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: could not save the checkpoint") and "No space left" in err
    assert snapshot(run_copy / "checkpoints") == before  # no temp file left, nothing replaced


def test_a_mosaic_lost_to_a_kill_is_made_on_resume_and_half_written_files_go(tmp_path, capsys):
    """Killed after a checkpoint, before its preview mosaic (gone, a half-written temp file in its
    place): the resumed run makes that mosaic, the same bytes as the run that was not killed, and
    removes the temp files that kills leave in the run folder, samples/ and checkpoints/. An
    already trained run makes its missing final mosaic too."""
    out = tmp_path / "run"
    extra = (*EXTRA, "train.sample_every=2", "model.ch=16")
    assert main(tiny_args(out, 4, *extra)) == 0
    mosaic4 = out / "samples" / "mosaic_00000004.png"
    made = mosaic4.read_bytes()
    mosaic4.unlink()
    stale = [out / "samples" / ".mosaic_00000004.png.k1ll3d00.tmp", out / ".curves.png.k1ll3d00.tmp",
             out / "checkpoints" / ".best.k1ll3d00.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    assert main(tiny_args(out, 6, *extra)) == 0
    assert mosaic4.read_bytes() == made
    assert (out / "samples" / "mosaic_00000006.png").is_file() and not any(p.exists() for p in stale)

    mosaic6 = out / "samples" / "mosaic_00000006.png"
    made = mosaic6.read_bytes()
    mosaic6.unlink()
    assert main(tiny_args(out, 6, *extra)) == 0
    assert "already trained to step 6" in capsys.readouterr().out
    assert mosaic6.read_bytes() == made and load_checkpoint(out).step == 6


def test_a_mosaic_that_cannot_be_written_is_one_error_line_after_the_checkpoint(tmp_path, capsys, monkeypatch):
    """A full disk (or a read-only samples/) at the preview mosaic: one error line, exit 2, and
    the checkpoint of that step saved before it (it was an OSError traceback, exit 1)."""
    import s2dm.training.loop as loop

    def full(images, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(loop, "save_mosaic", full)
    out = tmp_path / "run"
    assert main(tiny_args(out, 4, *EXTRA, "train.sample_every=2", "model.ch=16")) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("train run:")]  # the progress bar
    assert len(lines) == 1 and lines[0].startswith("error: could not write the preview mosaic ")
    assert "No space left on device" in lines[0] and "Traceback" not in err
    assert load_checkpoint(out).step == 2
