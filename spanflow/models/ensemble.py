"""Several trained QA models answering as one (BERTVision's ensembling): per chunk, the element-wise maximum
(or the mean) of the members' start and end probabilities.

The ensemble is a torch module whose output looks like one QA model's, with the log of the combined probabilities
as its logits, so chunked inference, span decoding and serving take it unchanged. Its members must share one
tokenizer: the chunks are made once, for all of them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from spanflow.models.modeling import takes_token_type_ids

ENSEMBLE_RULES = ("max", "mean")


class EnsembleQAModel(torch.nn.Module):
    def __init__(self, members: list[torch.nn.Module], rule: str = "max") -> None:
        super().__init__()
        if rule not in ENSEMBLE_RULES:
            raise ValueError(f"ensemble rule {rule!r}: use one of {', '.join(ENSEMBLE_RULES)}")
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(members)
        self.rule = rule
        self._token_types = [takes_token_type_ids(m) for m in members]  # a decoder member has none
        prompts = {int(getattr(m, "virtual_tokens", 0)) for m in members}
        if len(prompts) > 1:
            raise ValueError(f"ensemble: the members put different numbers of virtual tokens before a chunk {prompts}")
        self._virtual_tokens = prompts.pop()

    def _combine(self, logits: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """log of the max / mean over members of softmax over the chunk's real tokens."""
        log_probs = torch.stack(
            [torch.log_softmax(x.float().masked_fill(~mask, -1e4), dim=-1) for x in logits]
        )  # members x batch x tokens
        if self.rule == "max":
            return log_probs.max(dim=0).values
        return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))

    @property
    def virtual_tokens(self) -> int:
        """The positions a soft prompt takes before each chunk: the members' (refused unless all agree)."""
        return self._virtual_tokens

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ):
        outs = []
        for member, types in zip(self.members, self._token_types, strict=True):
            extra = {"token_type_ids": token_type_ids} if types and token_type_ids is not None else {}
            outs.append(member(input_ids=input_ids, attention_mask=attention_mask, **extra))
        mask = attention_mask.bool()
        return QuestionAnsweringModelOutput(
            start_logits=self._combine([o.start_logits for o in outs], mask),
            end_logits=self._combine([o.end_logits for o in outs], mask),
        )


def check_shared_tokenizer(model_dirs: list[Path]) -> None:
    """Refuse members whose tokenizers differ: one set of chunks must mean the same tokens to each."""
    first = AutoTokenizer.from_pretrained(model_dirs[0])
    for other in model_dirs[1:]:
        tok = AutoTokenizer.from_pretrained(other)
        if tok.get_vocab() != first.get_vocab() or type(tok) is not type(first):
            raise ValueError(f"ensemble: {other} has another tokenizer than {model_dirs[0]}; members must share one")
