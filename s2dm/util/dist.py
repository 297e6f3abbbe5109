"""Where work runs: the device choice and torchrun ranks (PyTorch's own torch.distributed).

A process started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``) with ``WORLD_SIZE`` > 1 joins a process group when the
CLI calls ``init()``; any other process is a plain single process, and every helper here then
does the trivial thing (rank 0 of 1, barrier a no-op, ``shard(xs)`` = ``xs``).

Backends: ``gloo`` on a machine without CUDA; with CUDA the group is
``cpu:gloo,cuda:nccl``: collectives on CUDA tensors (DDP's gradient all-reduce) go through
NCCL and those on CPU tensors (flags, float64 FID sums, Python objects) through gloo. Each
rank then uses ``cuda:LOCAL_RANK`` for ``--device auto`` / ``cuda``.

Errors: a rank that raises while the others wait in a collective would hang them, so code
that may fail on one rank only runs inside ``same_outcome()``, which gathers every rank's
``S2dmError`` and raises the first one, of its class, on all ranks (``all_ranks=True``, so the
CLI prints it once, on rank 0).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import ConfigError, RunError, S2dmError


# ---------------------------------------------------------------- the process group

def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RunError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def is_initialized() -> bool:
    import torch.distributed as dist  # torch.distributed bits: only under torchrun

    return dist.is_available() and dist.is_initialized()


def backend_for_machine() -> str:
    """``cpu:gloo,cuda:nccl`` where CUDA and NCCL exist, else ``gloo``."""
    import torch.distributed as dist  # torch.distributed bits: only under torchrun

    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def init(timeout_minutes: float = 30.0) -> bool:
    """Join torchrun's process group when WORLD_SIZE > 1 (idempotent); returns whether this
    process is one of several ranks. Plain processes (no torchrun, or one rank) do nothing."""
    if is_initialized():
        return True
    if env_world_size() <= 1:
        return False
    import torch.distributed as dist  # torch.distributed bits: only under torchrun

    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RunError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start several ranks with "
                       "torchrun, which sets them (docs/distributed.md)")
    if not dist.is_available():
        raise RunError("this PyTorch build has no torch.distributed; run one process (no torchrun)")
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise RunError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend_for_machine(),
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def env_rank() -> int:
    """RANK as torchrun set it (0 when unset): known before and after the process group."""
    return int(os.environ.get("RANK", "0")) if env_world_size() > 1 else 0


@contextlib.contextmanager
def session():
    """What the CLI runs a verb in: join torchrun's process group (if launched by it), send
    the stdout of ranks other than 0 to /dev/null (results are printed once), and leave the
    group at the end, also after an error."""
    init()
    quiet = open(os.devnull, "w") if env_rank() != 0 else None
    finished = False
    try:
        with (contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext()):
            yield
        finished = True
    except S2dmError as exc:
        _share_error(exc)
        raise
    finally:
        if quiet:
            quiet.close()
        cleanup(wait_for_all=finished)


def cleanup(wait_for_all: bool = False) -> None:
    """Leave the process group (no-op for a plain process). ``wait_for_all``: first wait until
    every rank is done. Rank 0 writes results after the last collective; a rank that left
    the group and exited meanwhile closed its gloo connections under rank 0's, which then
    aborted once in a CI run ("terminate called without an active exception"). After an
    error there is no waiting: another rank may be gone."""
    if is_initialized():
        import torch.distributed as dist  # torch.distributed bits: only under torchrun

        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


ERROR_KEY = "s2dm/error"
ERROR_WAIT = datetime.timedelta(seconds=5)


def _share_error(exc: S2dmError) -> None:
    """An error raised outside ``same_outcome`` (a check that every rank makes by itself: a
    missing checkpoint, a bad option) is said once: rank 0 leaves its text in torchrun's
    key-value store, and a rank whose own error reads the same marks it ``all_ranks``. No
    collective: a rank that fails alone waits ``ERROR_WAIT`` at most, then says its own."""
    if getattr(exc, "all_ranks", False) or world_size() == 1:
        return
    try:
        import torch.distributed as dist  # torch.distributed bits: only under torchrun

        store = dist.distributed_c10d._get_default_store()
        if rank() == 0:
            store.set(ERROR_KEY, str(exc))
        else:
            store.wait([ERROR_KEY], ERROR_WAIT)
            if store.get(ERROR_KEY).decode() == str(exc):
                exc.all_ranks = True
    except Exception:  # no store, rank 0 gone or silent: this rank says its own error
        pass


def error_text(exc: BaseException, message: Optional[str] = None) -> Optional[str]:
    """How a rank reports an error (its ``message``, default ``str(exc)``): rank 0 reports every
    error; other ranks stay quiet about errors every rank raised (``all_ranks``) and prefix
    their own with their rank."""
    message = str(exc) if message is None else message
    if env_rank() == 0:
        return message
    if getattr(exc, "all_ranks", False):
        return None
    return f"[rank {env_rank()}] {message}"


def rank() -> int:
    if is_initialized():
        import torch.distributed as dist  # torch.distributed bits: only under torchrun

        return dist.get_rank()
    return 0


def world_size() -> int:
    if is_initialized():
        import torch.distributed as dist  # torch.distributed bits: only under torchrun

        return dist.get_world_size()
    return 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> Optional[str]:
    if not is_initialized():
        return None
    import torch.distributed as dist  # torch.distributed bits: only under torchrun

    return str(dist.get_backend())


def describe() -> str:
    """``"2 ranks (gloo)"`` / ``"1 process"``: for log lines."""
    if world_size() == 1:
        return "1 process"
    return f"{world_size()} ranks ({backend()})"


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs)


_NOTED = set()


def note(msg: str, once: bool = False) -> None:
    """``note: msg`` on stderr, from rank 0 only (every rank computes the same); ``once``: the
    first time this message comes up in the process."""
    if not is_main() or (once and msg in _NOTED):
        return
    _NOTED.add(msg)
    print(f"note: {msg}", file=sys.stderr)


# ---------------------------------------------------------------- devices

def pick_device(name: str | None) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unavailable or unknown device is a RunError.
    Under torchrun ``auto`` and ``cuda`` mean this rank's GPU, ``cuda:LOCAL_RANK``."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise RunError(f"device {name}: CUDA is not available on this machine", key="device")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RunError(f"device {name!r} is not a device (try cpu, cuda, cuda:1)", key="device") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RunError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)", key="device")
    if dev.type == "cuda" and world_size() > 1:
        if dev.index is not None and dev.index != local_rank():
            raise RunError(f"device {name}: under torchrun each rank uses its own GPU (cuda:LOCAL_RANK); "
                           "use device cuda (or auto)", key="device")
        dev = torch.device("cuda", local_rank())
    return dev


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def loader_workers(setting: Union[int, str]) -> int:
    """``data.num_workers`` as a process count: ``auto`` is one per CPU beyond the one the
    training loop needs, at most 8; a number above the CPUs available is lowered to them
    (more loader processes than CPUs only compete with the training for them). Under
    torchrun the CPUs are shared among the ranks of a node."""
    cpus = max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # this rank's share
    if setting == "auto":
        return min(8, cpus - 1)
    return min(int(setting), cpus)


# ---------------------------------------------------------------- collectives

def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist  # torch.distributed bits: only under torchrun

        dist.barrier()


def all_reduce_sum(values: Any) -> np.ndarray:
    """Sum over ranks of a float64 array (or list of numbers), exactly as the array is given:
    the float64 sums of FID statistics and of log windows."""
    arr = np.asarray(values, dtype=np.float64)
    if world_size() == 1:
        return arr
    import torch.distributed as dist  # torch.distributed bits: only under torchrun

    t = torch.from_numpy(np.ascontiguousarray(arr)).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (picklable objects; small ones)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist  # torch.distributed bits: only under torchrun

    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    import torch.distributed as dist  # torch.distributed bits: only under torchrun

    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def same_outcome():
    """Run a block that may raise ``S2dmError`` on some ranks only; afterwards every rank
    raises the first rank's error (or none), of the same class and key, with ``all_ranks``.
    A plain process just runs the block."""
    if world_size() == 1:
        yield
        return
    raised = None
    try:
        yield
    except S2dmError as exc:
        raised = exc  # pickled whole: class, message, key, remedy
    first = next((r for r in all_gather_object(raised) if r is not None), None)
    if first is not None:
        raise first.copy(all_ranks=True)


def run0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (file-system changes, reads that must agree); its result, or
    its S2dmError, reaches every rank."""
    result = None
    with same_outcome():
        if is_main():
            result = fn()
    return broadcast_object(result)


# ---------------------------------------------------------------- splitting work

def shard_bounds(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> tuple:
    """[start, stop) of this rank's contiguous part of n items; parts differ by at most one."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return n * r // w, n * (r + 1) // w


def shard(items: Sequence, rank_: Optional[int] = None, world: Optional[int] = None) -> list:
    """This rank's contiguous part of ``items`` (seeds, files): the concatenation of all
    ranks' parts, in rank order, is ``items``."""
    a, b = shard_bounds(len(items), rank_, world)
    return list(items[a:b])


def per_rank_batch(global_batch: int, key: str = "train.batch_size") -> int:
    """The per-rank share of a global batch; it must divide evenly (so the DDP mean of the
    per-rank mean losses is the mean over the global batch)."""
    w = world_size()
    if global_batch % w:
        raise ConfigError(f"{key}: {global_batch} is not divisible by the {w} ranks torchrun started; "
                          f"the global batch is split evenly (choose a multiple of {w})", key=key, all_ranks=True)
    return global_batch // w
