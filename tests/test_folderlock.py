"""One s2dm process at a time writes into a folder: a second train, sample, eval or study on
it is one error line (exit 2) before it changes anything, and a killed holder leaves no lock."""
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_args
from s2dm.cli import main
from s2dm.errors import CheckpointError, RunError
from s2dm.io.checkpoint import checkpoint_stamp, read_checkpoint
from s2dm.util.folderlock import LOCK_NAME, FolderLock

HOLD = """import sys, time
sys.path.insert(0, {root!r})
from s2dm.util.folderlock import FolderLock
with FolderLock(sys.argv[1], "test holder") as lock:
    lock.take()
    print("held", flush=True)
    time.sleep(600)
"""


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def holder(tmp_path):
    """Another process holding a folder's lock: ``hold(folder)``; killed at the end."""
    procs = []

    def hold(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT)), str(folder)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc
    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_the_file_goes_with_the_last(tmp_path):
    folder = tmp_path / "out"
    with FolderLock(folder, "first") as first:
        first.take()
        with pytest.raises(RunError) as exc, FolderLock(folder, "second") as second:
            second.take()
        assert exc.value.key == "out" and f"(pid {os.getpid()}, first)" in str(exc.value)
        assert (folder / LOCK_NAME).is_file()
    assert not (folder / LOCK_NAME).exists()  # released: the file goes
    with FolderLock(folder, "third") as third:
        third.take()
        assert third.fd is not None


def test_taking_without_create_makes_no_folder(tmp_path):
    with FolderLock(tmp_path / "new", "x") as lock:
        lock.take(create=False)
        assert lock.fd is None and not (tmp_path / "new").exists()


def test_a_killed_holder_leaves_a_lock_that_the_next_process_takes(tmp_path, holder):
    folder = tmp_path / "out"
    proc = holder(folder)
    with pytest.raises(RunError, match=f"pid {proc.pid}, test holder"), FolderLock(folder, "me") as lock:
        lock.take()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / LOCK_NAME).is_file()  # left behind, but no longer locked
    with FolderLock(folder, "me") as lock:
        lock.take()
    assert not (folder / LOCK_NAME).exists()


def test_train_into_a_run_folder_in_use_is_refused_before_anything_changes(tmp_path, holder, capsys):
    """A job submitted twice: the second one deleted the first one's log and wrote its own
    checkpoints and config.yaml over the first one's, both exiting 0."""
    out = tmp_path / "run"
    assert main(tiny_args(out, 2, "train.checkpoint_every=2")) == 0
    before = files(out)
    proc = holder(out)
    capsys.readouterr()
    assert main(tiny_args(out, 4, "train.checkpoint_every=2")) == 2
    assert main(tiny_args(out, 2, "loss.type=l0") + ["--resume", "never", "--force"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(f"is being written by another s2dm process (pid {proc.pid}, test holder)" in line
                                 for line in err)
    assert files(out) == {**before, out.joinpath(LOCK_NAME).relative_to(out): (out / LOCK_NAME).read_bytes()}
    proc.kill()
    proc.wait()
    assert main(tiny_args(out, 4, "train.checkpoint_every=2")) == 0  # the holder gone: it resumes
    assert not (out / LOCK_NAME).exists()


def test_sample_eval_and_study_into_a_folder_in_use_are_refused(tmp_path, holder, capsys):
    from test_study import TOY, write_study

    run = tmp_path / "run"
    assert main(tiny_args(run, 2, "train.checkpoint_every=2", "model.ch=16")) == 0
    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--config", "configs/digits.yaml", "--features", "pixels", "--out", str(ref)]) == 0
    folders = {name: tmp_path / name for name in ("samples", "eval", "study")}
    commands = {
        "samples": ["sample", "--ckpt", str(run), "--n", "4", "--steps", "2", "--out", str(folders["samples"])],
        "eval": ["eval", "--ckpt", str(run), "--samplers", "ddim", "--steps", "2", "--n", "8", "--ref", str(ref),
                 "--features", "pixels", "--out", str(folders["eval"])],
        "study": ["study", "--config", str(write_study(tmp_path, TOY)), "--out", str(folders["study"]), "--quick"],
    }
    for name, args in commands.items():
        proc = holder(folders[name])
        capsys.readouterr()
        assert main(args) == 2, name
        err = capsys.readouterr().err
        assert f"{folders[name]} is being written by another s2dm process (pid {proc.pid}" in err, err
        assert [p.name for p in folders[name].iterdir()] == [LOCK_NAME], name
        proc.kill()
        proc.wait()
    assert main(commands["samples"]) == 0  # the holder gone
    assert not (folders["samples"] / LOCK_NAME).exists() and len(list(folders["samples"].glob("*.png"))) == 4


def test_a_checkpoint_removed_while_it_is_read_is_one_clear_error(tmp_path, monkeypatch):
    """A run training beside `s2dm sample` pruned the checkpoint it was loading: a traceback
    (FileNotFoundError), or "corrupt or truncated"."""
    import s2dm.io.checkpoint as checkpoint

    gone = tmp_path / "checkpoints" / "ckpt_00000007.pt"
    monkeypatch.setattr(checkpoint, "resolve_checkpoint", lambda path: path)  # it was there when looked up
    for read in (checkpoint_stamp, read_checkpoint):
        with pytest.raises(CheckpointError, match="was removed while s2dm read it"):
            read(gone)
