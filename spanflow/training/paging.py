"""Pages of a tensor handed back to the kernel while the process does not read them (Linux's MADV_PAGEOUT).

The contents do not change: a page of a file mapping (a safetensors checkpoint, which Hugging Face loads by
mmap) is read from the file again when touched, an anonymous page comes back from swap, or stays resident where
there is no swap. What it saves is resident memory between now and the next read.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

from spanflow.training.allocator import linux_libc

MADV_PAGEOUT = 21  # linux/mman.h, since Linux 5.4


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    fn = getattr(linux_libc(), "madvise", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()


def page_out(tensor: torch.Tensor) -> int:
    """Ask the kernel to reclaim the whole pages inside a contiguous CPU tensor's bytes; returns how many bytes it
    was asked for (0 off Linux, on another device, for a strided view, or where the kernel refused: before 5.4)."""
    if _MADVISE is None or tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
        return 0
    start = tensor.data_ptr()
    lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: the neighbours' bytes are not ours
    hi = (start + tensor.numel() * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or _MADVISE(lo, hi - lo, MADV_PAGEOUT) != 0:
        return 0
    return hi - lo
