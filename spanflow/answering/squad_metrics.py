"""Official SQuAD evaluation (v1.1 and v2.0), reimplemented with types.

Reproduces ``evaluate-v1.1.py`` and ``evaluate-v2.0.py`` from the SQuAD site bit for bit
(same normalization, same per-question maxima, same summation order). Records use the flat
Hugging Face ``squad`` / ``squad_v2`` schema::

    {"id", "title", "context", "question",
     "answers": {"text": [...], "answer_start": [...]}, "is_impossible": bool}

Deliberate deviations from the official scripts, both only for *missing* predictions:

* v1.1 already scores a missing prediction 0 and keeps it in the total; so do we.
* v2.0 official skips missing ids (shrinking the total) and then crashes on the
  HasAns/NoAns breakdown; here a missing prediction scores 0, stays in every total, is never
  turned into a no-answer by a threshold and is left out of the best-threshold search (which
  still divides by the full total). With complete predictions the numbers are identical.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "exact_match",
    "exact_match_v2",
    "f1",
    "f1_v2",
    "normalize_answer",
    "per_question_scores",
    "score",
    "score_prediction_file",
]

Record = Mapping[str, Any]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
_VERSIONS = {"1.1": "1.1", "v1.1": "1.1", "2.0": "2.0", "v2.0": "2.0"}


# --------------------------------------------------------------------------- metrics


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop articles, collapse whitespace (official order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, ground_truth: str) -> float:
    """1.0 if the normalized strings are equal, else 0.0 (identical in v1.1 and v2.0)."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


# v2.0's ``compute_exact`` is the same function.
exact_match_v2 = exact_match


def _overlap_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def f1(prediction: str, ground_truth: str) -> float:
    """v1.1 token F1; an empty side always scores 0 (even if both are empty)."""
    return _overlap_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def f1_v2(prediction: str, ground_truth: str) -> float:
    """v2.0 token F1; if either side is empty (no-answer) it is 1.0 iff both are empty."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(ground_truth).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    return _overlap_f1(pred_tokens, gold_tokens)


# --------------------------------------------------------------------------- scoring


def _canonical_version(version: str) -> str:
    try:
        return _VERSIONS[str(version).strip()]
    except KeyError:
        raise ValueError(f"unknown SQuAD version {version!r}; expected '1.1' or '2.0'") from None


def _gold_texts(record: Record) -> list[str]:
    return list(record["answers"]["text"])


def _raw_scores(
    records: Sequence[Record], predictions: Mapping[str, str], version: str
) -> dict[str, tuple[float, float] | None]:
    """Per-question (em, f1) before any threshold; None for a missing prediction."""
    out: dict[str, tuple[float, float] | None] = {}
    for record in records:
        qid = record["id"]
        if qid in out:
            raise ValueError(f"duplicate question id {qid!r}")
        if qid not in predictions:
            out[qid] = None
            continue
        prediction = predictions[qid]
        golds = _gold_texts(record)
        if version == "1.1":
            if not golds:
                raise ValueError(f"v1.1 question {qid!r} has no gold answers")
            em = max(exact_match(prediction, g) for g in golds)
            f = max(f1(prediction, g) for g in golds)
        else:
            # v2.0: golds that normalize to '' are dropped; none left means "no answer".
            golds = [g for g in golds if normalize_answer(g)] or [""]
            em = max(exact_match_v2(prediction, g) for g in golds)
            f = max(f1_v2(prediction, g) for g in golds)
        out[qid] = (em, f)
    return out


def _has_answer(records: Iterable[Record]) -> dict[str, bool]:
    # Official make_qid_to_has_ans: bool(qa['answers']), not the is_impossible flag.
    return {r["id"]: bool(_gold_texts(r)) for r in records}


def _thresholded(
    raw: Mapping[str, tuple[float, float] | None],
    has_ans: Mapping[str, bool],
    na_probs: Mapping[str, float] | None,
    na_threshold: float,
) -> dict[str, tuple[float, float]]:
    """Official apply_no_ans_threshold: na_prob > threshold -> scored as a no-answer."""
    out: dict[str, tuple[float, float]] = {}
    for qid, scores in raw.items():
        if scores is None:
            out[qid] = (0.0, 0.0)  # missing prediction: wrong
        elif na_probs is not None and na_probs[qid] > na_threshold:
            s = float(not has_ans[qid])
            out[qid] = (s, s)
        else:
            out[qid] = scores
    return out


def _check_na_probs(
    version: str,
    raw: Mapping[str, tuple[float, float] | None],
    na_probs: Mapping[str, float] | None,
) -> None:
    if na_probs is None:
        return
    if version != "2.0":
        raise ValueError("na_probs only apply to SQuAD v2.0")
    missing = [qid for qid, s in raw.items() if s is not None and qid not in na_probs]
    if missing:
        raise ValueError(f"na_probs missing for {len(missing)} predicted questions, e.g. {missing[0]!r}")


def per_question_scores(
    records: Sequence[Record],
    predictions: Mapping[str, str],
    version: str,
    na_probs: Mapping[str, float] | None = None,
    na_threshold: float = 1.0,
) -> dict[str, tuple[float, float]]:
    """id -> (exact match, F1), each in [0, 1]; the means times 100 are ``score``'s totals."""
    v = _canonical_version(version)
    raw = _raw_scores(records, predictions, v)
    _check_na_probs(v, raw, na_probs)
    return _thresholded(raw, _has_answer(records), na_probs, na_threshold)


def _best_threshold(
    predictions: Mapping[str, str],
    raw_metric: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_ans: Mapping[str, bool],
    total: int,
) -> tuple[float, float]:
    """Official find_best_thresh: sweep na_prob thresholds, from 'all no-answer' upwards."""
    cur = sum(1 for qid in raw_metric if not has_ans[qid])
    best, best_thresh = cur, 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in raw_metric:
            continue
        if has_ans[qid]:
            diff = raw_metric[qid]
        else:
            # Raw (unnormalized) emptiness of the prediction, as official.
            diff = -1 if predictions[qid] else 0
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[qid]
    return 100.0 * best / total, best_thresh


def _mean_pct(values: Iterable[float], n: int) -> float:
    return 100.0 * sum(values) / n


def score(
    records: Sequence[Record],
    predictions: Mapping[str, str],
    version: str,
    na_probs: Mapping[str, float] | None = None,
    na_threshold: float = 1.0,
) -> dict[str, float]:
    """Official SQuAD scores in percent.

    Keys: ``exact_match``, ``f1``, ``total``; for v2.0 also ``HasAns_*`` / ``NoAns_*``
    (``_exact``, ``_f1``, ``_total``; each group only if it has questions, as official) and,
    when ``na_probs`` is given, ``best_exact``, ``best_exact_thresh``, ``best_f1``,
    ``best_f1_thresh``. Predictions for ids not in ``records`` are ignored.
    """
    v = _canonical_version(version)
    if not records:
        raise ValueError("no questions to score")
    raw = _raw_scores(records, predictions, v)
    _check_na_probs(v, raw, na_probs)
    has_ans = _has_answer(records)
    scores = _thresholded(raw, has_ans, na_probs, na_threshold)
    total = len(scores)
    out: dict[str, float] = {
        "exact_match": _mean_pct((s[0] for s in scores.values()), total),
        "f1": _mean_pct((s[1] for s in scores.values()), total),
        "total": total,
    }
    if v == "1.1":
        return out
    for prefix, answerable in (("HasAns", True), ("NoAns", False)):
        qids = [qid for qid, h in has_ans.items() if h == answerable]
        if qids:
            out[f"{prefix}_exact"] = _mean_pct((scores[q][0] for q in qids), len(qids))
            out[f"{prefix}_f1"] = _mean_pct((scores[q][1] for q in qids), len(qids))
            out[f"{prefix}_total"] = len(qids)
    if na_probs is not None:
        # The sweep uses the raw (un-thresholded) scores, as official.
        for key, idx in (("exact", 0), ("f1", 1)):
            metric = {qid: s[idx] for qid, s in raw.items() if s is not None}
            best, thresh = _best_threshold(predictions, metric, na_probs, has_ans, total)
            out[f"best_{key}"] = best
            out[f"best_{key}_thresh"] = thresh
    return out


# --------------------------------------------------------------------------- files


def score_prediction_file(
    dataset_path: str | Path,
    prediction_path: str | Path,
    na_prob_path: str | Path | None = None,
    na_threshold: float = 1.0,
) -> dict[str, float]:
    """Score a ``{id: answer}`` JSON file against an official dataset file (like the scripts)."""
    from spanflow.data.squad import load_squad_json  # the validating reader

    records, version = load_squad_json(dataset_path)
    with open(prediction_path, encoding="utf-8") as fh:
        predictions = json.load(fh)
    na_probs = None
    if na_prob_path is not None:
        with open(na_prob_path, encoding="utf-8") as fh:
            na_probs = json.load(fh)
    return score(records, predictions, version, na_probs=na_probs, na_threshold=na_threshold)
