"""Freed memory stays in the process (glibc's allocator), for the small models' speed.

Sampling or training a small model allocates and frees the same few-megabyte activations at
every layer of every call. glibc serves blocks above its mmap threshold (128 KiB, raised only
as blocks get freed) with fresh ``mmap`` pages, and returns free heap tops to the system
beyond its trim threshold; a new block then costs a page fault per 4 KiB on first touch. For
the digits study's model that was a quarter of the run time (scripts/bench_speed.py). The CLI
and the study's worker processes raise both thresholds once at start-up; the process then
keeps at most its peak memory. A library user can call ``keep_freed_memory()`` likewise.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest; blocks above it (data sets) still get their own pages
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where there is no
    glibc ``mallopt`` (macOS, Windows, musl), which changes nothing there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
