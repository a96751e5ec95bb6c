"""The math attention of narrow CPU training passes (spanflow/training/attention.py): PyTorch's math kernel's output and
gradients, less kept for backward under bf16, and PyTorch's own kernel for the calls it does not cover."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from spanflow.training.attention import MathAttention, _mask_bias

B, H, L, D = 2, 3, 12, 8


def _inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, L, D, generator=gen).to(dtype).requires_grad_() for _ in range(3))


def _masks() -> list[torch.Tensor | None]:
    keep = torch.ones(B, 1, L, L, dtype=torch.bool)
    keep[0, ..., 9:] = False  # the first row's last 3 keys are padding
    return [None, keep, torch.where(keep, 0.0, torch.finfo(torch.float32).min)]


def _run(ctx, q, k, v, mask, grad_out, **kwargs):  # noqa: ANN001, ANN202
    with ctx:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
    return out, torch.autograd.grad(out, (q, k, v), grad_out)


@pytest.mark.parametrize("mask", _masks(), ids=["none", "bool", "additive"])
def test_fp32_output_and_gradients_are_the_math_kernels(mask: torch.Tensor | None) -> None:
    q, k, v = _inputs(torch.float32)
    grad_out = torch.randn(B, H, L, D)
    ref, ref_grads = _run(sdpa_kernel([SDPBackend.MATH]), q, k, v, mask, grad_out)
    out, grads = _run(MathAttention(), q, k, v, mask, grad_out)
    assert out.grad_fn is not None and "SoftmaxAttention" in type(out.grad_fn).__name__  # ours ran
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_matches_the_math_kernel_to_a_bf16_step_and_keeps_less() -> None:
    q, k, v = _inputs(torch.bfloat16)
    grad_out = torch.randn(B, H, L, D).to(torch.bfloat16)
    mask = _masks()[1]
    kept = {}
    results = {}
    for name, ctx in {"pytorch": sdpa_kernel([SDPBackend.MATH]), "ours": MathAttention()}.items():
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            results[name] = _run(ctx, q, k, v, mask, grad_out)
        kept[name] = sum(sizes)
    (ref, ref_grads), (out, grads) = results["pytorch"], results["ours"]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=4 * 2**-8)
    # PyTorch's kernel keeps fp32 copies of q, k, v and fp32 probabilities; ours bf16 q, k, v and probabilities
    assert kept["ours"] == 3 * B * H * L * D * 2 + B * H * L * L * 2
    assert kept["ours"] < kept["pytorch"] / 1.8


def test_bf16_backward_is_within_a_bf16_rounding_of_exact_gradients() -> None:
    """Under bf16 the backward runs its matmuls in bf16 from the kept tensors; its gradients stay about as close to
    fp64 ones as those of PyTorch's math kernel, which computes in fp32 and rounds the result to bf16."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in _inputs(torch.float32))
    grad_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(1))
    mask = _masks()[1]
    _, exact = _run(sdpa_kernel([SDPBackend.MATH]), q64, k64, v64, mask, grad_out.double())
    q, k, v = _inputs(torch.bfloat16)
    _, pytorch = _run(sdpa_kernel([SDPBackend.MATH]), q, k, v, mask, grad_out.to(torch.bfloat16))
    _, ours = _run(MathAttention(), q, k, v, mask, grad_out.to(torch.bfloat16))

    def error(grads: tuple[torch.Tensor, ...]) -> float:
        return max(float((g.double() - e).norm() / e.norm()) for g, e in zip(grads, exact, strict=True))

    assert all(g.dtype == torch.bfloat16 for g in ours)
    assert error(ours) < 2**-7  # a bf16 rounding is 2**-9 per element
    assert error(ours) < 2 * error(pytorch)


def test_a_boolean_mask_is_made_once_per_mask_and_remade_when_it_changes() -> None:
    q, k, v = (t.detach() for t in _inputs(torch.float32))
    keep = _masks()[1]

    def attend(mask: torch.Tensor) -> torch.Tensor:
        with MathAttention():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def reference(mask: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.testing.assert_close(attend(keep), reference(keep))
    bias = _mask_bias(keep)
    assert _mask_bias(keep) is bias  # the next layer of the pass reuses it
    keep[1, ..., :4] = False  # the same tensor changed in place: its bias must follow
    assert _mask_bias(keep) is not bias
    torch.testing.assert_close(attend(keep), reference(keep))
    with torch.inference_mode():  # a mask made there has no version counter
        fresh = _masks()[1]
        torch.testing.assert_close(attend(fresh), reference(fresh))


def test_calls_it_does_not_cover_go_to_pytorchs_kernel() -> None:
    q, k, v = _inputs(torch.float32)
    with MathAttention():
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        no_key = torch.zeros(B, 1, L, L, dtype=torch.bool)  # rows with nothing to attend to
        empty = F.scaled_dot_product_attention(q, k, v, attn_mask=no_key)
        dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        bias = torch.zeros(B, 1, L, L, requires_grad=True)  # a learned bias needs its gradient
        learned = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        minus_inf = torch.zeros(B, 1, L, L)
        minus_inf[1, 0, 3] = float("-inf")  # one query with every key masked
        inf_row = F.scaled_dot_product_attention(q, k, v, attn_mask=minus_inf)
    for out in (causal, empty, dropped, learned, inf_row):
        assert "SoftmaxAttention" not in type(out.grad_fn).__name__
    with sdpa_kernel([SDPBackend.MATH]):
        torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True))
