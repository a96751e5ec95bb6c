"""Peak resident memory of this process, as the train/evaluate stages and the benchmarks report it."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB: Linux's VmHWM, the high-water mark of this process's own
    memory. Not `ru_maxrss`: across fork + exec Linux carries the parent's peak into the child's `ru_maxrss`, so a
    subprocess started by a 800 MB benchmark process reported at least 800 MB whatever it used itself."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)
