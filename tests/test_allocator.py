"""spanflow/training/allocator.py: inside `heap_kept()` glibc stops handing freed activations back to the kernel,
so a loop that frees and allocates the same large blocks stops page-faulting; on leaving, the free memory goes back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A pass-like loop through glibc's malloc itself (no other allocation in between to pin the heap's top): three
# 20 MB blocks allocated, written and freed, eight times over after one warm-up round. Page faults counted over the
# eight rounds.
CHILD = """
import contextlib, ctypes, json, resource, sys
from spanflow.training.allocator import heap_kept
from spanflow.training.memory import rss_mb

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
SIZE = 20 * 2**20

def rounds(n):
    for _ in range(n):
        blocks = [libc.malloc(SIZE) for _ in range(3)]
        for b in blocks:
            libc.memset(b, 1, SIZE)
        for b in blocks:
            libc.free(b)

out = {}
with heap_kept() if sys.argv[1] == "kept" else contextlib.nullcontext(False) as took:
    rounds(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    rounds(8)
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    out["took"] = took
    out["rss_inside"] = rss_mb()
out["rss_after"] = rss_mb()
print(json.dumps(out))
"""


def _child(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_heap_kept_stops_the_page_faults_of_reallocated_blocks_and_returns_the_memory_after() -> None:
    default, kept = _child("default"), _child("kept")
    assert kept["took"] is True
    pages = 8 * 3 * 20 * 2**20 // 4096  # what eight rounds touch
    assert default["faults"] > pages / 2, default  # glibc's default gives most of it back every round
    assert kept["faults"] < pages / 20, kept  # kept: served from the heap the warm-up grew
    assert kept["rss_inside"] - kept["rss_after"] > 40, kept  # leaving hands the ~60 MB of free heap back
