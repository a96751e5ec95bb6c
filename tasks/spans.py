"""Span decoding: per question, the best valid answer span over all of its chunks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.features import Features, Record


@dataclass
class Answer:
    text: str
    start: int  # character offsets in the context; -1 when no answer
    end: int
    score: float  # start logit + end logit of the span
    null_score: float  # lowest [CLS] score over the question's chunks (v2.0 no-answer)


def best_spans(
    records: list[Record],
    feats: Features,
    start_logits: list[np.ndarray],
    end_logits: list[np.ndarray],
    max_answer_length: int = 30,
    n_best: int = 20,
) -> list[Answer]:
    """A span is valid when start <= end, it has at most `max_answer_length` tokens and lies in the context."""
    by_example: dict[int, list[int]] = {}
    for f, ex in enumerate(feats.example_index):
        by_example.setdefault(ex, []).append(f)
    answers = []
    for ex, record in enumerate(records):
        best = Answer("", -1, -1, float("-inf"), float("inf"))
        for f in by_example.get(ex, []):
            s_log, e_log, offsets = start_logits[f], end_logits[f], feats.offsets[f]
            best.null_score = min(best.null_score, float(s_log[0] + e_log[0]))
            is_ctx = np.array([o is not None for o in offsets])
            k = min(n_best, int(is_ctx.sum()))
            if k == 0:
                continue
            masked_s = np.where(is_ctx, s_log, -np.inf)
            masked_e = np.where(is_ctx, e_log, -np.inf)
            top_s = np.argpartition(-masked_s, k - 1)[:k]
            top_e = np.argpartition(-masked_e, k - 1)[:k]
            # score matrix of the n-best starts x n-best ends, invalid pairs masked out
            scores = masked_s[top_s][:, None] + masked_e[top_e][None, :]
            width = top_e[None, :] - top_s[:, None]
            scores = np.where((width >= 0) & (width < max_answer_length), scores, -np.inf)
            i, j = np.unravel_index(np.argmax(scores), scores.shape)
            if scores[i, j] > best.score:
                start_char, end_char = offsets[top_s[i]][0], offsets[top_e[j]][1]
                best.text = record["context"][start_char:end_char]
                best.start, best.end, best.score = start_char, end_char, float(scores[i, j])
        if best.start < 0:
            best.score = float("-inf")
        answers.append(best)
    return answers


def apply_no_answer_threshold(answers: list[Answer], threshold: float) -> list[str]:
    """SQuAD v2.0: answer "" when the [CLS] score beats the best span by more than `threshold`."""
    return ["" if a.start < 0 or a.null_score - a.score > threshold else a.text for a in answers]


def answer_texts(answers: list[Answer], squad_version: str, threshold: float) -> list[str]:
    """The predicted texts: SQuAD v1.1 questions all have an answer, so the best span always stands
    (a strong [CLS] score must not blank it); v2.0 abstains by `apply_no_answer_threshold`."""
    if squad_version == "2.0":
        return apply_no_answer_threshold(answers, threshold)
    return [a.text for a in answers]
