"""Softmax attention for narrow CPU training passes: PyTorch's math attention, keeping less for backward.

On the CPU the flash kernel's backward took a third of a training step at width 128; PyTorch's math kernel was
faster up to width ~160, this one up to 256 (`spanflow/training/passes.py`). Under bf16 autocast the math kernel
computes in fp32 and autograd keeps its fp32 copies of query, key and value and the fp32 probabilities: 21 MiB per
layer for 16 chunks of 128 tokens, 3.5x what the flash kernel keeps. This one computes the same fp32 forward,
keeps query, key and value as they came (bf16) and the probabilities in the compute dtype (fp32 training keeps
fp32): 10.5 MiB per layer. A boolean mask is added as a 0 / -inf bias, the same scores as `masked_fill`'s at a
sixth of its time. Under bf16 the backward's four matmuls and the softmax's gradient run in bf16 from the kept
tensors, as autocast runs every Linear's backward: no fp32 copies of query, key, value and the probabilities,
half the backward's time (benchmarks/README.md, tenth round); fp32 and fp16 take it in fp32. The softmax's
gradient is one pass (`torch._softmax_backward_data`, PyTorch's own kernel) and the scale goes onto the small
query and key gradients instead of the tokens x tokens matrix (seventh round).

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

from spanflow.training.last_tensor import LastDerived


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 and contiguous, in one copy (query, key and value arrive as strided head views)."""
    return x.to(torch.float32, memory_format=torch.contiguous_format)


def _bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as an fp32 0 / -inf bias."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -math.inf)


_mask_bias = LastDerived(_bias)  # every layer of a pass gets the same mask: its bias is made once


class _SoftmaxAttentionFn(torch.autograd.Function):
    """softmax(q·kᵀ·scale + mask)·v in fp32; q, k, v (batch, heads, tokens, head dim) in any float dtype."""

    @staticmethod
    def forward(ctx: Any, q, k, v, mask, scale: float):  # noqa: ANN001, ANN205
        with torch.autocast(q.device.type, enabled=False):  # fp32 here, whatever the caller's autocast
            return _SoftmaxAttentionFn._forward(ctx, q, k, v, mask, scale)

    @staticmethod
    def _forward(ctx: Any, q, k, v, mask, scale: float):  # noqa: ANN001, ANN205
        scores = (_fp32(q) * scale) @ _fp32(k).transpose(-2, -1)
        if mask is not None:  # x + 0 is x and x - inf is -inf: masked_fill's scores, in a faster kernel
            scores.add_(_mask_bias(mask) if mask.dtype == torch.bool else mask)
        probs = torch.softmax(scores, dim=-1)
        out = probs @ _fp32(v)
        ctx.save_for_backward(q, k, v, probs.to(q.dtype))  # in [0, 1]: bf16 or fp16 keep 8 or 11 bits
        ctx.scale = scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out):  # noqa: ANN001, ANN205
        with torch.autocast(grad_out.device.type, enabled=False):
            return _SoftmaxAttentionFn._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out):  # noqa: ANN001, ANN205
        q, k, v, p = ctx.saved_tensors
        dtype = q.dtype
        if dtype == torch.bfloat16:  # the kept tensors as they are: bf16 matmuls, fp32 accumulation
            g = grad_out.to(dtype)
        else:  # fp16 matmuls on the CPU are slow and overflow-prone: fp32 copies
            q, k, v, p, g = _fp32(q), _fp32(k), _fp32(v), p.float(), _fp32(grad_out)
        grad_v = p.transpose(-2, -1) @ g
        grad_p = g @ v.transpose(-2, -1)
        grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype)
        grad_q = (grad_s @ k).mul_(ctx.scale)
        grad_k = (grad_s.transpose(-2, -1) @ q).mul_(ctx.scale)
        return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), None, None


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
