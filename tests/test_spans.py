"""Span decoding (spanflow/answering/spans.py): hand-built numpy logits on top of real features of tiny records."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from spanflow.answering.spans import Answer, apply_no_answer_threshold, best_spans, widen_to_words
from spanflow.config import ModelConfig
from spanflow.data.features import Features, featurize
from spanflow.models.modeling import load_tokenizer

LOW = -10.0
CONTEXT = "The Alder river flows through Norland. It is 420 kilometres long and was mapped in 1780."
QUESTION = "How long is the Alder river?"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


def make_record(context: str, answer: str, question: str = QUESTION, rid: str = "r0") -> dict:
    return {
        "id": rid,
        "title": "T",
        "context": context,
        "question": question,
        "answers": {"text": [answer], "answer_start": [context.index(answer)]},
        "is_impossible": False,
    }


@pytest.fixture(scope="module")
def tiny(tok):
    """One short record in one chunk, plus a lookup from context word to token index."""
    rec = make_record(CONTEXT, "420 kilometres")
    feats = featurize([rec], tok, 64, 16)
    assert len(feats) == 1
    return rec, feats


def tok_of(rec: dict, feats: Features, chunk: int, word: str) -> int:
    """Index of the (single) token that starts at `word` in the chunk."""
    start = rec["context"].index(word)
    return next(k for k, o in enumerate(feats.offsets[chunk]) if o is not None and o[0] == start)


def flat_logits(feats: Features, value: float = LOW) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return (
        [np.full(len(ids), value, dtype=np.float32) for ids in feats.input_ids],
        [np.full(len(ids), value, dtype=np.float32) for ids in feats.input_ids],
    )


def brute_force(records, feats, starts, ends, max_answer_length):
    """Reference: exhaustive search over every (start, end) pair of context tokens."""
    out = []
    for ex, rec in enumerate(records):
        best = (-math.inf, "", -1, -1)
        for f, fex in enumerate(feats.example_index):
            if fex != ex:
                continue
            offs = feats.offsets[f]
            ctx = [k for k, o in enumerate(offs) if o is not None]
            for s in ctx:
                for e in ctx:
                    if s <= e < s + max_answer_length:
                        score = float(starts[f][s] + ends[f][e])
                        if score > best[0]:
                            best = (score, rec["context"][offs[s][0] : offs[e][1]], offs[s][0], offs[e][1])
        out.append(best)
    return out


# --------------------------------------------------------------------------- one chunk


def test_picks_max_scoring_span(tiny):
    rec, feats = tiny
    s_log, e_log = flat_logits(feats)
    a, b = tok_of(rec, feats, 0, "420"), tok_of(rec, feats, 0, "kilometres")
    s_log[0][a], e_log[0][b] = 5.0, 4.0
    s_log[0][a + 3], e_log[0][a + 4] = 3.0, 3.5  # a weaker valid span elsewhere
    (ans,) = best_spans([rec], feats, s_log, e_log, scoring="logit_sum")
    assert ans.text == "420 kilometres"
    assert (ans.start, ans.end) == (CONTEXT.index("420"), CONTEXT.index("420") + len("420 kilometres"))
    assert CONTEXT[ans.start : ans.end] == ans.text
    assert ans.score == pytest.approx(9.0)
    assert ans.null_score == pytest.approx(2 * LOW)


def test_rejects_end_before_start(tiny):
    rec, feats = tiny
    s_log, e_log = flat_logits(feats)
    late, early = tok_of(rec, feats, 0, "1780"), tok_of(rec, feats, 0, "420")
    s_log[0][late], e_log[0][early] = 10.0, 10.0  # 20.0, but the end precedes the start
    s_log[0][early] = 3.0
    (ans,) = best_spans([rec], feats, s_log, e_log, scoring="logit_sum")
    assert ans.text == "420"
    assert ans.score == pytest.approx(13.0)


@pytest.mark.parametrize("max_len", [1, 3, 8])
def test_rejects_spans_longer_than_max_answer_length(tok, max_len):
    words = [str(n) for n in range(101, 116)]
    context = " ".join(words)
    rec = make_record(context, words[2], question="Which numbers?")
    feats = featurize([rec], tok, 64, 16)
    assert sum(o is not None for o in feats.offsets[0]) == len(words)  # one token per word
    first = tok_of(rec, feats, 0, words[0])
    a = first + 2
    s_log, e_log = flat_logits(feats)
    s_log[0][a] = 5.0
    e_log[0][a + max_len] = 9.0  # max_len + 1 tokens: one too long
    e_log[0][a + max_len - 1] = 1.0  # exactly max_len tokens: allowed
    (ans,) = best_spans([rec], feats, s_log, e_log, max_answer_length=max_len, scoring="logit_sum")
    assert ans.text == " ".join(words[2 : 2 + max_len])
    assert ans.score == pytest.approx(6.0)
    (longer,) = best_spans([rec], feats, s_log, e_log, max_answer_length=max_len + 1, scoring="logit_sum")
    assert longer.text == " ".join(words[2 : 3 + max_len])
    assert longer.score == pytest.approx(14.0)


def test_ignores_question_cls_and_sep_tokens(tiny):
    rec, feats = tiny
    offs = feats.offsets[0]
    non_ctx = [k for k, o in enumerate(offs) if o is None]
    assert non_ctx[0] == 0 and len(non_ctx) > 3  # [CLS], question tokens, two [SEP]
    s_log, e_log = flat_logits(feats, -100.0)
    for k in non_ctx:
        s_log[0][k] = e_log[0][k] = 100.0  # the very best scores sit outside the context
    k = tok_of(rec, feats, 0, "river")
    s_log[0][k], e_log[0][k] = -50.0, -50.0
    (ans,) = best_spans([rec], feats, s_log, e_log, scoring="logit_sum")
    assert ans.text == "river"
    assert ans.score == pytest.approx(-100.0)
    assert ans.null_score == pytest.approx(200.0)
    assert apply_no_answer_threshold([ans], 0.0) == [""]


def test_n_best_limits_candidates(tiny):
    rec, feats = tiny
    s_log, e_log = flat_logits(feats)
    t = {w: tok_of(rec, feats, 0, w) for w in ("Alder", "420", "kilometres", "1780")}
    s_log[0][t["1780"]] = 9.0  # best start, but every strong end lies before it
    s_log[0][t["420"]] = 8.0  # second-best start
    e_log[0][t["Alder"]] = 9.0  # best end, before both starts
    e_log[0][t["kilometres"]] = 1.0  # second-best end
    (one,) = best_spans([rec], feats, s_log, e_log, n_best=1, scoring="logit_sum")
    assert (one.text, one.start, one.end, one.score) == ("", -1, -1, -math.inf)
    assert apply_no_answer_threshold([one], 1e9) == [""]
    (two,) = best_spans([rec], feats, s_log, e_log, n_best=2, scoring="logit_sum")
    assert two.text == "420 kilometres"
    assert two.score == pytest.approx(9.0)


# --------------------------------------------------------------------------- several chunks


@pytest.fixture(scope="module")
def chunked(tok):
    """Two questions over a numbered context split into several chunks, features of both interleaved."""
    vocab = tok.get_vocab()
    words = [str(n) for n in range(100, 10000) if str(n) in vocab][:60]
    context = " ".join(words)
    recs = [make_record(context, words[1], "Which numbers?", "a"), make_record(context, words[2], "Which?", "b")]
    feats = featurize(recs, tok, 32, 8)
    counts = [feats.example_index.count(i) for i in range(2)]
    assert counts[0] >= 3 and counts[0] == counts[1]
    return words, context, recs, feats


def char_of(words, word_index):
    return sum(len(w) + 1 for w in words[:word_index])


def chunk_word_tok(words, context, feats, chunk, word_index):
    """Token index of word `word_index` in the chunk, None when the chunk does not hold it."""
    start = char_of(words, word_index)
    assert context[start : start + len(words[word_index])] == words[word_index]
    return next((k for k, o in enumerate(feats.offsets[chunk]) if o is not None and o[0] == start), None)


@pytest.mark.parametrize("winner", ["first", "last"])
def test_best_over_chunks_maps_to_context_characters(chunked, winner):
    words, context, recs, feats = chunked
    chunks_a = [f for f, ex in enumerate(feats.example_index) if ex == 0]
    first, last = chunks_a[0], chunks_a[-1]
    s_log, e_log = flat_logits(feats)
    # words 3..4 only in the first chunk, words 56..58 only in the last one
    a0, b0 = chunk_word_tok(words, context, feats, first, 3), chunk_word_tok(words, context, feats, first, 4)
    a1, b1 = chunk_word_tok(words, context, feats, last, 56), chunk_word_tok(words, context, feats, last, 58)
    assert None not in (a0, b0, a1, b1)
    assert chunk_word_tok(words, context, feats, last, 3) is None
    s_log[first][a0], e_log[first][b0] = 3.0, 3.0
    s_log[last][a1], e_log[last][b1] = (2.0, 2.0) if winner == "first" else (4.0, 4.0)
    ans = best_spans(recs, feats, s_log, e_log, scoring="logit_sum")[0]
    lo, hi = (3, 4) if winner == "first" else (56, 58)
    expected = " ".join(words[lo : hi + 1])
    assert ans.text == expected
    assert ans.start == char_of(words, lo) and ans.end == ans.start + len(expected)
    assert ans.score == pytest.approx(6.0 if winner == "first" else 8.0)


def word_in_overlap(words, context, feats) -> tuple[int, int, int, int, int]:
    """The first two chunks of question 0, a word present in both, and its token in each: (c0, c1, word, k0, k1)."""
    c0, c1 = [f for f, ex in enumerate(feats.example_index) if ex == 0][:2]
    w = next(
        i
        for i in range(len(words))
        if chunk_word_tok(words, context, feats, c0, i) is not None
        and chunk_word_tok(words, context, feats, c1, i) is not None
    )
    return c0, c1, w, chunk_word_tok(words, context, feats, c0, w), chunk_word_tok(words, context, feats, c1, w)


def test_span_in_overlap_scored_by_better_chunk(chunked):
    words, context, recs, feats = chunked
    c0, c1, w, k0, k1 = word_in_overlap(words, context, feats)
    assert k0 != k1  # same word, different token position
    s_log, e_log = flat_logits(feats)
    s_log[c0][k0] = e_log[c0][k0] = 1.0
    s_log[c1][k1] = e_log[c1][k1] = 2.5
    ans = best_spans(recs, feats, s_log, e_log, scoring="logit_sum")[0]
    assert ans.text == words[w] and ans.score == pytest.approx(5.0)


def test_questions_decoded_independently(chunked):
    words, context, recs, feats = chunked
    s_log, e_log = flat_logits(feats)
    fa = feats.example_index.index(0)
    fb = feats.example_index.index(1)
    ka, kb = chunk_word_tok(words, context, feats, fa, 5), chunk_word_tok(words, context, feats, fb, 9)
    s_log[fa][ka] = e_log[fa][ka] = 1.0
    s_log[fb][kb] = e_log[fb][kb] = 7.0  # a higher score for question b must not leak into a
    a, b = best_spans(recs, feats, s_log, e_log, scoring="logit_sum")
    assert (a.text, b.text) == (words[5], words[9])
    assert (a.score, b.score) == (pytest.approx(2.0), pytest.approx(14.0))


def test_null_score_is_min_cls_over_chunks(chunked):
    words, context, recs, feats = chunked
    s_log, e_log = flat_logits(feats)
    cls = [(1.0, 2.0), (-1.0, 0.5), (4.0, -3.0), (0.0, 0.0), (2.0, 2.0)]
    for i, f in enumerate(f for f, ex in enumerate(feats.example_index) if ex == 0):
        s_log[f][0], e_log[f][0] = cls[i % len(cls)]
    for f in (f for f, ex in enumerate(feats.example_index) if ex == 1):
        s_log[f][0], e_log[f][0] = 3.0, 3.0
    a, b = best_spans(recs, feats, s_log, e_log, scoring="logit_sum")
    assert a.null_score == pytest.approx(-0.5)  # min(3.0, -0.5, 1.0, ...), not max nor first
    assert b.null_score == pytest.approx(6.0)


def test_question_without_chunks_has_no_answer(tiny):
    rec, feats = tiny
    s_log, e_log = flat_logits(feats)
    other = dict(rec, id="r1")
    first, second = best_spans([rec, other], feats, s_log, e_log, scoring="logit_sum")
    assert first.start >= 0
    assert (second.text, second.start, second.score, second.null_score) == ("", -1, -math.inf, math.inf)
    assert (second.probability, second.no_answer_probability) == (0.0, 1.0)
    assert apply_no_answer_threshold([first, second], 1e9) == [first.text, ""]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_random_logits(chunked, seed):
    words, context, recs, feats = chunked
    rng = np.random.default_rng(seed)
    s_log = [rng.normal(size=len(ids)).astype(np.float32) for ids in feats.input_ids]
    e_log = [rng.normal(size=len(ids)).astype(np.float32) for ids in feats.input_ids]
    max_len = int(rng.integers(1, 6))
    got = best_spans(recs, feats, s_log, e_log, max_answer_length=max_len, n_best=10_000, scoring="logit_sum")
    want = brute_force(recs, feats, s_log, e_log, max_len)
    for g, (score, text, start, end) in zip(got, want, strict=True):
        assert g.score == pytest.approx(score, abs=1e-5)
        assert (g.text, g.start, g.end) == (text, start, end)
        assert context[g.start : g.end] == g.text
        assert len(g.text.split()) <= max_len  # one token per word here


# --------------------------------------------------------------------------- no-answer threshold


def test_apply_no_answer_threshold():
    answers = [
        Answer("Paris", 0, 5, score=5.0, null_score=7.0),  # null beats span by 2
        Answer("Rome", 0, 4, score=5.0, null_score=4.0),  # span beats null
        Answer("", -1, -1, score=-math.inf, null_score=-3.0),  # no valid span at all
    ]
    assert apply_no_answer_threshold(answers, 1.0) == ["", "Rome", ""]
    assert apply_no_answer_threshold(answers, 2.0) == ["Paris", "Rome", ""]  # strictly greater only
    assert apply_no_answer_threshold(answers, 3.0) == ["Paris", "Rome", ""]
    assert apply_no_answer_threshold(answers, -2.0) == ["", "", ""]
    assert apply_no_answer_threshold([], 0.0) == []


def test_threshold_end_to_end(tiny):
    rec, feats = tiny
    s_log, e_log = flat_logits(feats)
    k = tok_of(rec, feats, 0, "420")
    s_log[0][k], e_log[0][k] = 2.0, 2.0  # span 4.0
    s_log[0][0], e_log[0][0] = 3.0, 3.0  # null 6.0
    (ans,) = best_spans([rec], feats, s_log, e_log, scoring="logit_sum")
    assert (ans.score, ans.null_score) == (pytest.approx(4.0), pytest.approx(6.0))
    assert apply_no_answer_threshold([ans], 1.5) == [""]
    assert apply_no_answer_threshold([ans], 2.5) == ["420"]


def test_v1_answers_keep_the_best_span_however_strong_the_null_score() -> None:
    from spanflow.answering.spans import answer_texts

    answers = [Answer("Paris", 0, 5, 1.0, 9.0), Answer("", -1, -1, float("-inf"), 3.0)]
    assert answer_texts(answers, "1.1", 0.0) == ["Paris", ""]
    assert answer_texts(answers, "2.0", 0.0) == ["", ""]
    assert answer_texts(answers, "2.0", 10.0) == ["Paris", ""]


# --------------------------------------------------------------------------- span scoring rules


def pipeline_reference(records, feats, starts, ends, max_answer_length):
    """The transformers <= 5.2 question-answering pipeline's rule, in probability space as it computes it
    (`select_starts_ends`, `decode_spans`, `postprocess`): per chunk a softmax over context tokens and [CLS] (the
    rest at -10000), [CLS] then zeroed, the 12 largest p(start) * p(end) of the whole start x end matrix, spans
    outside the context dropped, the probabilities of equal texts (any case) added up over spans and chunks, the
    first of the largest kept. Returns (log of its probability, text) per record."""
    out = []
    for ex, rec in enumerate(records):
        found: list[list] = []  # [text, probability], in the order the pipeline appends them
        for f, fex in enumerate(feats.example_index):
            if fex != ex:
                continue
            offs = feats.offsets[f]
            keep = np.array([k == 0 or o is not None for k, o in enumerate(offs)])
            probs = []
            for logits in (starts[f], ends[f]):
                x = np.where(keep, logits.astype(np.float64), -10000.0)
                p = np.exp(x - x.max())
                p /= p.sum()
                p[0] = 0.0
                probs.append(p)
            flat = np.tril(np.triu(np.outer(*probs)), max_answer_length - 1).ravel()
            for i in np.argsort(-flat, kind="stable")[:12]:
                s, e = divmod(int(i), len(offs))
                if offs[s] is None or offs[e] is None:
                    continue
                text = rec["context"][offs[s][0] : offs[e][1]]
                same = next((a for a in found if a[0].lower() == text.lower()), None)
                if same:
                    same[1] += flat[i]
                else:
                    found.append([text, flat[i]])
        text, prob = max(found, key=lambda a: a[1])
        out.append((math.log(prob), text))
    return out


def test_chunk_softmax_prefers_the_chunk_sure_of_its_span(chunked):
    """logit_sum compares raw logits across chunks; chunk_softmax weighs each chunk's span against its [CLS]
    (a chunk's "no answer here"): a higher span logit in a chunk whose [CLS] is higher still loses."""
    words, context, recs, feats = chunked
    chunks_a = [f for f, ex in enumerate(feats.example_index) if ex == 0]
    first, last = chunks_a[0], chunks_a[-1]
    s_log, e_log = flat_logits(feats)
    a0, b0 = chunk_word_tok(words, context, feats, first, 3), chunk_word_tok(words, context, feats, first, 4)
    a1 = chunk_word_tok(words, context, feats, last, 57)
    s_log[first][a0], e_log[first][b0] = 3.0, 3.0
    s_log[first][0], e_log[first][0] = 6.0, 6.0  # this chunk's [CLS]: no answer here, it says
    s_log[last][a1], e_log[last][a1] = 2.0, 2.0
    by_sum = best_spans(recs, feats, s_log, e_log, scoring="logit_sum")[0]
    by_softmax = best_spans(recs, feats, s_log, e_log, scoring="chunk_softmax")[0]
    assert by_sum.text == " ".join(words[3:5]) and by_sum.score == pytest.approx(6.0)
    assert by_softmax.text == words[57]
    (want_score, want_text), _ = pipeline_reference(recs, feats, s_log, e_log, 30)
    assert by_softmax.text == want_text and by_softmax.score == pytest.approx(want_score, abs=1e-6)
    assert by_softmax.score < 0  # a log probability


@pytest.mark.parametrize("seed", range(5))
def test_chunk_softmax_matches_the_pipelines_rule_on_random_logits(chunked, seed):
    words, context, recs, feats = chunked
    rng = np.random.default_rng(seed)
    s_log = [(3 * rng.normal(size=len(ids))).astype(np.float32) for ids in feats.input_ids]
    e_log = [(3 * rng.normal(size=len(ids))).astype(np.float32) for ids in feats.input_ids]
    max_len = int(rng.integers(1, 6))
    got = best_spans(recs, feats, s_log, e_log, max_answer_length=max_len, n_best=10_000, scoring="chunk_softmax")
    want = pipeline_reference(recs, feats, s_log, e_log, max_len)
    for g, (score, text) in zip(got, want, strict=True):
        assert g.text == text and context[g.start : g.end] == text
        assert g.score == pytest.approx(score, abs=1e-6)
    plain = best_spans(recs, feats, s_log, e_log, max_answer_length=max_len, n_best=10_000, scoring="logit_sum")
    assert [a.score for a in plain] != pytest.approx([a.score for a in got])  # a different rule


def test_chunk_softmax_null_score_is_min_cls_log_probability(tiny):
    rec, feats = tiny
    s_log, e_log = flat_logits(feats)
    s_log[0][0], e_log[0][0] = 1.0, 2.0
    (ans,) = best_spans([rec], feats, s_log, e_log, scoring="chunk_softmax")
    n_ctx = sum(o is not None for o in feats.offsets[0])

    def log_p_cls(cls: float) -> float:
        return cls - math.log(math.exp(cls) + n_ctx * math.exp(LOW))

    assert ans.null_score == pytest.approx(log_p_cls(1.0) + log_p_cls(2.0))


def test_unknown_span_scoring_is_named(tiny):
    rec, feats = tiny
    s_log, e_log = flat_logits(feats)
    with pytest.raises(ValueError, match=re.escape("'softmax' is not chunk_softmax|logit_sum")):
        best_spans([rec], feats, s_log, e_log, scoring="softmax")


def test_chunk_softmax_adds_up_a_text_found_in_two_chunks(chunked):
    """A word in the overlap of two chunks, second best in each (p = 0.2 twice), beats the best span of either
    chunk (p = 0.3): the pipeline adds the probabilities of equal answers."""
    words, context, recs, feats = chunked
    c0, c1 = [f for f, ex in enumerate(feats.example_index) if ex == 0][:2]

    def where(i: int) -> tuple[int | None, int | None]:
        return chunk_word_tok(words, context, feats, c0, i), chunk_word_tok(words, context, feats, c1, i)

    both = [i for i in range(len(words)) if None not in where(i)]
    w = both[len(both) // 2]
    x = next(i for i in range(len(words)) if where(i)[0] is not None and where(i)[1] is None)
    y = next(i for i in range(len(words)) if where(i)[0] is None and where(i)[1] is not None)
    s_log, e_log = flat_logits(feats)
    for chunk, (own, shared) in {c0: (where(x)[0], where(w)[0]), c1: (where(y)[1], where(w)[1])}.items():
        s_log[chunk][own] = e_log[chunk][own] = 2.2
        s_log[chunk][shared] = e_log[chunk][shared] = 2.0
    by_softmax = best_spans(recs, feats, s_log, e_log, scoring="chunk_softmax")[0]
    assert by_softmax.text == words[w]
    (want_score, want_text), _ = pipeline_reference(recs, feats, s_log, e_log, 30)
    assert (by_softmax.text, by_softmax.score) == (want_text, pytest.approx(want_score, abs=1e-6))
    assert math.exp(by_softmax.score) == pytest.approx(2 * 0.45**2, abs=0.02)
    assert best_spans(recs, feats, s_log, e_log, scoring="logit_sum")[0].text in (
        words[x],
        words[y],
    )  # logit_sum: one chunk's best


# --------------------------------------------------------------------------- the answer's probability


def chunk_probability(feats: Features, chunk: int, logits: np.ndarray, k: int) -> float:
    """p(token k) in one chunk: a softmax over its context tokens and [CLS]."""
    keep = [i for i, o in enumerate(feats.offsets[chunk]) if i == 0 or o is not None]
    x = logits[keep].astype(np.float64)
    return float(np.exp(logits[k] - x.max()) / np.exp(x - x.max()).sum())


@pytest.mark.parametrize("scoring", ["chunk_softmax", "logit_sum"])
def test_probability_is_the_surest_chunks_and_never_above_one(chunked, scoring):
    """A word in the overlap of two chunks, nearly sure in both (p = 0.88 and 0.95): chunk_softmax ranks by the sum
    over chunks, 1.84, whose log (+0.61) the served score used to be; the probability is the surer chunk's, 0.95.
    Which answer is chosen does not change."""
    words, context, recs, feats = chunked
    c0, c1, w, k0, k1 = word_in_overlap(words, context, feats)
    s_log, e_log = flat_logits(feats, 0.0)
    s_log[c0][k0] = e_log[c0][k0] = 6.0
    s_log[c1][k1] = e_log[c1][k1] = 7.0
    p0 = chunk_probability(feats, c0, s_log[c0], k0) * chunk_probability(feats, c0, e_log[c0], k0)
    p1 = chunk_probability(feats, c1, s_log[c1], k1) * chunk_probability(feats, c1, e_log[c1], k1)
    assert 0.8 < p0 < p1 < 1 and p0 + p1 > 1

    ans = best_spans(recs, feats, s_log, e_log, scoring=scoring)[0]
    assert ans.text == words[w]
    assert ans.probability == pytest.approx(p1, abs=1e-6)  # the surer chunk's
    if scoring == "chunk_softmax":
        assert ans.score == pytest.approx(math.log(p0 + p1), abs=1e-6) and ans.score > 0  # the ranking sum, as before
        (want_score, want_text), _ = pipeline_reference(recs, feats, s_log, e_log, 30)
        assert (ans.text, ans.score) == (want_text, pytest.approx(want_score, abs=1e-6))
    else:
        assert ans.score == pytest.approx(14.0)


@pytest.mark.parametrize("seed", range(3))
def test_probabilities_stay_in_zero_one_on_random_logits(chunked, seed):
    words, context, recs, feats = chunked
    rng = np.random.default_rng(seed)
    s_log = [(4 * rng.normal(size=len(ids))).astype(np.float32) for ids in feats.input_ids]
    e_log = [(4 * rng.normal(size=len(ids))).astype(np.float32) for ids in feats.input_ids]
    for scoring in ("chunk_softmax", "logit_sum"):
        for a in best_spans(recs, feats, s_log, e_log, scoring=scoring):
            assert 0 < a.probability <= 1 and 0 < a.no_answer_probability <= 1
            if scoring == "chunk_softmax":
                assert a.probability <= math.exp(a.score) + 1e-12  # one chunk's share of the ranking sum


def test_no_answer_probability_is_the_lowest_cls_probability_whatever_the_rule(chunked):
    words, context, recs, feats = chunked
    s_log, e_log = flat_logits(feats, 0.0)
    chunks_a = [f for f, ex in enumerate(feats.example_index) if ex == 0]
    for i, f in enumerate(chunks_a):
        s_log[f][0], e_log[f][0] = 3.0 + i, 4.0 - i
    want = min(chunk_probability(feats, f, s_log[f], 0) * chunk_probability(feats, f, e_log[f], 0) for f in chunks_a)
    by_softmax, by_sum = (best_spans(recs, feats, s_log, e_log, scoring=r)[0] for r in ("chunk_softmax", "logit_sum"))
    assert by_softmax.no_answer_probability == pytest.approx(want, abs=1e-9)
    assert by_softmax.no_answer_probability == pytest.approx(math.exp(by_softmax.null_score), abs=1e-9)
    assert by_sum.no_answer_probability == pytest.approx(want, abs=1e-9)


# --------------------------------------------------------------------------- whole words


def test_widen_to_words_cuts_no_word():
    ctx = "Brenna Holm built the Kristiansund lighthouse, 1780."
    piece = ctx.index("enna")
    assert widen_to_words(ctx, piece, ctx.index(" Holm") + 5) == (0, ctx.index(" built"))
    tian = ctx.index("tian")
    assert widen_to_words(ctx, tian, tian + 4) == (ctx.index("Kris"), ctx.index(" lighthouse"))
    whole = ctx.index("lighthouse")
    assert widen_to_words(ctx, whole, whole + 10) == (whole, whole + 10)  # ends at the comma: a word's end
    assert widen_to_words("北京大学", 1, 2) == (1, 2)  # CJK ideographs are words of one character


def test_a_span_on_a_word_piece_answers_the_whole_word(tok):
    ctx = "The lighthouse was built by Brenna Holm in 1780 on the cliffs."
    rec = make_record(ctx, "Brenna Holm", question="Who built the lighthouse?")
    feats = featurize([rec], tok, 64, 16)
    piece = next(k for k, o in enumerate(feats.offsets[0]) if o is not None and o[0] == ctx.index("enna"))
    holm = tok_of(rec, feats, 0, "Holm")
    s_log, e_log = flat_logits(feats)
    s_log[0][piece], e_log[0][holm] = 8.0, 8.0  # the model starts on "##enna"
    for scoring in ("chunk_softmax", "logit_sum"):
        (cut,) = best_spans([rec], feats, s_log, e_log, scoring=scoring, whole_words=False)
        (ans,) = best_spans([rec], feats, s_log, e_log, scoring=scoring)
        assert cut.text == "enna Holm"
        assert ans.text == "Brenna Holm" and ctx[ans.start : ans.end] == ans.text
