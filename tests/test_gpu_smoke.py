"""scripts/gpu_smoke.py end to end: its CPU part (the whole run on a machine without CUDA)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CPU_CHECKS = ("data", "cpu:train-fp32", "cpu:kill-resume", "cpu:torchrun", "cpu:samplers", "cpu:fd-pixels",
              "cpu:fid")


@pytest.mark.slow
def test_cpu_part_passes_every_check(tmp_path):
    # --standin-inception: the FID line must then say it is not a FID, whatever weights this machine has
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--cpu-only", "--standin-inception",
         "--work-root", str(tmp_path), "--budget", "900"],  # each check's own limit guards it; the total may vary
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for check in CPU_CHECKS:
        assert any(line.startswith(f"PASS {check}: ") for line in lines), (check, proc.stdout)
    for check in ("cpu:train-bf16-compile", "cpu:bench-gpu"):
        assert any(line.startswith(f"SKIP {check}: ") for line in lines), (check, proc.stdout)
    assert not any(line.startswith("FAIL") for line in lines)
    fid = next(line for line in lines if line.startswith("PASS cpu:fid: "))
    assert "STAND-IN" in fid and "NOT a FID" in fid
    assert lines[-1].startswith("gpu_smoke OK: 7 passed, 0 failed, 2 skipped")
    assert not any(tmp_path.iterdir())  # the work folder is removed without --keep
