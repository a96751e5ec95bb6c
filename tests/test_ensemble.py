"""Ensembling: the element-wise max (or mean) of the members' start/end probabilities, per chunk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertConfig, BertForQuestionAnswering

from spanflow.answering.inference import answer_questions, load_ensemble_model
from spanflow.models.ensemble import EnsembleQAModel
from tests.helpers import make_tiny_model_dir, tiny_records


def _second_model(first: Path, out: Path, seed: int = 1) -> Path:
    """A model like `first` with other random weights."""
    torch.manual_seed(seed)
    model = BertForQuestionAnswering(BertConfig.from_pretrained(first))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(first).save_pretrained(out)
    return out


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    return dict(
        tokenizer(
            ["Who?", "When was it built?"], ["Ada built it.", "In 1911, long ago."], padding=True, return_tensors="pt"
        )
    )


def test_max_and_mean_combine_the_members_probabilities(tmp_path: Path):
    a_dir = make_tiny_model_dir(tmp_path / "a")
    b_dir = _second_model(a_dir, tmp_path / "b")
    a, b = (AutoModelForQuestionAnswering.from_pretrained(d).eval() for d in (a_dir, b_dir))
    batch = _batch(AutoTokenizer.from_pretrained(a_dir))
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        pa, pb = (torch.softmax(m(**batch).start_logits.masked_fill(~mask, -1e4), -1) for m in (a, b))
        top = EnsembleQAModel([a, b], "max")(**batch).start_logits.exp()
        mean = EnsembleQAModel([a, b], "mean")(**batch).start_logits.exp()
    assert torch.allclose(top[mask], torch.maximum(pa, pb)[mask], atol=1e-6)
    assert torch.allclose(mean[mask], ((pa + pb) / 2)[mask], atol=1e-6)
    assert not torch.allclose(pa, pb)  # two different members, or the check proves nothing


def test_an_ensemble_of_one_model_twice_answers_as_that_model(tmp_path: Path):
    model_dir = make_tiny_model_dir(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = tiny_records(12)
    single = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    twice = load_ensemble_model([model_dir, model_dir], "max", "fp32", torch.device("cpu"))

    def texts(model):
        return [a.text for a in answer_questions(model, tokenizer, records, 48, 16, 16, 30, 20, 4, "fp32")]

    assert texts(twice) == texts(single)


def test_members_with_other_tokenizers_and_unknown_rules_are_refused(tmp_path: Path):
    a_dir = make_tiny_model_dir(tmp_path / "a")
    other = _second_model(a_dir, tmp_path / "b")
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zzyzx"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_ensemble_model([a_dir, other], "max", "fp32", torch.device("cpu"))
    with pytest.raises(ValueError, match="rule 'vote'"):
        EnsembleQAModel([torch.nn.Linear(1, 1)], "vote")
