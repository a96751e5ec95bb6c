"""A fused path for PEFT's LoRA Linear layers: y = x·Wᵀ + b + (x·Aᵀ)·(s·B)ᵀ as one autograd node.

PEFT's forward runs the frozen base layer, casts the activation to the adapter's fp32 dtype, then applies A,
B, the scaling and the sum as separate ops, each one more pass over a batch × tokens × features tensor; under
autocast it also re-casts the frozen fp32 weight on every call, and autograd saves that copy. Here the frozen
weight is cast once per dtype and kept, the scaling folds into B, the adapter's product is added inside the
base matmul (addmm), and the backward computes only the input gradient and the two small adapter gradients.
Layers that read the same input (query, key and value) share one cast of it, which autograd saves once. A layer
whose input comes straight out of a GELU (BERT's FFN output) keeps the GELU's input, which the GELU node keeps
anyway, and recomputes its output in backward: one intermediate-sized tensor less per layer, the same bits.
Same function, same parameters and state dict: checkpoints, `merge_and_unload` and export are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from spanflow.training.last_tensor import LastDerived


class _LoraLinearFn(torch.autograd.Function):
    """x (N, in) in the compute dtype; weight (out, in) already in it; lora_a (r, in), lora_b (out, r) fp32.
    `gelu_input`, when given, is a tensor with x = gelu(gelu_input, approximate) (up to a reshape and the cast to
    x's dtype): it is saved instead of x, and x is recomputed from it in backward."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, lora_a, lora_b, scaling: float, gelu_input=None, approximate="none"):  # noqa: ANN001, ANN205
        a = lora_a.to(x.dtype)
        b = (lora_b * scaling).to(x.dtype)
        h = x @ a.t()
        y = x @ weight.t() if bias is None else torch.addmm(bias.to(x.dtype), x, weight.t())
        y.addmm_(h, b.t())
        ctx.save_for_backward(x if gelu_input is None else gelu_input, weight, a, b, h)
        ctx.scaling, ctx.recompute = scaling, gelu_input is not None
        ctx.approximate, ctx.x_shape, ctx.x_dtype = approximate, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx: Any, gy):  # noqa: ANN001, ANN205
        x, weight, a, b, h = ctx.saved_tensors
        gy = gy.to(ctx.x_dtype)
        gh = gy @ b  # gradient at h = x·Aᵀ (b already holds the scaling)
        gx = (gy @ weight).addmm_(gh, a) if ctx.needs_input_grad[0] else None
        ga = None
        if ctx.needs_input_grad[3]:  # the only use of x
            if ctx.recompute:  # the GELU's own kernel on its own input: bit for bit the forward's x
                x = torch.nn.functional.gelu(x, approximate=ctx.approximate).to(ctx.x_dtype).reshape(ctx.x_shape)
            ga = (gh.t() @ x).float()
        gb = (gy.t() @ h).float().mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        return gx, None, None, ga, gb, None, None, None


def _gelu_input(x: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(input, approximate) of the GELU that produced x, when autograd holds that input anyway; else (None, "")."""
    node = x.grad_fn
    if node is None or type(node).__name__ != "GeluBackward0":
        return None, ""
    return node._saved_self, node._saved_approximate


def _cast_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(dtype)


# query, key and value get the same hidden states: one shared cast (saved once for backward) replaces three
_shared_cast = LastDerived(_cast_2d)


def _input_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a 2-d tensor in `dtype`: a view when it is in `dtype` already, else the cast shared with the other layers
    that read the same x."""
    return x.reshape(-1, x.shape[-1]) if x.dtype == dtype else _shared_cast(x, dtype)


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear with the fused forward where it applies (one plain adapter, no dropout, frozen base,
    unmerged); anything else goes through PEFT's own forward."""

    def _fusable(self) -> bool:
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return False
        name = self.active_adapters[0]
        base = self.get_base_layer()
        return (
            name in self.lora_A
            and name not in self.lora_variant
            and isinstance(self.lora_dropout[name], torch.nn.Identity)
            and type(base) is torch.nn.Linear
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
        )

    def _weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen base weight in `dtype`, cast once and kept while the weight is unchanged."""
        weight = self.get_base_layer().weight
        if weight.dtype == dtype:
            return weight
        key = (dtype, weight.data_ptr(), weight._version)
        cached = getattr(self, "_spanflow_cast", None)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: autograd may save it
                cached = (key, weight.detach().to(dtype))
            self._spanflow_cast = cached
        return cached[1]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not self._fusable():
            return super().forward(x, *args, **kwargs)
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        name = self.active_adapters[0]
        base = self.get_base_layer()
        x2 = _input_cast(x, dtype)
        gelu_input, approximate = _gelu_input(x)
        with torch.autocast(device, enabled=False):  # dtypes are set here; autocast must not re-cast
            y = _LoraLinearFn.apply(
                x2,
                self._weight_in(dtype),
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                float(self.scaling[name]),
                gelu_input,
                approximate,
            )
        return y.reshape(*x.shape[:-1], y.shape[-1])


def fuse_lora(model: torch.nn.Module) -> int:
    """Switch every PEFT LoRA Linear of `model` to the fused path; returns how many were switched."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count


def release_fp32_bases(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen base weight of every fused LoRA Linear to the compute `dtype` now (the copy the forward uses,
    the same bits), and hand the fp32 original's pages back to the kernel (`spanflow.training.paging`): training
    never reads it again, so the frozen base is resident once, in the compute dtype, as when a LoRA base is loaded
    in bf16. The fp32 weights stay the weights: merging, exporting or an fp32 forward read them again (from the
    checkpoint file, which Hugging Face maps). Returns the bytes handed back."""
    from spanflow.training.paging import page_out

    released = 0
    for module in model.modules():
        if isinstance(module, FusedLoraLinear) and module._fusable():
            weight = module.get_base_layer().weight
            if weight.dtype != dtype:
                module._weight_in(dtype)
                released += page_out(weight)
    return released
