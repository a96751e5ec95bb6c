"""Peak RSS is the process's own (spanflow/training/memory.py): a subprocess of a big process does not report its
parent's peak, as `ru_maxrss` does on Linux across fork + exec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from spanflow.training.memory import STATUS, peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
CHILD = (
    "import resource; from spanflow.training.memory import peak_rss_mb; "
    "print(peak_rss_mb(), resource.getrusage(0).ru_maxrss)"
)

pytestmark = pytest.mark.skipif(not STATUS.exists(), reason="VmHWM is Linux's")


def test_peak_grows_with_what_the_process_touches() -> None:
    """In a fresh process: this one's high-water mark already holds whatever earlier tests used."""
    code = (
        "from spanflow.training.memory import peak_rss_mb; before = peak_rss_mb(); block = bytearray(256 * 2**20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "print(before, peak_rss_mb())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    before, after = (float(x) for x in out.stdout.split())
    assert after >= before + 200


def test_a_child_of_a_big_process_reports_its_own_peak_not_its_parents() -> None:
    block = bytearray(512 * 2**20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    parent = peak_rss_mb()
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True)
    child_mb, child_maxrss_kb = (float(x) for x in out.stdout.split())
    assert parent > 512
    assert child_maxrss_kb / 1024 >= parent * 0.9  # what ru_maxrss said: the parent's peak carried over
    assert child_mb < 100  # a bare interpreter's own
    del block


def test_a_reset_starts_a_new_peak_so_each_stage_reports_its_own() -> None:
    code = (
        "from spanflow.training.memory import peak_rss_mb, reset_peak_rss\n"
        "block = bytearray(256 * 2**20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "del block; first = peak_rss_mb(); ok = reset_peak_rss(); print(first, peak_rss_mb(), ok)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    first, second, ok = out.stdout.split()
    assert ok == "True"
    assert float(first) - float(second) >= 200  # the first stage's block is not the second's peak
