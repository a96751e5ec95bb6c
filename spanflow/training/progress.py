"""Training progress: a tqdm bar on a terminal; in a log file (Prefect, DVC, CI) one plain line every 30 s,
only when the count moved, with the loss, learning rate, pace and time left."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class Progress:
    def __init__(self, items: list[T], desc: str, every_seconds: float = 30.0, tty: bool | None = None) -> None:
        self.items, self.desc, self.every = items, desc, every_seconds
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar = tqdm(items, desc=desc, unit="batch", leave=False, mininterval=0.1) if self.tty else None
        self.done, self.last_printed, self.postfix = 0, 0, ""
        self.t0 = self.last_time = time.perf_counter()

    def __iter__(self) -> Iterator[T]:
        source: Iterable[T] = self.bar if self.bar is not None else self.items
        for item in source:
            yield item
            self.done += 1
            if self.bar is None:
                self._maybe_print()

    def set_postfix(self, **values: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(refresh=False, **values)
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed else 0.0
        left = (len(self.items) - self.done) / rate if rate else 0.0
        pct = 100 * self.done / max(len(self.items), 1)
        return (
            f"{self.desc}: batch {self.done} of {len(self.items)} ({pct:.0f}%)"
            + (f", {self.postfix}" if self.postfix else "")
            + f", {rate:.2f} batches/s, ~{int(left // 60)}m{int(left % 60):02d}s left"
        )

    def _maybe_print(self) -> None:
        now = time.perf_counter()
        if now - self.last_time >= self.every and self.done > self.last_printed:
            print(self.line(), flush=True)
            self.last_time, self.last_printed = now, self.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
