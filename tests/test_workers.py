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
