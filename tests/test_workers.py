"""util/workers.py: worker processes and Ctrl-C."""
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT

SCRIPT = """
import pathlib, sys, time
from s2dm.util.workers import run_jobs

def job(x):
    time.sleep(0.5)
    return x

if __name__ == "__main__":
    pathlib.Path(sys.argv[1]).write_text("starting the workers")
    try:
        run_jobs(job, [(i,) for i in range(4)], 2)
    except KeyboardInterrupt:
        sys.exit(130)
"""


def test_ctrl_c_while_the_workers_start_prints_no_traceback(tmp_path):
    """Ctrl-C (SIGINT to the process group) while the spawned workers still import torch, before
    their initializer ignores it: they ignore it from birth (each printed a KeyboardInterrupt
    traceback), and the caller gets its KeyboardInterrupt."""
    script, marker = tmp_path / "jobs.py", tmp_path / "started"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(marker)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a hang guard
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    time.sleep(0.2)  # the workers are spawned (milliseconds) and importing torch (over a second)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


JOBS_THAT_MISS_THE_SIGNAL = """
import pathlib, sys, time
from s2dm.util.workers import run_jobs, stop_requested

def job(folder, i):
    # like a training job still setting up: the worker ignores SIGINT, only the parent's word stops it
    pathlib.Path(folder, f"started-{i}").touch()
    deadline = time.time() + 300
    while time.time() < deadline:
        if stop_requested():
            pathlib.Path(folder, f"stopped-{i}").touch()
            return
        time.sleep(0.05)

if __name__ == "__main__":
    try:
        run_jobs(job, [(sys.argv[1], i) for i in range(6)], 2)
    except KeyboardInterrupt:
        sys.exit(130)
"""


def test_ctrl_c_reaches_jobs_that_missed_it_and_starts_no_other(tmp_path):
    """Six jobs on two workers, Ctrl-C while the first two run: those two learn of it through
    stop_requested (the SIGINT itself is ignored in a worker) and no queued job starts (the pool
    held one more, which then ran to its end: a study's queued training runs trained in full)."""
    script, folder = tmp_path / "jobs.py", tmp_path / "marks"
    script.write_text(JOBS_THAT_MISS_THE_SIGNAL)
    folder.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300  # a hang guard
    while not all((folder / f"started-{i}").exists() for i in (0, 1)):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)  # the jobs would run 300 s without the stop
    assert proc.returncode == 130, err
    assert sorted(p.name for p in folder.iterdir()) == ["started-0", "started-1", "stopped-0", "stopped-1"]
