"""Span decoding: per question, the best valid answer span over all of its chunks.

Two rules score a span (`eval.span_scoring`); both compare a question's spans across all of its chunks:
- `chunk_softmax` (the default): p(start) * p(end), each a softmax over the chunk's context tokens and [CLS]; a
  chunk's 12 best spans are candidates, and the probabilities of candidates with the same text (any case) add up,
  over spans and chunks. This is the `question-answering` pipeline of transformers <= 5.2 (removed in 5.3): its
  answers, for users moving off it. It ranks by the log of the summed probability (`Answer.score`).
- `logit_sum`: start logit + end logit, as Hugging Face's `run_qa.py` post-processing.
Under both, a span that cuts a word (starts on the word piece "##enna" of "Brenna") is widened to the whole word,
as the pipeline's `align_to_words` does, and one that starts or ends on blanks loses them (byte-level BPE tokenizers,
LLaMA's, give a word's token the space before it: " Brenna"); a span of blanks alone is no answer.
Over 10 trained models chunk_softmax scored EM +0.27 and F1 -0.02 on average against logit_sum on held-out
questions: as accurate, with the pipeline's answers (benchmarks/README.md, twelfth round).

The ranking score is no probability: a sum over chunks exceeds 1 when several chunks hold the answer (a context
repeated k times adds up about k times the mass). What a user reads and
thresholds, under either rule, is `Answer.probability`: the probability of the answer in the chunk most sure of it.
In one chunk, the chance that the answer starts at token i and ends at token j is p(start = i) * p(end = j), each a
softmax over the chunk's context tokens and [CLS]; the answer's probability in that chunk adds this up over its
spans there with the answer's text (chunk_softmax: among the chunk's candidates; logit_sum: the chosen span in the
chunk that chose it). The spans of one chunk are disjoint events of one distribution, so that is at most 1, and so
is the maximum over chunks, however many chunks (or copies of the context) repeat the text. For a context that fits
in one chunk it is the pipeline's own score. `Answer.no_answer_probability` is p(start = [CLS]) * p(end = [CLS]) in
the chunk least sure there is no answer (the lowest over chunks), also in [0, 1]. Neither changes which answer is
chosen, nor the v2.0 abstention (`apply_no_answer_threshold` compares the ranking scores, as before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the config imports SPAN_SCORINGS: no torch for that
    from spanflow.data.features import Features, Record

SPAN_SCORINGS = ("chunk_softmax", "logit_sum")
DEFAULT_SPAN_SCORING = "chunk_softmax"  # eval.span_scoring's default
REGISTERED_BEFORE_SPAN_SCORING = "logit_sum"  # the rule of model versions whose settings lack span_scoring
PIPELINE_SPANS_PER_CHUNK = 12  # the pipeline's candidates per chunk for one answer (top_k * 2 + 10)


@dataclass
class Answer:
    text: str
    start: int  # character offsets in the context; -1 when no answer
    end: int
    score: float  # ranking: chunk_softmax: log of the answer's summed probability; logit_sum: start + end logit
    null_score: float  # lowest [CLS] score, same rule, over the question's chunks (v2.0 no-answer)
    probability: float = 0.0  # in [0, 1]: the answer's probability in the chunk most sure of it (module docstring)
    no_answer_probability: float = 1.0  # in [0, 1]: p([CLS], [CLS]) in the chunk least sure there is no answer


def _log_softmax(logits: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """log softmax over the positions in `keep`; the others are shifted alike (the caller masks them)."""
    kept = logits[keep].astype(np.float64)
    top = kept.max()
    return logits - (top + np.log(np.exp(kept - top).sum()))


def _chunk_spans(
    s_log: np.ndarray, e_log: np.ndarray, is_ctx: np.ndarray, max_answer_length: int, n_best: int, keep: int
) -> list[tuple[float, int, int]]:
    """The `keep` best valid spans of one chunk as (score, start token, end token), best first; candidates are the
    `n_best` best starts x the `n_best` best ends."""
    k = min(n_best, int(is_ctx.sum()))
    if k == 0:
        return []
    masked_s = np.where(is_ctx, s_log, -np.inf)
    masked_e = np.where(is_ctx, e_log, -np.inf)
    top_s = np.argpartition(-masked_s, k - 1)[:k]
    top_e = np.argpartition(-masked_e, k - 1)[:k]
    # score matrix of the n-best starts x n-best ends, invalid pairs masked out
    scores = masked_s[top_s][:, None] + masked_e[top_e][None, :]
    width = top_e[None, :] - top_s[:, None]
    scores = np.where((width >= 0) & (width < max_answer_length), scores, -np.inf).ravel()
    order = [int(np.argmax(scores))] if keep == 1 else np.argsort(-scores, kind="stable")[:keep]
    return [(float(scores[i]), int(top_s[i // k]), int(top_e[i % k])) for i in order if scores[i] > -np.inf]


def _joins(c: str) -> bool:
    """Whether `c` belongs to the word around it: letters and digits do, except CJK ideographs, which BERT's
    tokenizers (and SQuAD's scorer) take one at a time."""
    return c.isalnum() and not 0x3400 <= ord(c) <= 0x9FFF and not 0xF900 <= ord(c) <= 0xFAFF


def strip_blanks(context: str, start: int, end: int) -> tuple[int, int]:
    """Character span [start, end) without the blanks at its ends (empty when it holds only blanks)."""
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return start, end


def widen_to_words(context: str, start: int, end: int) -> tuple[int, int]:
    """Character span [start, end) widened to whole words where it cuts one: a span that starts on a word
    piece ("##enna" of "Brenna") takes the word's beginning, one that ends inside a word its end."""
    while 0 < start < len(context) and _joins(context[start - 1]) and _joins(context[start]):
        start -= 1
    while 0 < end < len(context) and _joins(context[end - 1]) and _joins(context[end]):
        end += 1
    return start, end


def best_spans(
    records: list[Record],
    feats: Features,
    start_logits: list[np.ndarray],
    end_logits: list[np.ndarray],
    max_answer_length: int = 30,
    n_best: int = 20,
    scoring: str = DEFAULT_SPAN_SCORING,
    whole_words: bool = True,
) -> list[Answer]:
    """A span is valid when start <= end, it has at most `max_answer_length` tokens and lies in the context.
    `scoring` is one of SPAN_SCORINGS (module docstring)."""
    if scoring not in SPAN_SCORINGS:
        raise ValueError(f"span scoring {scoring!r} is not {'|'.join(SPAN_SCORINGS)}")
    by_example: dict[int, list[int]] = {}
    for f, ex in enumerate(feats.example_index):
        by_example.setdefault(ex, []).append(f)
    pipeline = scoring == "chunk_softmax"
    answers = []
    for ex, record in enumerate(records):
        best = Answer("", -1, -1, float("-inf"), float("inf"))
        merged: dict[str, list] = {}  # chunk_softmax: lower-cased text -> [summed probability, start, end, text]
        in_best_chunk: dict[str, float] = {}  # chunk_softmax: lower-cased text -> its largest one-chunk probability
        log_no_answer = float("inf")
        for f in by_example.get(ex, []):
            s_log, e_log, offsets = start_logits[f], end_logits[f], feats.offsets[f]
            is_ctx = np.array([o is not None for o in offsets])
            with_cls = is_ctx.copy()
            with_cls[0] = True
            s_lp, e_lp = _log_softmax(s_log, with_cls), _log_softmax(e_log, with_cls)  # the chunk's probabilities
            log_no_answer = min(log_no_answer, float(s_lp[0] + e_lp[0]))
            if pipeline:
                s_log, e_log = s_lp, e_lp
            best.null_score = min(best.null_score, float(s_log[0] + e_log[0]))
            keep = PIPELINE_SPANS_PER_CHUNK if pipeline else 1
            in_chunk: dict[str, float] = {}
            for score, i, j in _chunk_spans(s_log, e_log, is_ctx, max_answer_length, n_best, keep):
                start_char, end_char = strip_blanks(record["context"], offsets[i][0], offsets[j][1])
                if start_char == end_char:
                    continue
                if whole_words:
                    start_char, end_char = widen_to_words(record["context"], start_char, end_char)
                text = record["context"][start_char:end_char]
                if pipeline:  # the same text from several spans or chunks: their probabilities add up
                    merged.setdefault(text.lower(), [0.0, start_char, end_char, text])[0] += math.exp(score)
                    in_chunk[text.lower()] = in_chunk.get(text.lower(), 0.0) + math.exp(score)
                elif score > best.score:
                    best.text, best.start, best.end, best.score = text, start_char, end_char, score
                    best.probability = math.exp(s_lp[i] + e_lp[j])
            for key, p in in_chunk.items():
                in_best_chunk[key] = max(in_best_chunk.get(key, 0.0), p)
        if merged:
            total, best.start, best.end, best.text = max(merged.values(), key=lambda m: m[0])
            best.score = math.log(total)
            best.probability = in_best_chunk[best.text.lower()]
        if best.start < 0:
            best.score, best.probability = float("-inf"), 0.0
        best.probability = min(1.0, best.probability)  # <= 1 but for rounding
        best.no_answer_probability = min(1.0, math.exp(log_no_answer))  # no chunk at all: 1
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
