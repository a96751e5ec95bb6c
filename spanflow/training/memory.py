"""Resident memory of this process, peak and current, as the train/evaluate stages, the benchmarks and the tests
read it."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status (`VmHWM`, `VmRSS`, ...) in MiB; None where there is none (not Linux)."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB: Linux's VmHWM, the high-water mark of this process's own
    memory. Not `ru_maxrss`: across fork + exec Linux carries the parent's peak into the child's `ru_maxrss`, so a
    subprocess started by a 800 MB benchmark process reported at least 800 MB whatever it used itself."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current resident set (Linux: `5` to /proc/self/clear_refs), so a stage
    run inside a longer process (the qa-pipeline flow) reports its own peak, not the process's; False where the
    kernel does not allow it (then peaks stay process-wide)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    """This process's resident set now, in MiB (Linux's VmRSS); None where /proc has no such line."""
    return _status_mb("VmRSS")


def mapped_mb(path: str | Path) -> float:
    """Resident MiB of this process's mappings of the file `path` (/proc/self/smaps; 0.0 where there is none)."""
    target, total, inside = str(Path(path).resolve()), 0, False
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split(maxsplit=5)
                if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                    inside = len(head) == 6 and head[5].rstrip("\n") == target
                elif inside and head[0] == "Rss:":
                    total += int(head[1])  # kB
    except OSError:
        return 0.0
    return total / 1024
