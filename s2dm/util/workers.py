"""Independent CPU jobs on single-threaded worker processes (``s2dm study`` on a CPU).

A model as small as the digits study's (0.18 M parameters) cannot keep two cores busy from one
process: its operations are too small to split well between threads. Two processes with one
thread each, each on its own job, do about twice the work of one process with two threads;
two processes that each use every core slow each other several times over. Hence: one thread
per job, as many jobs at once as there are CPUs.

Every job runs with ONE thread whatever the number of workers, in-process too: a float
reduction split over threads rounds differently, so a study's numbers would otherwise depend
on the machine's core count. With one thread they do not (same CPU kind, same libraries).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import Interrupted, RunError
from .dist import available_cpus
from .memory import keep_freed_memory


def worker_count(setting: Union[int, str], jobs: int, device: torch.device) -> int:
    """``auto``: one worker per CPU this process may use, at most one per job; off the CPU
    (a GPU does the work) one. A positive number is taken as given, at most one per job."""
    text = str(setting).strip().lower()
    if text != "auto" and not (text.isdigit() and int(text) > 0):
        raise RunError(f"workers: expected 'auto' or a positive integer, got {setting!r}", key="workers")
    if jobs <= 1 or torch.device(device).type != "cpu":
        return 1
    return min(available_cpus() if text == "auto" else int(text), jobs)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the body with one intra-op thread (the previous count restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_STOP = None  # in a worker process: the parent's stop event, set when the parent gets Ctrl-C


def _start_worker(stop) -> None:
    global _STOP
    _STOP = stop
    torch.set_num_threads(1)
    keep_freed_memory()
    # Ctrl-C reaches every process of the group. A worker between jobs must not die of it (the
    # pool would break); a training job installs its own handler (save, then stop), a scoring
    # job finishes its cell. A job still setting up when it came missed it: the parent passes
    # it on through ``stop_requested``.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_requested() -> bool:
    """Whether the process that runs this worker's jobs was asked to stop (Ctrl-C); False
    outside a worker. A job polls it where it can stop cleanly (training: after a step)."""
    return _STOP is not None and _STOP.is_set()


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started inside ignore Ctrl-C from their first instruction (an ignored signal
    stays ignored across exec, and Python then installs no handler): ``_start_worker`` runs
    only after a worker has imported torch, and a Ctrl-C in between printed a worker's
    KeyboardInterrupt traceback. The submissions that start the workers take milliseconds."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_jobs(fn: Callable[..., Any], jobs: Sequence[Tuple], workers: int,
             on_done: Optional[Callable[[int, Any], None]] = None) -> List[Any]:
    """``fn(*job)`` for every job, ``workers`` at a time, each with one thread; the results in
    job order. ``on_done(i, result)`` is called in this process as each job finishes (in the
    order they finish). ``fn`` and the jobs must be picklable (module-level function, plain
    data) when ``workers`` > 1: new processes are spawned, not forked, so that no worker
    inherits this process's threads or open files.

    The first job to fail stops the rest (jobs not yet started never start, running ones
    finish) and its exception is raised here. Ctrl-C reaches the workers too (same process
    group), and ``stop_requested`` passes it on to a job that was still setting up: a training
    job saves its checkpoint and stops, a scoring job finishes its cell, no other job starts;
    this call waits for them, then raises the training job's ``Interrupted`` (or
    KeyboardInterrupt).
    """
    results: List[Any] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        with one_thread():
            for i, job in enumerate(jobs):
                results[i] = fn(*job)
                if on_done is not None:
                    on_done(i, results[i])
        return results
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                               initargs=(stop,))
    futures: dict = {}
    todo = iter(enumerate(jobs))

    def submit_next() -> set:
        """Hand the pool one more job, if any: never more than it runs at once, so a job that
        has not started is still here when Ctrl-C comes (the pool's queue cannot be emptied)."""
        nxt = next(todo, None)
        if nxt is None:
            return set()
        with _children_ignore_sigint():
            future = pool.submit(fn, *nxt[1])
        futures[future] = nxt[0]
        return {future}

    try:
        pending: set = set()
        for _ in range(workers):
            pending |= submit_next()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = futures[future]
                results[i] = future.result()  # a job's exception is raised here
                if on_done is not None:
                    on_done(i, results[i])
                pending |= submit_next()
    except KeyboardInterrupt:
        stop.set()  # running jobs save or finish, then stop
        pool.shutdown(wait=True)
        stopped = [f.exception() for f in futures if f.done() and not f.cancelled()
                   and isinstance(f.exception(), Interrupted)]
        if stopped:
            raise stopped[0] from None  # "stopped by signal 2 at step N; saved ..."
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return results
