"""Learned layer pooling (BERTVision; ELMo's scalar mix): the QA head reads a learned mix of every layer's hidden
states instead of the last layer's alone.

mix = gamma * sum_i softmax(s)_i * h_i over the backbone's hidden states as Hugging Face's `output_hidden_states`
gives them (L + 1 for L layers, the embeddings' output first), or over the L layers' alone
(`method.layer_mix.embeddings: false`). The scalars s start at zero (every state alike) and gamma at one.

Two hooks on the model's base model (`model.bert` for BERT) put the mix in place, so that to the rest of spanflow
(the training loop, LoRA, `run_model`, the ONNX export) the model stays an ordinary Hugging Face QA model: one asks
the base model for its hidden states (collected as it runs: no second forward), the other hands their mix on as its
`last_hidden_state`, which the model's own `qa_outputs` reads. The mix cannot be merged into the weights: a saved
model records it in its config (`spanflow_layer_mix`), its weights (`layer_mix.scalars`, `layer_mix.gamma`) sit in
model.safetensors, and `load_trained` puts it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_KEY = "spanflow_layer_mix"
MODULE_NAME = "layer_mix"  # the mix's attribute on the QA model, so its weights are layer_mix.scalars, .gamma


class ScalarMix(nn.Module):
    """gamma * sum_i softmax(scalars)_i * states_i over the hidden states of a base model's forward."""

    def __init__(self, num_layers: int, embeddings: bool) -> None:
        super().__init__()
        self.first = 0 if embeddings else 1  # the index of the first mixed state: 0 is the embeddings' output
        self.indices = list(range(self.first, num_layers + 1))
        self.scalars = nn.Parameter(torch.zeros(len(self.indices)))
        self.gamma = nn.Parameter(torch.ones(1))

    def weights(self) -> torch.Tensor:
        """The softmax weights of the mixed states, in fp32 (they sum to 1)."""
        return torch.softmax(self.scalars.float(), dim=0)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        states = hidden_states[self.first :]
        if len(states) != len(self.indices):
            raise ValueError(
                f"layer mix: {len(hidden_states)} hidden states, expected {self.indices[-1] + 1} "
                f"(the embeddings' output and one per layer)"
            )
        weights = self.weights() * self.gamma.float()
        mixed = states[0] * weights[0].to(states[0].dtype)
        for w, h in zip(weights[1:], states[1:], strict=True):  # a running sum: no stacked copy of the states
            mixed = mixed + h * w.to(h.dtype)
        return mixed

    def replace_last_hidden_state(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook on the base model: its `last_hidden_state`, which the QA head reads, becomes the mix."""
        hidden_states = getattr(output, "hidden_states", None)
        if hidden_states is None:
            raise ValueError(f"layer mix: {type(module).__name__} returned no hidden_states to mix")
        output["last_hidden_state"] = self(hidden_states)  # a ModelOutput: item and attribute alike
        return output


def _ask_for_hidden_states(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the base model: collect every layer's hidden states as it runs."""
    return args, {**kwargs, "output_hidden_states": True}


def state_name(index: int) -> str:
    return "embeddings" if index == 0 else f"layer {index}"


def add_layer_mix(model: nn.Module, embeddings: bool) -> ScalarMix:
    """Give the Hugging Face QA model `model` a layer mix (as `model.layer_mix`) that its QA head reads, record it in
    `model.config`, and return it."""
    base = getattr(model, "base_model", model)
    if base is model or not isinstance(base, nn.Module):
        raise ValueError(f"method layer_mix: {type(model).__name__} has no base model whose hidden states to mix")
    if hasattr(model, MODULE_NAME):
        raise ValueError(f"method layer_mix: {type(model).__name__} has a {MODULE_NAME} already")
    param = next(model.parameters())
    mix = ScalarMix(model.config.num_hidden_layers, embeddings).to(device=param.device)
    setattr(model, MODULE_NAME, mix)
    base.register_forward_pre_hook(_ask_for_hidden_states, with_kwargs=True)
    base.register_forward_hook(mix.replace_last_hidden_state)
    setattr(model.config, CONFIG_KEY, {"embeddings": embeddings})
    return mix


def find_layer_mix(model: nn.Module) -> ScalarMix | None:
    """The layer mix of `model` (also inside a PEFT wrapper), or None."""
    return next((m for m in model.modules() if isinstance(m, ScalarMix)), None)


def restore_layer_mix(model: nn.Module, model_dir: Path) -> ScalarMix:
    """Put back the layer mix a saved model was trained with and load its weights from `model_dir`."""
    from safetensors.torch import load_file

    spec = getattr(model.config, CONFIG_KEY)
    mix = add_layer_mix(model, bool(spec["embeddings"]))
    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{model_dir}: a model with a layer mix is read from one model.safetensors file")
    prefix = f"{MODULE_NAME}."
    state = {k.removeprefix(prefix): v for k, v in load_file(str(weights)).items() if k.startswith(prefix)}
    expected = set(mix.state_dict())
    if set(state) != expected:
        raise ValueError(f"{weights}: layer mix weights {sorted(expected ^ set(state))} missing or unexpected")
    mix.load_state_dict(state)
    return mix


def layer_weights_report(model: nn.Module, method: str) -> dict:
    """How much each hidden state weighs in what the QA head reads: the learned softmax weights and gamma of a
    layer mix, or, for a model without one, the last layer's output alone (a fixed weight of 1)."""
    mix = find_layer_mix(model)
    if mix is None:
        layers = model.config.num_hidden_layers
        indices, weights, gamma = list(range(layers + 1)), [0.0] * layers + [1.0], None
    else:
        indices, weights, gamma = mix.indices, mix.weights().tolist(), float(mix.gamma.detach().float()[0])
    return {
        "method": method,
        "learned": mix is not None,
        "index": indices,  # hidden-state index: 0 is the embeddings' output, i the output of layer i
        "state": [state_name(i) for i in indices],
        "weight": [float(w) for w in weights],
        "gamma": gamma,
    }
