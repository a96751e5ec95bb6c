"""The extractive-QA training loss over a chunk's real tokens.

Hugging Face's QA heads average the cross-entropy of the start and of the end position over the whole padded
row, so every pad token takes part in the softmax and the loss of a chunk depends on how wide its batch was.
Here padded positions are left out: a chunk's loss, and its gradient, are the same however it is batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def span_loss(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    start_positions: torch.Tensor,
    end_positions: torch.Tensor,
) -> torch.Tensor:
    """(CE(start) + CE(end)) / 2, mean over the batch, softmax over each chunk's real tokens only (in fp32)."""
    pad = attention_mask == 0
    start = start_logits.float().masked_fill(pad, float("-inf"))
    end = end_logits.float().masked_fill(pad, float("-inf"))
    return (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
