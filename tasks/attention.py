"""Softmax attention for narrow CPU training passes: PyTorch's math attention, keeping less for backward.

On the CPU the flash kernel's backward took a third of a training step at width 128, and PyTorch's math
kernel was faster up to width ~160 (`tasks/passes.py`). Under bf16 autocast the math kernel computes in fp32
and autograd keeps its fp32 copies of query, key and value and the fp32 probabilities: 21 MiB per layer for
16 chunks of 128 tokens, 3.5x what the flash kernel keeps. This one computes the same fp32 forward and the
same fp32 backward, but keeps query, key and value as they came (bf16) and the probabilities in fp16
(values in [0, 1]: 11 bits of mantissa where bf16 has 8): 10.5 MiB per layer. In fp32 it keeps fp32.
The backward takes the softmax's gradient in one pass (`torch._softmax_backward_data`, PyTorch's own kernel)
instead of four over the tokens x tokens matrix, and scales the small query and key gradients instead of that
matrix: training passes at chunk 128 ran 1.05x faster (benchmarks/README.md, seventh round).

`MathAttention` routes `torch.nn.functional.scaled_dot_product_attention` calls made inside it to this
function (a `TorchFunctionMode`, so any backbone that calls SDPA gets it); calls it does not cover (dropout,
causal, grouped heads, a mask row with no key, a mask that needs a gradient) go to PyTorch's math kernel.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

PROBS_DTYPE = torch.float16


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 and contiguous, in one copy (query, key and value arrive as strided head views)."""
    return x.to(torch.float32, memory_format=torch.contiguous_format)


class _SoftmaxAttentionFn(torch.autograd.Function):
    """softmax(q·kᵀ·scale + mask)·v in fp32; q, k, v (batch, heads, tokens, head dim) in any float dtype."""

    @staticmethod
    def forward(ctx: Any, q, k, v, mask, scale: float):  # noqa: ANN001, ANN205
        with torch.autocast(q.device.type, enabled=False):  # fp32 here, whatever the caller's autocast
            return _SoftmaxAttentionFn._forward(ctx, q, k, v, mask, scale)

    @staticmethod
    def _forward(ctx: Any, q, k, v, mask, scale: float):  # noqa: ANN001, ANN205
        scores = (_fp32(q) * scale) @ _fp32(k).transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill_(~mask, -math.inf) if mask.dtype == torch.bool else scores.add_(mask)
        probs = torch.softmax(scores, dim=-1)
        out = probs @ _fp32(v)
        keep = torch.float32 if q.dtype == torch.float32 else PROBS_DTYPE  # fp32 training keeps fp32 throughout
        ctx.save_for_backward(q, k, v, probs.to(keep))
        ctx.scale = scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out):  # noqa: ANN001, ANN205
        with torch.autocast(grad_out.device.type, enabled=False):
            return _SoftmaxAttentionFn._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out):  # noqa: ANN001, ANN205
        q, k, v, probs = ctx.saved_tensors
        p, g = probs.float(), _fp32(grad_out)
        grad_v = p.transpose(-2, -1) @ g
        grad_p = g @ _fp32(v).transpose(-2, -1)
        grad_s = torch._softmax_backward_data(grad_p, p, -1, torch.float32)
        grad_q = (grad_s @ _fp32(k)).mul_(ctx.scale)
        grad_k = (grad_s.transpose(-2, -1) @ _fp32(q)).mul_(ctx.scale)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None


def _covered(q, k, v, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool) -> bool:  # noqa: ANN001
    if dropout_p or is_causal or enable_gqa or not (q.dim() == k.dim() == v.dim() == 4) or q.shape != k.shape:
        return False
    if attn_mask is None:
        return True
    if attn_mask.requires_grad:  # a learned bias: its gradient is not computed here
        return False
    # a row with no key to attend: leave it to PyTorch's own handling
    if attn_mask.dtype == torch.bool:
        return bool(attn_mask.any(-1).all())
    return attn_mask.is_floating_point() and not bool(torch.isneginf(attn_mask).all(-1).any())


def softmax_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):  # noqa: ANN001, ANN201
    """`scaled_dot_product_attention`'s signature; the math kernel where `_SoftmaxAttentionFn` does not apply."""
    if not _covered(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa):
        with sdpa_kernel([SDPBackend.MATH]):
            args = (q, k, v, attn_mask, dropout_p, is_causal)
            return F.scaled_dot_product_attention(*args, scale=scale, enable_gqa=enable_gqa)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _SoftmaxAttentionFn.apply(q, k, v, attn_mask, scale)


class MathAttention(TorchFunctionMode):
    """Inside it, `F.scaled_dot_product_attention` runs `softmax_attention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:  # the mode is off while this runs: plain torch below
            return softmax_attention(*args, **kwargs)
        return func(*args, **kwargs)
