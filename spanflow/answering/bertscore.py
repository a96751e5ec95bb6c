"""BERTScore (Zhang et al., 2020) of predicted answers against the gold ones, offline, with any local encoder.

Each text is embedded token by token by one hidden layer of the encoder (no special tokens); every candidate token
is matched to its most similar reference token by cosine similarity and the reverse: precision and recall are the
mean best similarities, F1 their harmonic mean. A question scores its best F1 over its gold answers, as SQuAD's own
F1 does. No idf weighting and no baseline rescaling (the published baselines are per model and not here). Empty
texts are the no-answer case: "" against "" scores 1, "" against any other text 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModel, AutoTokenizer

from spanflow.data.features import Record
from spanflow.models.modeling import resolve_model_path


class BertScorer:
    """BERTScore F1 with the encoder at `model` ("default" = the packaged all-MiniLM-L6-v2) and its `layer`
    (None: the last; 0 is the embeddings)."""

    def __init__(self, model: str = "default", layer: int | None = None, batch_size: int = 64) -> None:
        path = resolve_model_path(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        layers = self.encoder.config.num_hidden_layers
        if layer is not None and not 0 <= layer <= layers:
            raise ValueError(f"eval.bertscore_layer: {layer} is not in 0..{layers} (the layers of {model})")
        self.layer = layers if layer is None else layer
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """One unit-length vector per token of each text (no special tokens); an empty text has none."""
        out: list[torch.Tensor] = []
        for lo in range(0, len(texts), self.batch_size):
            batch = list(texts[lo : lo + self.batch_size])
            enc = self.tokenizer(
                batch, padding=True, truncation=True, return_tensors="pt", return_special_tokens_mask=True
            )
            special = enc.pop("special_tokens_mask").bool()
            hidden = self.encoder(**enc, output_hidden_states=True).hidden_states[self.layer]
            keep = enc["attention_mask"].bool() & ~special
            out += [torch.nn.functional.normalize(h[k], dim=-1) for h, k in zip(hidden, keep, strict=True)]
        return out

    @staticmethod
    def pair_f1(cand: torch.Tensor, ref: torch.Tensor) -> float:
        if len(cand) == 0 or len(ref) == 0:
            return float(len(cand) == len(ref))
        sim = cand @ ref.T
        precision, recall = sim.max(dim=1).values.mean(), sim.max(dim=0).values.mean()
        return float(2 * precision * recall / (precision + recall))

    def score(self, records: Sequence[Record], predictions: dict[str, str]) -> dict[str, float]:
        """id -> BERTScore F1 (at most 1) of the prediction against its best gold answer."""
        golds = [r["answers"]["text"] or [""] for r in records]  # unanswerable: the gold answer is ""
        texts = {predictions.get(r["id"], "") for r in records} | {g for gs in golds for g in gs}
        nonempty = sorted(t for t in texts if t)
        vec = dict(zip(nonempty, self.embed(nonempty), strict=True)) | {"": torch.empty(0, 1)}
        return {
            r["id"]: max(self.pair_f1(vec[predictions.get(r["id"], "")], vec[g]) for g in gs)
            for r, gs in zip(records, golds, strict=True)
        }
