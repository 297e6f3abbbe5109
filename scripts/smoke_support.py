#!/usr/bin/env python
"""What ``scripts/gpu_smoke.py`` drives s2dm with: check outcomes, the run's context (work
folder, time limits), child processes with their logs, reading what s2dm wrote (logs,
checkpoints, state trees), and the random CIFAR10 archive. The checks themselves and their
sizes live in gpu_smoke.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("gpu_smoke.py")  # its ``worker`` mode runs s2dm command lines
CIFAR_TRAIN_BATCHES = 5
CIFAR_ROW = 3 * 32 * 32

# ---------------------------------------------------------------------------------------
# outcomes
# ---------------------------------------------------------------------------------------
class CheckFailed(Exception):
    """A check's failure; the message is the FAIL line's reason."""


class CheckSkipped(Exception):
    """A check that does not apply here; the message is the SKIP line's reason."""


@dataclass
class Outcome:
    name: str
    status: str  # PASS | FAIL | SKIP
    text: str
    seconds: float


# ---------------------------------------------------------------------------------------
# the run's context: work folder, time limits, child processes
# ---------------------------------------------------------------------------------------
@dataclass
class Context:
    work: Path
    python: str
    budget_end: float
    inception_weights: Optional[str] = None
    standin_inception: bool = False
    check_end: float = 0.0
    outcomes: List[Outcome] = field(default_factory=list)
    runs: Dict[str, Path] = field(default_factory=dict)  # "<part>:fp32" -> run folder, ...
    losses: Dict[str, float] = field(default_factory=dict)
    weights: Optional[Tuple[str, str, bool]] = None  # (path, how found, stand-in?)

    @property
    def data_root(self) -> Path:
        return self.work / "data"

    def folder(self, part, *names: str) -> Path:  # part: gpu_smoke.Part
        return self.work.joinpath(part.name, *names)

    def log_path(self, name: str, suffix: str) -> Path:
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        return self.work / "logs" / f"{name.replace(':', '-')}.{suffix}"

    def time_left(self) -> float:
        return min(self.check_end, self.budget_end) - time.monotonic()

    def child_env(self, **extra: str) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               # compile caches inside the work folder: a cold compile, as a first run has
               "TORCHINDUCTOR_CACHE_DIR": str(self.work / "cache" / "inductor"),
               "TRITON_CACHE_DIR": str(self.work / "cache" / "triton"),
               # torchrun's torchelastic_* folders too, removed with the work folder
               "TMPDIR": str(self.work / "tmp")}
        (self.work / "tmp").mkdir(parents=True, exist_ok=True)
        env.update(extra)
        return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr_path: Path
    seconds: float

    def error_line(self) -> str:
        """The last meaningful stderr line (s2dm's ``error:`` line, a traceback's last line)."""
        try:
            lines = [ln.strip() for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "(no stderr)"
        errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln or "error" in ln]
        return (errors or lines or ["(no output)"])[-1][:300]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child and everything it started (its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def start(ctx: Context, name: str, cmd: Sequence[str], env: Optional[dict] = None) -> subprocess.Popen:
    """Start ``cmd`` in the work folder, stdout/stderr to ``logs/<name>.out/.err``."""
    out = open(ctx.log_path(name, "out"), "w")
    err = open(ctx.log_path(name, "err"), "w")
    err.write("$ " + " ".join(map(str, cmd)) + "\n")
    err.flush()
    try:
        return subprocess.Popen([str(c) for c in cmd], cwd=ctx.work, env=env or ctx.child_env(), stdout=out,
                                stderr=err, start_new_session=True)
    finally:
        out.close()
        err.close()


def wait(ctx: Context, name: str, proc: subprocess.Popen, t0: float) -> Finished:
    """Wait within the check's time limit; past it the process group is killed: CheckFailed."""
    try:
        proc.wait(timeout=max(0.1, ctx.time_left()))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        which = "the run's budget" if ctx.budget_end <= ctx.check_end else "the check's time limit"
        raise CheckFailed(f"{name} did not finish within {which} (killed after {time.monotonic() - t0:.0f} s; "
                          f"log {ctx.log_path(name, 'err')})") from None
    return Finished(proc.returncode, ctx.log_path(name, "out").read_text(errors="replace"),
                    ctx.log_path(name, "err"), time.monotonic() - t0)


def run(ctx: Context, name: str, cmd: Sequence[str], env: Optional[dict] = None) -> Finished:
    """Run ``cmd`` to its end; a non-zero exit is a CheckFailed naming its error line."""
    if ctx.time_left() <= 1:
        raise CheckFailed(f"no time left for {name}")
    t0 = time.monotonic()
    done = wait(ctx, name, start(ctx, name, cmd, env), t0)
    if done.returncode != 0:
        raise CheckFailed(f"{name} exited {done.returncode}: {done.error_line()} (log {done.stderr_path})")
    return done


def s2dm_cmd(ctx: Context, *args: str) -> List[str]:
    """``python -m s2dm ARGS``: the command line itself."""
    return [ctx.python, "-m", "s2dm", *args]


def worker_cmd(ctx: Context, name: str, calls: Sequence[Sequence[str]], *, deterministic: bool = False,
               join_group: str = "") -> List[str]:
    """One process running several ``s2dm`` command lines in a row (``s2dm.cli.main``, what the
    ``s2dm`` entry point runs), saving a start-up per call; see ``worker``."""
    spec = {"deterministic": deterministic, "join_group": join_group,
            "calls": [{"argv": list(map(str, argv)), "stdout": str(ctx.log_path(f"{name}.{i + 1}", "out"))}
                      for i, argv in enumerate(calls)]}
    path = ctx.log_path(name, "json")
    path.write_text(json.dumps(spec, indent=1))
    return [str(SCRIPT), "worker", str(path)]


def call_stdout(ctx: Context, name: str, i: int) -> str:
    return ctx.log_path(f"{name}.{i}", "out").read_text(errors="replace")


# ---------------------------------------------------------------------------------------
# reading what s2dm wrote
# ---------------------------------------------------------------------------------------
def read_log(run_dir: Path) -> List[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        raise CheckFailed(f"{path} is missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_step(run_dir: Path) -> Optional[int]:
    """The step of the run's newest checkpoint (None: none yet)."""
    from s2dm.errors import CheckpointError  # the driver puts the repository on sys.path first
    from s2dm.io.checkpoint import checkpoint_step

    try:
        return checkpoint_step(run_dir)
    except (CheckpointError, OSError):
        return None


def final_checkpoint(run_dir: Path, steps: int) -> Path:
    path = run_dir / "checkpoints" / f"ckpt_{steps:08d}.pt"
    if latest_step(run_dir) != steps or not path.is_file():
        raise CheckFailed(f"{run_dir} has no checkpoint of step {steps} (latest: {latest_step(run_dir)})")
    return path


@dataclass
class TrainSummary:
    start: dict
    records: List[dict]  # the log lines with a loss

    @property
    def first_loss(self) -> float:
        return self.records[0]["loss"]

    @property
    def last_loss(self) -> float:
        return self.records[-1]["loss"]

    def images_per_s(self) -> float:
        """Median over the log windows after the first (which holds start-up and compiling)."""
        later = [r["images_per_s"] for r in self.records[1:]] or [self.records[0]["images_per_s"]]
        return statistics.median(later)

    def first_window_s(self) -> float:
        r = self.records[0]
        return r["step"] / r["steps_per_s"]


def summarize_run(run_dir: Path, steps: int) -> TrainSummary:
    """The run's start record and loss lines, checked: every step done, every loss finite,
    no skipped step, the final checkpoint written."""
    log = read_log(run_dir)
    starts = [r for r in log if r.get("event") == "start"]
    records = [r for r in log if "loss" in r and "event" not in r]
    if not starts or not records:
        raise CheckFailed(f"{run_dir}/log.jsonl has no start record or no loss line")
    if records[-1]["step"] != steps:
        raise CheckFailed(f"the log ends at step {records[-1]['step']}, not {steps}")
    bad = [r["step"] for r in records if not math.isfinite(r["loss"])]
    if bad:
        raise CheckFailed(f"non-finite loss in the log at steps {bad}")
    if records[-1].get("nonfinite_skipped", 0):
        raise CheckFailed(f"{records[-1]['nonfinite_skipped']} steps skipped for a non-finite loss")
    final_checkpoint(run_dir, steps)
    return TrainSummary(starts[0], records)


def first_difference(a, b, where: str = "") -> Tuple[Optional[str], int]:
    """(the first place where two checkpoint values differ, or None; tensors compared)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}", 0
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}", 1
        if not torch.equal(a, b):
            delta = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else float("nan")
            return f"{where}: max |difference| {delta:.3g}", 1
        return None, 1
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: keys differ ({sorted(map(str, set(a) ^ set(b)))[:3]})", 0
        total = 0
        for key in a:
            diff, n = first_difference(a[key], b[key], f"{where}.{key}" if where else str(key))
            total += n
            if diff:
                return diff, total
        return None, total
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} vs {len(b)}", 0
        total = 0
        for i, (x, y) in enumerate(zip(a, b)):
            diff, n = first_difference(x, y, f"{where}[{i}]")
            total += n
            if diff:
                return diff, total
        return None, total
    return (None if a == b else f"{where}: {a!r} vs {b!r}"), 0


# ---------------------------------------------------------------------------------------
# the data set
# ---------------------------------------------------------------------------------------
def write_cifar_batches(root: Path, per_batch: int, n_test: int, seed: int = 0):
    """Random uint8 images in the layout of cifar-10-python.tar.gz's ``cifar-10-batches-py/``:
    pickled dicts with ``b'data'`` (N x 3072 uint8 rows: 1024 red, 1024 green, 1024 blue
    values, each plane row-major 32x32), ``b'labels'``, ``b'batch_label'`` and
    ``b'filenames'``, pickle protocol 2 as the originals; plus ``batches.meta``. Returns the
    training rows (all batches, in order)."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train = []
    names = [f"data_batch_{i}" for i in range(1, CIFAR_TRAIN_BATCHES + 1)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, size=(n, CIFAR_ROW), dtype=np.uint8)
        batch = {b"batch_label": f"random {name} (gpu_smoke)".encode(),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
                 b"data": data,
                 b"filenames": [f"random_{name}_{i:05d}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        if name != "test_batch":
            train.append(data)
    meta = {b"label_names": [c.encode() for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                   "horse", "ship", "truck")],
            b"num_cases_per_batch": per_batch, b"num_vis": CIFAR_ROW}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.concatenate(train)
