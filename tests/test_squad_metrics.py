"""Tests for spanflow.answering.squad_metrics: official leaderboard numbers plus hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spanflow.answering.squad_metrics import (
    exact_match,
    exact_match_v2,
    f1,
    f1_v2,
    normalize_answer,
    per_question_scores,
    score,
    score_prediction_file,
)
from spanflow.data.squad import load_squad_json

DATA = Path(__file__).resolve().parents[1] / "data"
LEADERBOARD = DATA / "leaderboard"
DEV_V1 = DATA / "squad" / "dev-v1.1-head.json"
DEV_V2 = DATA / "squad" / "dev-v2.0-head.json"


def rec(qid: str, golds: list[str]) -> dict[str, Any]:
    """Minimal flat record; no golds means unanswerable."""
    return {
        "id": qid,
        "title": "t",
        "context": "c",
        "question": "q?",
        "answers": {"text": golds, "answer_start": [0] * len(golds)},
        "is_impossible": not golds,
    }


# --------------------------------------------------------------- official leaderboard numbers

# (file, dataset, EM, F1) as printed by the official scripts (100 * mean, 3 decimals).
# The closest raw value to a rounding boundary is v2.0 BERT F1 78.832514 (1.4e-5 above
# 78.8325), far beyond float noise (~1e-12), so plain round(x, 3) is safe.
LEADERBOARD_CASES = [
    ("v1.1--BERT_ensemble_Google_AI_Language.json", DEV_V1, 84.255, 91.359),
    ("v1.1--r-net+_ensemble_Microsoft_Research_Asia.json", DEV_V1, 80.993, 87.935),
    ("v1.1--SLQA+_ensemble_Alibaba_iDST_NLP.json", DEV_V1, 79.007, 86.793),
    (
        "v1.1--Match-LSTM_with_Ans-Ptr_Boundary+Ensemble_Singapore_Management_University.json",
        DEV_V1,
        67.943,
        77.227,
    ),
    (
        "v1.1--Logistic_Regression_Baseline_Stanford_University.json",
        DEV_V1,
        40.284,
        50.480,
    ),
    ("v2.0--BERT_single_model_Google_AI_Language.json", DEV_V2, 75.551, 78.833),
    ("v2.0--nlnet_single_model_Microsoft_Research_Asia.json", DEV_V2, 73.774, 76.579),
    (
        (
            "v2.0--BiDAF_+_Self_Attention_+_ELMo_single_model_Allen_Institute_for_Artificial_"
            "Intelligence_modified_by_Stanford.json"
        ),
        DEV_V2,
        64.179,
        66.261,
    ),
]


@pytest.mark.parametrize(
    ("name", "dataset", "em", "f1_expected"),
    LEADERBOARD_CASES,
    ids=[c[0].split("--")[0] + "-" + c[0].split("--")[1][:24] for c in LEADERBOARD_CASES],
)
def test_leaderboard_reproduces_official(name: str, dataset: Path, em: float, f1_expected: float) -> None:
    result = score_prediction_file(dataset, LEADERBOARD / name)
    assert round(result["exact_match"], 3) == em
    assert round(result["f1"], 3) == f1_expected
    assert result["total"] == (705 if dataset == DEV_V1 else 1407)


def test_leaderboard_v2_breakdown_bert() -> None:
    result = score_prediction_file(DEV_V2, LEADERBOARD / "v2.0--BERT_single_model_Google_AI_Language.json")
    assert round(result["HasAns_exact"], 3) == 70.355
    assert round(result["HasAns_f1"], 3) == 76.904
    assert round(result["NoAns_exact"], 3) == 80.769
    assert round(result["NoAns_f1"], 3) == 80.769
    assert (result["HasAns_total"], result["NoAns_total"]) == (705, 702)
    # Overall is the question-weighted mean of the two groups.
    assert result["exact_match"] == pytest.approx((705 * result["HasAns_exact"] + 702 * result["NoAns_exact"]) / 1407)
    assert "best_f1" not in result  # only with na_probs


def test_load_squad_json() -> None:
    v1, version1 = load_squad_json(DEV_V1)
    v2, version2 = load_squad_json(DEV_V2)
    assert (version1, version2) == ("1.1", "2.0")
    assert (len(v1), len(v2)) == (705, 1407)
    assert all(r["answers"]["text"] and not r["is_impossible"] for r in v1)
    impossible = [r for r in v2 if r["is_impossible"]]
    assert len(impossible) == 702
    assert all(r["answers"] == {"text": [], "answer_start": []} for r in impossible)
    first = v2[0]
    assert set(first) == {
        "id",
        "title",
        "context",
        "question",
        "answers",
        "is_impossible",
    }
    start, text = first["answers"]["answer_start"][0], first["answers"]["text"][0]
    assert first["context"][start : start + len(text)] == text


# --------------------------------------------------------------- normalization and metrics


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Quick Brown FOX", "quick brown fox"),  # case + leading article
        ("an apple a day", "apple day"),  # articles anywhere
        ("theatre and anathema", "theatre and anathema"),  # only whole-word articles
        ("U.S.A., (1990)!", "usa 1990"),  # punctuation removed, not replaced by a space
        ("the-end", "theend"),  # punctuation goes before articles are matched
        ("  lots \t of\n  space  ", "lots of space"),
        ("A", ""),
        ("", ""),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


def test_exact_match() -> None:
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower", "Eiffel") == 0.0
    assert exact_match_v2("", "") == 1.0


def test_f1_partial_overlap_by_hand() -> None:
    # pred -> [cat, sat, on, mat], gold -> [cat, on, hat]; 2 shared: P = 2/4, R = 2/3.
    assert f1("the cat sat on the mat", "a cat on a hat") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert f1("the cat sat on the mat", "a cat on a hat") == pytest.approx(4 / 7)
    # Counter overlap counts repeats only as often as both sides have them: {x: 1, y: 1}.
    assert f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1("nothing shared", "at all") == 0.0
    assert f1("Same Words!", "same words") == 1.0


def test_f1_empty_v1_vs_v2() -> None:
    assert f1("", "") == 0.0  # v1.1: no shared tokens -> 0
    assert f1_v2("", "") == 1.0  # v2.0: both no-answer -> 1
    assert f1_v2("the", "") == 1.0  # normalizes to empty
    assert f1_v2("Paris", "") == 0.0
    assert f1_v2("", "Paris") == 0.0
    assert f1_v2("the cat sat on the mat", "a cat on a hat") == f1("the cat sat on the mat", "a cat on a hat")


@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_max_over_gold_answers(version: str) -> None:
    records = [rec("q", ["Paris", "the city of Paris", "France"])]
    per_q = per_question_scores(records, {"q": "City of Paris"}, version)
    assert per_q["q"] == (1.0, 1.0)
    # vs "Paris": P=1/2 R=1 -> 2/3; vs "city of paris": 1/3 overlap... -> 0.4; vs "France": 2/3.
    em, f = per_question_scores(records, {"q": "Paris France"}, version)["q"]
    assert em == 0.0
    assert f == pytest.approx(2 / 3)


@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_missing_prediction_scores_zero(version: str) -> None:
    records = [rec("a", ["Paris"]), rec("b", ["London"])]
    result = score(records, {"a": "Paris", "unknown-id": "x"}, version)
    assert result["total"] == 2
    assert result["exact_match"] == 50.0
    assert result["f1"] == 50.0
    assert per_question_scores(records, {"a": "Paris"}, version)["b"] == (0.0, 0.0)


def test_v2_no_answer_scoring() -> None:
    records = [rec("ans", ["Paris"]), rec("no", []), rec("the", ["The", "a"])]
    per_q = per_question_scores(records, {"ans": "", "no": "", "the": ""}, "2.0")
    assert per_q["ans"] == (0.0, 0.0)
    assert per_q["no"] == (1.0, 1.0)  # empty pred vs empty gold
    # Golds normalizing to '' are dropped -> gold [''].
    assert per_q["the"] == (1.0, 1.0)
    assert per_question_scores(records, {"no": "Paris"}, "2.0")["no"] == (0.0, 0.0)
    result = score(records, {"ans": "Paris", "no": "", "the": "x"}, "2.0")
    # Has-answer means a non-empty answers list (official), not the normalized golds.
    assert (result["HasAns_total"], result["NoAns_total"]) == (2, 1)
    assert result["HasAns_exact"] == 50.0
    assert result["NoAns_exact"] == 100.0
    assert result["exact_match"] == pytest.approx(200 / 3)


def test_v2_group_keys_only_when_present() -> None:
    result = score([rec("a", ["Paris"])], {"a": "Paris"}, "2.0")
    assert "HasAns_exact" in result and "NoAns_exact" not in result
    assert "HasAns_exact" not in score([rec("a", ["Paris"])], {"a": "Paris"}, "1.1")


def test_na_threshold_turns_prediction_into_no_answer() -> None:
    records = [rec("ans", ["Paris"]), rec("no", [])]
    preds = {"ans": "Paris", "no": "Paris"}
    na_probs = {"ans": 0.9, "no": 0.9}
    # Not above the threshold (strict >): predictions are kept.
    kept = score(records, preds, "2.0", na_probs=na_probs, na_threshold=0.9)
    assert (kept["HasAns_exact"], kept["NoAns_exact"]) == (100.0, 0.0)
    # Above it: both become no-answers, right for "no", wrong for "ans".
    flipped = score(records, preds, "2.0", na_probs=na_probs, na_threshold=0.5)
    assert (flipped["HasAns_exact"], flipped["NoAns_exact"]) == (0.0, 100.0)
    assert (flipped["HasAns_f1"], flipped["NoAns_f1"]) == (0.0, 100.0)
    per_q = per_question_scores(records, preds, "2.0", na_probs=na_probs, na_threshold=0.5)
    assert per_q == {"ans": (0.0, 0.0), "no": (1.0, 1.0)}


def test_best_threshold_by_hand() -> None:
    records = [
        rec("q1", ["Paris"]),
        rec("q2", []),
        rec("q3", []),
        rec("q4", ["London"]),
    ]
    preds = {"q1": "Paris", "q2": "x", "q3": "y", "q4": "Rome"}
    na_probs = {"q1": 0.1, "q2": 0.8, "q3": 0.3, "q4": 0.5}
    # Start with everything abstaining: 2 correct (q2, q3). Ascending na_prob:
    # q1 +1 -> 3 (best, thresh 0.1); q3 -1 -> 2; q4 +0 -> 2; q2 -1 -> 1.
    result = score(records, preds, "2.0", na_probs=na_probs)
    assert result["best_exact"] == 75.0
    assert result["best_exact_thresh"] == 0.1
    assert result["best_f1"] == 75.0
    assert result["best_f1_thresh"] == 0.1
    # Default threshold 1.0 applies nothing: only q1 right.
    assert result["exact_match"] == 25.0
    # Applying the best threshold reproduces the best score.
    at_best = score(
        records,
        preds,
        "2.0",
        na_probs=na_probs,
        na_threshold=result["best_exact_thresh"],
    )
    assert at_best["exact_match"] == result["best_exact"]


def test_per_question_scores_consistent_with_score() -> None:
    records, version = load_squad_json(DEV_V2)
    preds = json.loads((LEADERBOARD / "v2.0--BERT_single_model_Google_AI_Language.json").read_text())
    del preds[records[3]["id"]]  # one missing prediction
    na_probs = {r["id"]: (i % 10) / 10 for i, r in enumerate(records)}
    for kwargs in ({}, {"na_probs": na_probs, "na_threshold": 0.55}):
        per_q = per_question_scores(records, preds, version, **kwargs)
        result = score(records, preds, version, **kwargs)
        assert list(per_q) == [r["id"] for r in records]
        assert all(0.0 <= v <= 1.0 for pair in per_q.values() for v in pair)
        assert result["exact_match"] == pytest.approx(100 * sum(e for e, _ in per_q.values()) / len(per_q))
        assert result["f1"] == pytest.approx(100 * sum(f for _, f in per_q.values()) / len(per_q))


def test_invalid_inputs() -> None:
    records = [rec("a", ["Paris"])]
    with pytest.raises(ValueError, match="version"):
        score(records, {}, "3.0")
    with pytest.raises(ValueError, match="v2.0"):
        score(records, {"a": "Paris"}, "1.1", na_probs={"a": 0.5})
    with pytest.raises(ValueError, match="na_probs missing"):
        score(records, {"a": "Paris"}, "2.0", na_probs={})
    with pytest.raises(ValueError, match="duplicate"):
        score(records * 2, {"a": "Paris"}, "2.0")
    with pytest.raises(ValueError, match="no questions"):
        score([], {}, "1.1")
