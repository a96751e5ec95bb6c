"""BERTScore of answers: the packaged encoder or a local one, empty answers as SQuAD 2.0 needs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from spanflow.answering.bertscore import BertScorer
from tests.helpers import make_tiny_model_dir


def _record(qid: str, *golds: str) -> dict:
    return {"id": qid, "answers": {"text": list(golds), "answer_start": [0] * len(golds)}}


@pytest.fixture(scope="module")
def scorer() -> BertScorer:
    return BertScorer()  # the packaged all-MiniLM-L6-v2, offline


def test_identical_empty_and_missing_answers(scorer: BertScorer):
    records = [
        _record("same", "the Denver Broncos"),
        _record("none"),
        _record("abstained", "1911"),
        _record("miss", "x"),
    ]
    got = scorer.score(records, {"same": "the Denver Broncos", "none": "", "abstained": ""})
    assert got["same"] == pytest.approx(1.0, abs=1e-5)
    assert got["none"] == 1.0  # "" for an unanswerable question is right
    assert got["abstained"] == 0.0 and got["miss"] == 0.0  # "" (or no prediction) for an answerable one is wrong


def test_the_best_gold_answer_counts_and_meaning_beats_letters(scorer: BertScorer):
    records = [_record("q", "in the north of France", "Normandy")]
    got = scorer.score(records, {"q": "Normandy"})["q"]
    assert got == pytest.approx(1.0, abs=1e-5)
    near = scorer.score([_record("q", "a large dog")], {"q": "a big dog"})["q"]
    far = scorer.score([_record("q", "a large dog")], {"q": "tax revenue of 1911"})["q"]
    assert near > far + 0.2


def test_any_local_encoder_and_a_layer_it_lacks(tmp_path: Path):
    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    scorer = BertScorer(str(model_dir), layer=1)
    assert scorer.score([_record("q", "Paris")], {"q": "Paris"})["q"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"eval.bertscore_layer: 7 is not in 0..2"):
        BertScorer(str(model_dir), layer=7)
