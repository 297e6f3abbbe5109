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


FORKED = """import os, sys, time
sys.path.insert(0, {root!r})
from s2dm.util.folderlock import FolderLock
lock = FolderLock(sys.argv[1], "test holder")
lock.take()
if os.fork() == 0:  # a forked worker (a DataLoader's) outliving its parent
    time.sleep(60)
    os._exit(0)
print("held", flush=True)
time.sleep(600)
"""


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def holder(tmp_path):
    """Another process holding a folder's lock: ``hold(folder)``; killed at the end."""
    procs = []

    def hold(folder, script=HOLD):
        proc = subprocess.Popen([sys.executable, "-c", script.format(root=str(ROOT)), str(folder)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc
    yield hold
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # forked children too
        except ProcessLookupError:
            pass
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


def test_a_forked_child_does_not_keep_its_dead_parents_lock(tmp_path, holder):
    """DataLoader workers share the lock's open file: after a SIGKILL of the trainer they kept
    it for seconds, and a rerun at once was refused, naming the dead process."""
    folder = tmp_path / "out"
    proc = holder(folder, FORKED)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with FolderLock(folder, "me") as lock:
        lock.take()  # the child still lives (its session is killed at the end)
        assert lock.fd is not None


def test_a_failed_start_leaves_no_folder_the_lock_made(tmp_path):
    with FolderLock(tmp_path / "a" / "b", "x") as lock:
        lock.take()
        assert (tmp_path / "a" / "b" / LOCK_NAME).is_file()
    assert list(tmp_path.iterdir()) == []  # nothing was written: both folders go
    (tmp_path / "a").mkdir()
    with FolderLock(tmp_path / "a" / "b", "x") as lock:
        lock.take()
        (tmp_path / "a" / "b" / "result.txt").write_text("kept")
    assert (tmp_path / "a" / "b" / "result.txt").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["result.txt"]


def test_the_lock_file_follows_the_umask(tmp_path):
    """A group's shared folder (umask 002): another member must be able to take a lock file
    that a killed run left behind."""
    mask = os.umask(0o002)
    try:
        with FolderLock(tmp_path, "x") as lock:
            lock.take()
            assert (tmp_path / LOCK_NAME).stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(mask)


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
