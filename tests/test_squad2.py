"""SQuAD 2.0 end to end: abstain articles in the prepared splits, the no-answer threshold tuned on validation,
and the v2.0 scores with their answerable / unanswerable parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spanflow.answering.no_answer import score_v2, tune_no_answer_threshold
from spanflow.answering.spans import Answer, answer_texts
from spanflow.answering.squad_metrics import score
from spanflow.config import ConfigError, DataConfig, load_config
from spanflow.data.squad import DataValidationError

REPO = Path(__file__).resolve().parents[1]


def _answers_and_records() -> tuple[list[dict], list[Answer]]:
    """Six questions, q2, q4 and q5 unanswerable; each answer's margin (null - span score) is its index."""
    records, answers = [], []
    for i, (impossible, right) in enumerate(
        [(False, True), (False, True), (True, False), (False, False), (True, False), (True, False)]
    ):
        gold = {"text": [], "answer_start": []} if impossible else {"text": ["Paris"], "answer_start": [0]}
        records.append(
            {
                "id": f"q{i}",
                "title": "t",
                "context": "Paris",
                "question": "?",
                "answers": gold,
                "is_impossible": impossible,
            }
        )
        answers.append(Answer(text="Paris" if right else "Rome", start=0, end=5, score=0.0, null_score=float(i)))
    return records, answers


def _texts(records: list[dict], answers: list[Answer], threshold: float) -> dict[str, str]:
    return {r["id"]: t for r, t in zip(records, answer_texts(answers, "2.0", threshold), strict=True)}


def test_the_tuned_threshold_gives_the_best_f1_of_every_cut():
    records, answers = _answers_and_records()
    threshold = tune_no_answer_threshold(records, answers, "test")
    tuned = score(records, _texts(records, answers, threshold), "2.0")
    for cut in [-0.5 + k for k in range(7)]:  # abstain on margins above each possible cut
        assert tuned["f1"] >= score(records, _texts(records, answers, cut), "2.0")["f1"]
    assert 1 < threshold < 2  # answer q0 and q1 (both right), abstain on the rest (three unanswerable): F1 5/6
    assert tuned["f1"] == pytest.approx(500 / 6)


def test_v2_scores_of_the_raw_spans_match_the_abstaining_answers():
    records, answers = _answers_and_records()
    for threshold in (-1.0, 1.5, 3.5, 10.0):
        texts = _texts(records, answers, threshold)
        expected = score(records, texts, "2.0")
        got = score_v2(records, answers, threshold)
        assert got["f1"] == pytest.approx(expected["f1"]) and got["exact_match"] == pytest.approx(
            expected["exact_match"]
        )
        assert {"HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"} <= set(got)


def test_tuning_needs_unanswerable_questions():
    records, answers = _answers_and_records()
    answerable = [(r, a) for r, a in zip(records, answers, strict=True) if not r["is_impossible"]]
    with pytest.raises(ValueError, match="data.abstain_source"):
        tune_no_answer_threshold([r for r, _ in answerable], [a for _, a in answerable], "val.jsonl")


def test_tuning_on_questions_the_final_model_trains_on_is_refused():
    with pytest.raises(ConfigError, match="train.include_validation"):
        load_config(None, ["eval.tune_no_answer_threshold=true", "train.include_validation=true"])


def _dataset(path: str):
    from tasks.prepare import check, load

    return check(load(str(REPO / path), "validation", None, None))


def test_abstain_articles_join_both_splits_and_never_the_dev_articles(tmp_path: Path):
    from tasks.prepare import split_and_write, version_info

    train, dev, abstain = (
        _dataset("data/squad/train-v1.1-head.json"),
        _dataset("data/squad/dev-v2.0-head.json"),
        _dataset("data/squad/dev-v2.0.json.gz"),
    )
    cfg = DataConfig(train_articles=4, val_fraction=0.25, abstain_source="x", abstain_articles=4)
    info = split_and_write(train, dev, cfg, version_info(train, dev, abstain), abstain, out_dir=tmp_path)
    rows = {s: [json.loads(x) for x in (tmp_path / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "val")}
    dev_titles = {r["title"] for r in dev.records}
    for split, records in rows.items():
        assert not dev_titles & {r["title"] for r in records}
        assert any(r["is_impossible"] for r in records), split  # both learn or tune abstaining
    assert not {r["title"] for r in rows["train"]} & {r["title"] for r in rows["val"]}
    assert info["split"]["abstain"]["train"]["articles"] == 3 and info["split"]["abstain"]["val"]["articles"] == 1
    assert info["split"]["train"] == len(rows["train"]) and info["abstain"]["squad_version"] == "2.0"


def test_an_abstain_article_that_is_a_dev_article_is_refused_and_nothing_written(tmp_path: Path):
    from tasks.prepare import split_and_write, version_info

    train, dev, abstain = (
        _dataset("data/squad/train-v1.1-head.json"),
        _dataset("data/squad/dev-v2.0-head.json"),
        _dataset("data/squad/dev-v2.0.json.gz"),
    )
    cfg = DataConfig(train_articles=2, abstain_source="x", abstain_skip_articles=3)
    with pytest.raises(DataValidationError, match="dev articles.*abstain_skip_articles"):
        split_and_write(train, dev, cfg, version_info(train, dev, abstain), abstain, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
