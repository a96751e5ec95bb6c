"""SQuAD 2.0 abstention: the no-answer margin of each question, and the threshold tuned on validation.

A question is answered "" when its [CLS] score beats its best span by more than the threshold
(`spans.apply_no_answer_threshold`). That margin plays the part of the official script's `na_prob`, so the
official best-threshold sweep over it picks the threshold, and scoring the raw spans with it gives the same
EM/F1 as the abstaining answers.
"""

from __future__ import annotations

from spanflow.answering.spans import Answer
from spanflow.answering.squad_metrics import per_question_scores, score
from spanflow.data.features import Record

MAX_THRESHOLD = 1e6  # a question without any span has margin inf: thresholds stay finite, for JSON


def no_answer_margins(records: list[Record], answers: list[Answer]) -> dict[str, float]:
    """id -> null score - best span score: how strongly the model says the context holds no answer."""
    return {r["id"]: a.null_score - a.score for r, a in zip(records, answers, strict=True)}


def raw_spans(records: list[Record], answers: list[Answer]) -> dict[str, str]:
    """id -> the best span's text, before any abstention: what the official na_prob scoring takes."""
    return {r["id"]: a.text for r, a in zip(records, answers, strict=True)}


def score_v2(records: list[Record], answers: list[Answer], threshold: float) -> dict[str, float]:
    """Official SQuAD 2.0 scores at `threshold`, with HasAns/NoAns and the best-threshold figures."""
    return score(
        records,
        raw_spans(records, answers),
        "2.0",
        na_probs=no_answer_margins(records, answers),
        na_threshold=threshold,
    )


def tune_no_answer_threshold(records: list[Record], answers: list[Answer], where: str) -> float:
    """The threshold with the best F1 on `records` (the validation split, never the questions reported on): the
    midpoint between the margins of the last question answered and the first abstained on."""
    if not any(r["is_impossible"] for r in records):
        raise ValueError(
            f"eval.tune_no_answer_threshold: {where} has no unanswerable question to tune on; give the training"
            " data some (data.abstain_source, e.g. data/squad/dev-v2.0.json.gz)"
        )
    raw = per_question_scores(records, raw_spans(records, answers), "2.0")  # F1 of each question if answered
    margins = no_answer_margins(records, answers)
    order = sorted(records, key=lambda r: margins[r["id"]])
    total = best = sum(1.0 for r in records if r["is_impossible"])  # abstaining on all: the unanswerable are right
    best_k = 0
    for k, r in enumerate(order, start=1):  # answer the k questions of lowest margin, abstain on the rest
        total += raw[r["id"]][1] - float(r["is_impossible"])
        cut_here = k == len(order) or margins[order[k]["id"]] > margins[r["id"]]
        if cut_here and total > best:
            best, best_k = total, k
    ranked = [margins[r["id"]] for r in order]
    if best_k == 0:
        return ranked[0] - 1.0
    if best_k == len(ranked):
        return min(ranked[-1] + 1.0, MAX_THRESHOLD)
    return (ranked[best_k - 1] + min(ranked[best_k], MAX_THRESHOLD)) / 2
