"""How one training batch is split into forward/backward passes, and which attention kernel a pass uses.

A pass costs about `overhead + rows x width` (width: the pass's longest chunk, rounded up to the padding
multiple). Splitting a length-sorted batch cuts padding but adds a pass's fixed cost, so the split points
are chosen to minimise that sum. On the 2-core development CPU (bf16, the default backbone) one pass cost
as much as ~316 padded tokens (43 ms, about half of it the per-call cost of ~290 small bf16 matmuls;
`benchmarks/README.md`): batches of near-equal chunks then run in one pass, batches of mixed lengths in several.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch

from spanflow.answering.inference import padded_width
from spanflow.training.attention import MathAttention


def length_sorted_passes(
    idx: list[int],
    lengths: Mapping[int, int] | Sequence[int],
    max_passes: int,
    multiple_of: int = 1,
    overhead_tokens: int = 0,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """The chunks of one batch as at most `max_passes` passes of consecutive length-sorted chunks, with the
    split points that minimise the modelled cost: `overhead_tokens` per pass plus each pass's padded area.
    A pass of several chunks holds at most `max_tokens` padded tokens (a memory bound); where that needs more
    than `max_passes` passes, it wins. The batch stays what the sampler drew; only how it is run changes.
    Ties go to fewer passes."""
    if max_passes <= 1 and max_tokens is None:
        return [list(idx)]
    order = sorted(idx, key=lambda i: lengths[i])
    n = len(order)
    if n <= 1:
        return [order]
    widths = [padded_width(lengths[i], multiple_of) for i in order]
    inf = float("inf")
    # cost[k][j]: cheapest run of the first j sorted chunks in k passes; start[k][j]: where its last pass starts
    cost = [[inf] * (n + 1) for _ in range(n + 1)]
    start = [[0] * (n + 1) for _ in range(n + 1)]
    cost[0][0] = 0.0
    k = 0
    while k < n and (k < max_passes or cost[k][n] == inf):  # past max_passes only while the cap leaves no split
        k += 1
        for j in range(1, n + 1):
            for i in range(k - 1, j):  # last pass = order[i:j], padded to widths[j - 1] (the longest)
                if max_tokens is not None and j - i > 1 and (j - i) * widths[j - 1] > max_tokens:
                    continue
                c = cost[k - 1][i] + overhead_tokens + (j - i) * widths[j - 1]
                if c < cost[k][j]:
                    cost[k][j], start[k][j] = c, i
    best = min(range(1, k + 1), key=lambda m: (cost[m][n], m))
    passes, j = [], n
    for m in range(best, 0, -1):
        i = start[m][j]
        passes.append(order[i:j])
        j = i
    return passes[::-1]


def attention_kernel(device: torch.device, width: int, math_max_width: int) -> contextlib.AbstractContextManager:
    """Math attention (`spanflow.training.attention`) for CPU passes up to `math_max_width` tokens wide, PyTorch's
    default kernel otherwise. Training on the CPU, the flash kernel's backward took a third of a step at width 128
    (29 ms per layer against 5 ms for its forward). With its bf16 backward, math attention made whole steps 1.1-1.3x
    faster from width 160 to 256 and tied at 8 x 384, but it keeps each layer's probabilities (rows x heads x
    width^2 in bf16), where the flash kernel keeps none (`benchmarks/README.md`, eleventh round). They compute the
    same attention; only the rounding differs."""
    if device.type == "cpu" and width <= math_max_width:
        return MathAttention()
    return contextlib.nullcontext()
