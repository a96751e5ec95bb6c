"""The extractive-QA training loss: cross-entropy of the start and of the end position, over a chunk's real
tokens or over its whole padded row.

* `real_tokens`: padded positions are left out of the softmax, so a chunk's loss, and its gradient, are the
  same however it is batched (and however a batch is split into passes).
* `padded`: Hugging Face's QA loss, which takes every position of the padded row into the softmax: the pad
  positions (whose hidden states attend to the chunk's tokens) act as extra negatives, and a chunk's loss
  depends on how wide its pass was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spanflow.config import TRAIN_LOSSES


def span_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
    over: str = "real_tokens",
) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2, mean over the batch, in fp32; the softmax runs `over` the chunk's real tokens
    or its whole padded row (`TRAIN_LOSSES`)."""
    if over not in TRAIN_LOSSES:
        raise ValueError(f"loss over {over!r}: expected one of {', '.join(TRAIN_LOSSES)}")
    start, end = start_logits.float(), end_logits.float()
    if over == "real_tokens":
        pad = attention_mask == 0
        start, end = start.masked_fill(pad, float("-inf")), end.masked_fill(pad, float("-inf"))
    return (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
