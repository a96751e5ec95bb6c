"""Houlsby bottleneck adapters (Houlsby et al. 2019), in-house: PEFT has none, and AdapterHub's `adapters`
package pins transformers 4.

Each transformer layer gets two: one on the attention's output projection and one on the FFN's output projection,
before their residual + LayerNorm. An adapter maps the projection's output y to y + up(gelu(down(y))), `down`
to `size` features and back; `up` starts at zero, so a new adapter is the identity. Adapters cannot be merged
into the weights: a saved model records them in its config (`spanflow_adapter`) and `load_trained` puts them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

CONFIG_KEY = "spanflow_adapter"
# per model_type: the Linears of a transformer layer (relative names) whose output goes into residual + LayerNorm
TARGETS = {
    "bert": ("attention.output.dense", "output.dense"),
    "roberta": ("attention.output.dense", "output.dense"),
    "electra": ("attention.output.dense", "output.dense"),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
}


class Bottleneck(nn.Module):
    def __init__(self, features: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(features, size)
        self.up = nn.Linear(size, features)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the identity at the start
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(F.gelu(self.down(y)))


class AdapterLinear(nn.Linear):
    """A Linear followed by its adapter; the Linear's own weights keep their names (`<name>.weight`)."""

    def __init__(self, base: nn.Linear, size: int) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.adapter = Bottleneck(base.out_features, size).to(device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))


def adapter_places(model_type: str) -> tuple[str, ...]:
    """The Linears of a `model_type` layer that get an adapter; a clear error for an architecture without a map."""
    if model_type not in TARGETS:
        known = ", ".join(TARGETS)
        raise ValueError(f"method adapter: no adapter places known for model type {model_type!r} ({known})")
    return TARGETS[model_type]


def add_adapters(model: nn.Module, size: int, layers: nn.ModuleList) -> list[str]:
    """Wrap the target Linears of every layer of `layers` (a module of `model`) with an adapter of `size`, record
    it in `model.config`, and return the wrapped modules' names."""
    model_type = model.config.model_type
    targets = adapter_places(model_type)
    if size < 1:
        raise ValueError(f"method.adapter.size: {size} must be >= 1")
    wrapped = []
    for layer in layers:
        for relative in targets:
            parent_name, _, attr = relative.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            base = getattr(parent, attr)
            if not isinstance(base, nn.Linear) or isinstance(base, AdapterLinear):
                raise ValueError(f"method adapter: {relative} of a {model_type} layer is not a plain Linear")
            setattr(parent, attr, AdapterLinear(base, size))
            wrapped.append(relative)
    setattr(model.config, CONFIG_KEY, {"size": size})
    return wrapped


def restore_adapters(model: nn.Module, model_dir: Path, layers: nn.ModuleList) -> None:
    """Put back the adapters a saved model was trained with and load their weights from `model_dir`."""
    from safetensors.torch import load_file

    spec = getattr(model.config, CONFIG_KEY)
    add_adapters(model, int(spec["size"]), layers)
    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{model_dir}: a model with adapters is read from one model.safetensors file")
    state = {k: v for k, v in load_file(str(weights)).items() if ".adapter." in k}
    expected = {k for k in model.state_dict() if ".adapter." in k}
    if set(state) != expected:
        raise ValueError(f"{weights}: adapter weights {sorted(expected ^ set(state))[:3]} missing or unexpected")
    model.load_state_dict(state, strict=False)
