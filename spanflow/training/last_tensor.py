"""A tensor derived from the last tensor asked about, kept until another comes or that one changes in place.

The layers of one pass read the same tensor: query, key and value the same hidden states (their bf16 cast,
`spanflow.models.lora_fused`), every attention layer the same mask (its 0 / -inf bias,
`spanflow.training.attention`). Deriving it once per pass saves the work and, for a tensor autograd keeps, the memory.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable

import torch


class LastDerived(threading.local):
    """`make(x, *args)`, made once for the last `x` and `args`: the source is held by weak reference, the result until
    the next call that differs (one per thread). An inference tensor has no version counter to tell an in-place change,
    so its result is made afresh every time."""

    def __init__(self, make: Callable[..., torch.Tensor]) -> None:
        self.make = make
        self.source: weakref.ref | None = None
        self.key: tuple = ()
        self.value: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, *args: Hashable) -> torch.Tensor:
        if x.is_inference():
            return self.make(x, *args)
        key = (x._version, torch.is_grad_enabled(), *args)
        if self.source is None or self.source() is not x or self.key != key:
            self.source, self.key, self.value = weakref.ref(x), key, self.make(x, *args)
        return self.value
