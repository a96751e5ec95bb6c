"""glibc's malloc told to keep the memory a training loop frees, so the next pass does not fault it back in.

Every training pass allocates and frees the same large activations. glibc serves blocks above its mmap threshold
with fresh mappings, and it gives the top of its heap back to the kernel once more than its trim threshold lies
free there; both thresholds follow the largest block freed so far (at most 32 and 64 MB). Either way the next
pass touches pages the kernel must zero-fill again: ~34,000 page faults (130 MB) per step at chunk 128 on the
development CPU, ~8% of the step's CPU time (benchmarks/README.md, seventh round). While `heap_kept()` is active,
blocks up to 32 MB come from the heap and the heap is not trimmed; the peak is the same (the heap already grew
to it), memory between steps stays with the process for reuse. On leaving, the free memory goes back to the
kernel (`malloc_trim`) and the thresholds stay at the values glibc's own adjustment tends to: 32 and 64 MB.
Without glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper bound for it on 64-bit
KEEP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim while training
AFTER_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's own adjustment sets beside a 32 MB mmap threshold

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def linux_libc() -> ctypes.CDLL | None:
    """The C library this Linux process runs on (its global symbols, errno kept); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _glibc() -> ctypes.CDLL | None:
    libc = linux_libc()
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def heap_kept() -> Iterator[bool]:
    """Inside: freed memory stays with the process. Yields whether glibc took the settings."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    )
    try:
        yield ok
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def keeping_heap(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn` run inside `heap_kept()`."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with heap_kept():
            return fn(*args, **kwargs)

    return run
