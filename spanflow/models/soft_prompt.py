"""Soft prompt tuning (Lester et al. 2021), in-house: N learned virtual-token embeddings before each chunk, the
backbone frozen, the prompt and the QA head trained.

Not PEFT's: its question-answering model never passes `token_type_ids` or `position_ids` to BERT, and its prompt
path leaves the virtual positions in the start/end logits with the labels unshifted. Here `SoftPromptQA` takes the
batch every method takes (input_ids, attention_mask, token_type_ids) and returns start/end logits of the real
positions only, [batch, seq] as for the other methods: features, labels, span decoding and character offsets stay
as they are. The virtual tokens go before [CLS] (for a decoder backbone, before everything the causal mask lets
see them); every real token keeps the position id it has without the prompt (0, 1, ...), as in pre-training, and
the virtual ones take position 0 and segment 0 (a learned vector absorbs any fixed offset). The N positions still
count against `features.chunk_length` (featurize gives the tokenizer chunk_length - N): the encoder's width, hence
its cost, stays what the chunk length says.

The prompt cannot be merged into the weights: it is a module of the Hugging Face model (`spanflow_prompt.weight`,
saved in model.safetensors with the rest), its config records it (`spanflow_prompt`), and `load_trained` wraps
the loaded model again.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from spanflow.config import PROMPT_INITS
from spanflow.models.qa_loss import span_loss

CONFIG_KEY = "spanflow_prompt"
MODULE_NAME = "spanflow_prompt"  # the prompt's attribute on the Hugging Face model: its weights' name prefix


def prompt_embeddings(model: nn.Module, tokens: int, init: str) -> nn.Embedding:
    """`tokens` prompt vectors in the word embeddings' space: `vocab` copies randomly drawn rows of the word
    embeddings (Lester et al.'s best start after class labels), `random` draws from a normal at their spread."""
    if tokens < 1:
        raise ValueError(f"method.prompt.tokens: {tokens} must be >= 1")
    if init not in PROMPT_INITS:
        raise ValueError(f"method.prompt.init: {init!r} is not {'|'.join(PROMPT_INITS)}")
    words = model.get_input_embeddings().weight
    prompt = nn.Embedding(tokens, words.shape[1], device=words.device, dtype=words.dtype)
    with torch.no_grad():
        if init == "vocab":
            prompt.weight.copy_(words[torch.randint(0, words.shape[0], (tokens,), device=words.device)])
        else:
            prompt.weight.normal_(0.0, float(words.std()))
    return prompt


class SoftPromptQA(nn.Module):
    """A Hugging Face QA model behind N learned virtual tokens; answers on the real positions only."""

    def __init__(self, model: nn.Module, prompt: nn.Embedding) -> None:
        super().__init__()
        self.model = model
        setattr(model, MODULE_NAME, prompt)  # saved and loaded with the model's own weights
        setattr(model.config, CONFIG_KEY, {"tokens": prompt.num_embeddings})
        accepted = inspect.signature(model.forward).parameters
        self._types = "token_type_ids" in accepted
        self._positions = "position_ids" in accepted

    @property
    def prompt(self) -> nn.Embedding:
        return getattr(self.model, MODULE_NAME)

    @property
    def virtual_tokens(self) -> int:
        return self.prompt.num_embeddings

    @property
    def config(self):  # noqa: ANN201 - the Hugging Face model's config
        return self.model.config

    def save_pretrained(self, out_dir: str | Path, **kwargs) -> None:  # noqa: ANN003
        self.model.save_pretrained(out_dir, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
    ) -> QuestionAnsweringModelOutput:
        """Start/end logits [batch, seq] of the real tokens; with labels (positions among the real tokens), the
        Hugging Face QA loss over them."""
        batch, seq = input_ids.shape
        n = self.virtual_tokens
        words = self.model.get_input_embeddings()(input_ids)
        prompt = self.prompt.weight.to(words.dtype).unsqueeze(0).expand(batch, -1, -1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {
            "inputs_embeds": torch.cat([prompt, words], dim=1),
            "attention_mask": torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1),
        }
        if self._types:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            inputs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        if self._positions:  # the real tokens where pre-training had them; the virtual ones at 0
            real = torch.arange(seq, device=input_ids.device)
            inputs["position_ids"] = torch.cat([real.new_zeros(n), real]).unsqueeze(0).expand(batch, -1)
        out = self.model(**inputs)
        start, end = out.start_logits[:, n:], out.end_logits[:, n:]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start, end, attention_mask, start_positions, end_positions, over="padded")
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end)


def add_soft_prompt(model: nn.Module, tokens: int, init: str = "vocab") -> SoftPromptQA:
    """`model` behind `tokens` new virtual tokens (drawn by torch's generator: seed it first)."""
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and tokens >= max_positions:
        raise ValueError(f"method.prompt.tokens: {tokens} is not below the backbone's {max_positions} positions")
    return SoftPromptQA(model, prompt_embeddings(model, tokens, init))


def restore_soft_prompt(model: nn.Module, model_dir: Path) -> SoftPromptQA:
    """The saved model in `model_dir` behind the prompt it was trained with, its weights from model.safetensors."""
    from safetensors.torch import load_file

    tokens = int(getattr(model.config, CONFIG_KEY)["tokens"])
    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{model_dir}: a model with a soft prompt is read from one model.safetensors file")
    key = f"{MODULE_NAME}.weight"
    state = load_file(str(weights))
    if key not in state or tuple(state[key].shape) != (tokens, model.get_input_embeddings().weight.shape[1]):
        raise ValueError(f"{weights}: no {key} of {tokens} virtual tokens, as its config.json says")
    prompt = nn.Embedding(tokens, state[key].shape[1], dtype=model.get_input_embeddings().weight.dtype)
    with torch.no_grad():
        prompt.weight.copy_(state[key])
    return SoftPromptQA(model, prompt)


def virtual_tokens(model: object) -> int:
    """How many virtual tokens `model` (a torch model or an ONNX Runtime one) puts before each chunk."""
    return int(getattr(model, "virtual_tokens", 0))
