"""Context splitting (spanflow/data/features.py) with the real packaged fast tokenizer; no mocks.

Synthetic contexts are built from filler words whose tokenization is known (one token per word, or a
fixed number of WordPiece pieces), so chunk boundaries can be located from the features' own offsets
and answers placed exactly on, across or inside them. The real SQuAD training sample checks that every
gold answer survives featurization, including the non-ASCII articles.
"""

from __future__ import annotations

import json
import threading
import time
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from spanflow.config import ModelConfig
from spanflow.data.features import Features, chunk_counts, featurize, first_chunks, load_features, save_features
from spanflow.data.splits import sample_questions, without_questions
from spanflow.data.squad import load_squad_json
from spanflow.models.modeling import load_tokenizer

TRAIN = Path(__file__).resolve().parents[1] / "data" / "squad" / "train-v1.1-head.json"
QUESTION = "Which numbers are listed?"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def squad_records():
    records, version = load_squad_json(TRAIN)
    assert version == "1.1"
    return records


@pytest.fixture(scope="module")
def squad_features(tok, squad_records):
    """featurize() of the whole training sample, cached per (chunk_length, overlap)."""
    cache: dict[tuple[int, int], tuple[Features, float]] = {}

    def get(chunk_length: int, overlap: int) -> Features:
        if (chunk_length, overlap) not in cache:
            t0 = time.perf_counter()
            feats = featurize(squad_records, tok, chunk_length, overlap)
            cache[chunk_length, overlap] = feats, time.perf_counter() - t0
        return cache[chunk_length, overlap][0]

    return get


def record(context: str, answer: str | None = None, start: int | None = None, question: str = QUESTION) -> dict:
    if answer is not None and start is None:
        start = context.index(answer)
    return {
        "id": "q0",
        "title": "T",
        "context": context,
        "question": question,
        "answers": {"text": [answer] if answer is not None else [], "answer_start": [start] if answer else []},
        "is_impossible": answer is None,
    }


def single_token_words(tok, n: int) -> list[str]:
    """`n` distinct numbers that the tokenizer keeps as one token each."""
    vocab = tok.get_vocab()
    words = [str(k) for k in range(100, 10000) if str(k) in vocab][:n]
    assert len(words) == n
    assert len(tok.tokenize(" ".join(words))) == n  # one token per word, so token index == word index
    return words


def word_spans(words: list[str]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    return spans


def ctx_indices(offsets) -> list[int]:
    return [k for k, o in enumerate(offsets) if o is not None]


def label_text(context: str, feats: Features, c: int) -> str | None:
    s, e = feats.start_positions[c], feats.end_positions[c]
    if (s, e) == (0, 0):
        return None
    assert feats.offsets[c][s] is not None and feats.offsets[c][e] is not None and s <= e
    return context[feats.offsets[c][s][0] : feats.offsets[c][e][1]]


def chunk_holds(offsets, start_char: int, end_char: int) -> bool:
    """Independent oracle: the chunk's context tokens cover [start_char, end_char)."""
    ctx = ctx_indices(offsets)
    return offsets[ctx[0]][0] <= start_char and offsets[ctx[-1]][1] >= end_char


# --------------------------------------------------------------------------- chunk boundaries

N_WORDS, CHUNK, OVERLAP = 60, 32, 8


@pytest.fixture(scope="module")
def numbered(tok):
    """Filler context + its chunk layout as inclusive word ranges [(first_word, last_word), ...]."""
    words = single_token_words(tok, N_WORDS)
    context = " ".join(words)
    spans = word_spans(words)
    by_start = {s: i for i, (s, _) in enumerate(spans)}
    by_end = {e: i for i, (_, e) in enumerate(spans)}
    feats = featurize([record(context)], tok, CHUNK, OVERLAP)
    layout = []
    for offs in feats.offsets:
        ctx = ctx_indices(offs)
        layout.append((by_start[offs[ctx[0]][0]], by_end[offs[ctx[-1]][1]]))
    assert len(layout) >= 3
    assert layout[0][0] == 0 and layout[-1][1] == N_WORDS - 1
    for (_, b1), (a2, _) in zip(layout, layout[1:], strict=False):
        assert b1 - a2 + 1 == OVERLAP  # consecutive chunks share `overlap` words (= tokens here)
    return words, context, spans, layout


def check_answer(tok, numbered, first_word: int, last_word: int, expected_chunks: set[int]) -> None:
    words, context, spans, layout = numbered
    answer = " ".join(words[first_word : last_word + 1])
    start = spans[first_word][0]
    assert context[start : start + len(answer)] == answer
    feats = featurize([record(context, answer, start)], tok, CHUNK, OVERLAP)
    assert len(feats) == len(layout)
    expected_chunks = {c % len(layout) for c in expected_chunks}  # -1 == last chunk
    for c, offs in enumerate(feats.offsets):
        assert chunk_holds(offs, start, start + len(answer)) == (c in expected_chunks)  # the oracle agrees
        if c in expected_chunks:
            assert label_text(context, feats, c) == answer, f"chunk {c}"
            # exact token positions: word w sits at context token (w - first word of chunk)
            first_ctx = ctx_indices(offs)[0]
            assert feats.start_positions[c] == first_ctx + first_word - layout[c][0]
            assert feats.end_positions[c] == first_ctx + last_word - layout[c][0]
        else:
            assert (feats.start_positions[c], feats.end_positions[c]) == (0, 0), f"chunk {c}"


@pytest.mark.parametrize(
    "case",
    [
        "starts at first context token of chunk 2",
        "ends at last context token of chunk 1",
        "first context token of chunk 1",
        "last context token of last chunk",
        "one token past both boundaries",
    ],
)
def test_answer_at_chunk_boundary(tok, numbered, case):
    layout = numbered[3]
    (a1, b1), (a2, _), (_, b_last) = layout[0], layout[1], layout[-1]
    first, last, expected = {
        # overlap + 1 tokens: begins exactly where chunk 2 begins, one token too long for chunk 1
        "starts at first context token of chunk 2": (a2, b1 + 1, {1}),
        # ends exactly where chunk 1 ends, one token too early for chunk 2
        "ends at last context token of chunk 1": (a2 - 1, b1, {0}),
        "first context token of chunk 1": (a1, a1 + 1, {0}),
        "last context token of last chunk": (b_last - 1, b_last, {-1}),
        # misses chunk 1's end and chunk 2's start by one token each: no chunk holds it whole
        "one token past both boundaries": (a2 - 1, b1 + 1, set()),
    }[case]
    check_answer(tok, numbered, first, last, expected)


@pytest.mark.parametrize("case", ["strictly inside", "exactly the overlap", "single token at overlap start"])
def test_answer_in_overlap_region_labelled_in_both_chunks(tok, numbered, case):
    layout = numbered[3]
    (_, b1), (a2, _) = layout[0], layout[1]
    first, last = {
        "strictly inside": (a2 + 2, a2 + 4),
        "exactly the overlap": (a2, b1),  # first token of chunk 2 .. last token of chunk 1
        "single token at overlap start": (a2, a2),
    }[case]
    check_answer(tok, numbered, first, last, {0, 1})


def test_threads_sharing_a_tokenizer_get_the_features_one_thread_gets(tok):
    """A serving process featurizes requests in several threads with one tokenizer, whose truncation settings are
    shared state: without the lock, a thread could encode a long context unsplit (a 3,918-token chunk here)."""
    filler = " ".join(f"Ledger entry {i} notes a shipment of grain to the northern harbour." for i in range(150))
    recs = [record(filler + " The lighthouse was built by Brenna Holm. " + filler, "Brenna Holm")]
    expected = {length: featurize(recs, tok, length, 64).input_ids for length in (256, 192)}
    wrong: list[int] = []

    def featurize_often(length: int) -> None:
        for _ in range(20):
            got = featurize(recs, tok, length, 64).input_ids
            if got != expected[length]:
                wrong.append(max(len(ids) for ids in got))

    threads = [threading.Thread(target=featurize_often, args=(length,)) for length in (256, 192, 256, 192)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(ids) <= 256 for ids in expected[256]) and len(expected[256]) > 10
    assert wrong == [], f"{len(wrong)} of 80 featurizations differed (longest chunk {max(wrong)} tokens)"


def test_multi_piece_words_split_across_chunks(tok):
    """Words of several WordPiece pieces, chunk edges falling mid-word: each word as the answer."""
    words = [f"w{i}" for i in range(40)]  # "w", "##<i>": two tokens per word
    context = " ".join(words)
    spans = word_spans(words)
    recs = [record(context, w, s) for w, (s, _) in zip(words, spans, strict=True)]
    # 16 context tokens per chunk (24 - question - 3 special), stride 11: odd, so chunk edges fall mid-word
    feats = featurize(recs, tok, 24, 5, batch_size=7)
    mid_word_edges = sum(offs[ctx_indices(offs)[0]][0] not in {s for s, _ in spans} for offs in feats.offsets)
    assert mid_word_edges > 0, "the layout should put a chunk edge inside a word"
    recovered = Counter()
    for c, ex in enumerate(feats.example_index):
        s, e = spans[ex]
        holds = chunk_holds(feats.offsets[c], s, e)
        text = label_text(context, feats, c)
        assert (text is not None) == holds, (ex, c)
        if holds:
            assert text == words[ex]
            recovered[ex] += 1
    assert set(recovered) == set(range(len(words)))


# --------------------------------------------------------------------------- long contexts


def test_long_context_many_chunks(tok, squad_records):
    # several real Chopin paragraphs glued together: real punctuation, accents, > 5 chunks at 64 tokens
    chopin = list(dict.fromkeys(r["context"] for r in squad_records if r["title"] == "Frédéric_Chopin"))
    context = "\n".join(chopin[:4])
    chunk_length, overlap = 64, 16
    feats = featurize([record(context)], tok, chunk_length, overlap)
    assert len(feats) > 5
    assert feats.example_index == [0] * len(feats)
    assert all(n <= chunk_length for n in feats.lengths())
    assert all(n == chunk_length for n in feats.lengths()[:-1])  # only the last chunk may be short
    ctx_offsets = [[o for o in offs if o is not None] for offs in feats.offsets]
    question_ids = [ids[: ctx_indices(offs)[0]] for ids, offs in zip(feats.input_ids, feats.offsets, strict=True)]
    assert all(q == question_ids[0] for q in question_ids)  # the question is repeated in every chunk
    for prev, nxt in zip(ctx_offsets, ctx_offsets[1:], strict=False):
        assert prev[-overlap:] == nxt[:overlap]  # exactly `overlap` shared context tokens...
        assert prev[-overlap - 1] != nxt[0] and prev[-1] != nxt[overlap]  # ...and not one more
    # the chunks, minus the overlaps, tokenize the whole context exactly once
    stitched = ctx_offsets[0] + [o for offs in ctx_offsets[1:] for o in offs[overlap:]]
    whole = tok(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert stitched == [tuple(o) for o in whole]
    covered = set()
    for s, e in stitched:
        covered.update(range(s, e))
    # every visible character is in some token; the tokenizer drops only spaces, zero-width and combining marks
    dropped = {"Zs", "Zl", "Cc", "Cf", "Mn"}
    uncovered = [i for i, ch in enumerate(context) if i not in covered and unicodedata.category(ch) not in dropped]
    assert uncovered == []
    assert stitched[0][0] == 0 and stitched[-1][1] == len(context.rstrip())


def test_answer_deep_in_long_context(tok, numbered):
    """An answer near the end of a context longer than five chunks lands in the right (late) chunk."""
    words = list(numbered[0]) * 3  # 180 words; the answer is made unique below
    words[170] = "needle"
    context = " ".join(words)
    feats = featurize([record(context, "needle")], tok, 32, 8)
    assert len(feats) > 5
    labelled = [c for c in range(len(feats)) if label_text(context, feats, c) is not None]
    assert labelled and all(label_text(context, feats, c) == "needle" for c in labelled)
    assert min(labelled) >= len(feats) - 2


# --------------------------------------------------------------------------- real SQuAD sample


def test_non_ascii_articles_labels_decode_to_gold(squad_records, squad_features):
    feats = squad_features(256, 64)
    titles = {"Beyoncé", "Frédéric_Chopin"}
    chunks_of: dict[int, list[int]] = {}
    for c, ex in enumerate(feats.example_index):
        chunks_of.setdefault(ex, []).append(c)
    questions = [i for i, r in enumerate(squad_records) if r["title"] in titles]
    assert {squad_records[i]["title"] for i in questions} == titles
    exact, mismatches, non_ascii = 0, [], 0
    for i in questions:
        r = squad_records[i]
        gold = r["answers"]["text"][0]
        texts = [t for c in chunks_of[i] if (t := label_text(r["context"], feats, c)) is not None]
        assert texts, f"{r['id']}: no chunk labels the answer"
        if any(t.strip() == gold.strip() for t in texts):
            exact += 1
            non_ascii += not gold.isascii()
        else:
            mismatches.append((r["id"], gold, texts[0]))
            assert any(gold.strip() in t for t in texts), (r["id"], gold, texts)  # gold ends mid-word
    for m in mismatches:
        print("mismatch (gold answer starts/ends inside a token):", m)
    assert non_ascii >= 10  # accented answers (e.g. "Frédéric", "Beyoncé") decode exactly
    assert all(gold.isascii() for _, gold, _ in mismatches)
    assert exact / len(questions) >= 0.99, mismatches


@pytest.mark.parametrize(("chunk_length", "overlap"), [(256, 64), (128, 32)])
def test_every_training_answer_recoverable(squad_records, squad_features, chunk_length, overlap):
    assert len(squad_records) == 3807
    feats = squad_features(chunk_length, overlap)
    assert max(feats.lengths()) <= chunk_length
    assert sorted(set(feats.example_index)) == list(range(len(squad_records)))
    exact, contained = set(), set()
    for c, ex in enumerate(feats.example_index):
        r = squad_records[ex]
        text = label_text(r["context"], feats, c)
        start = r["answers"]["answer_start"][0]
        gold = r["answers"]["text"][0]
        # the label is set exactly when the chunk holds the whole answer
        assert (text is not None) == chunk_holds(feats.offsets[c], start, start + len(gold)), r["id"]
        if text is None:
            continue
        if text == gold:
            exact.add(ex)
        else:
            assert gold in text, (r["id"], gold, text)  # gold begins/ends mid-token: label widens to tokens
            contained.add(ex)
    missing = set(range(len(squad_records))) - exact - contained
    assert not missing, [squad_records[i]["id"] for i in sorted(missing)][:10]
    widened = contained - exact
    print(f"{chunk_length}/{overlap}: {len(feats)} chunks, {len(widened)} answers only recoverable widened")
    assert len(widened) < 0.01 * len(squad_records)


# --------------------------------------------------------------------------- questions, labels, bookkeeping


def test_long_question_is_truncated(tok):
    long_q = "  " + " ".join(f"why does the river number {i} flow north" for i in range(20)) + "?"
    full_q = tok(long_q.strip(), add_special_tokens=False)["input_ids"]
    assert len(full_q) > 100
    context = "The river flows north because the land tilts that way. " * 20
    chunk_length, max_q = 64, 16
    feats = featurize(
        [record(context, "the land tilts", question=long_q)], tok, chunk_length, 8, max_query_length=max_q
    )
    assert len(feats) > 1
    for ids, offs in zip(feats.input_ids, feats.offsets, strict=True):
        assert len(ids) <= chunk_length
        first_ctx = ctx_indices(offs)[0]
        assert ids[0] == tok.cls_token_id and ids[first_ctx - 1] == tok.sep_token_id
        assert ids[1 : first_ctx - 1] == full_q[:max_q]  # the question's first max_query_length tokens
    assert label_text(context, feats, 0) == "the land tilts"


def test_short_question_kept_whole(tok):
    q = "Where does the river flow?"
    feats = featurize(
        [record("It flows north.", "north", question=q)], tok, 64, 8, max_query_length=len(tok.tokenize(q))
    )
    assert feats.input_ids[0][1 : 1 + len(tok.tokenize(q))] == tok(q, add_special_tokens=False)["input_ids"]
    assert label_text("It flows north.", feats, 0) == "north"


def test_unanswerable_and_uncontained_labelled_cls(tok, numbered):
    context = numbered[1]
    feats = featurize([record(context, None)], tok, CHUNK, OVERLAP)
    assert len(feats) > 1
    assert set(zip(feats.start_positions, feats.end_positions, strict=True)) == {(0, 0)}
    assert all(offs[0] is None for offs in feats.offsets)  # [CLS] has no context span


def test_example_index_across_batches(tok, numbered):
    words, context = numbered[0], numbered[1]
    recs = [record(context if i % 2 else "short context here", None) for i in range(7)]
    recs[3] = record(context, words[50])
    feats = featurize(recs, tok, CHUNK, OVERLAP, batch_size=2)
    counts = chunk_counts(feats, len(recs))
    long_n = len(featurize([record(context)], tok, CHUNK, OVERLAP))
    assert counts == [1 if i % 2 == 0 else long_n for i in range(7)]
    assert sum(counts) == len(feats)
    assert feats.example_index == sorted(feats.example_index)
    labelled = [c for c in range(len(feats)) if feats.start_positions[c] != 0]
    assert labelled and {feats.example_index[c] for c in labelled} == {3}
    assert all(label_text(context, feats, c) == words[50] for c in labelled)


def test_first_chunks_truncate_each_context_to_its_first_chunk(tok, numbered):
    """features.train_contexts: truncate keeps each question's first chunk, labelled as featurize labelled it: the
    answer's tokens when they lie inside, else the no-answer index."""
    words, context = numbered[0], numbered[1]
    recs = [record(context, words[2]), record(context, words[-1]), record("short context here", "short")]
    feats = featurize(recs, tok, CHUNK, OVERLAP, batch_size=2)
    first = first_chunks(feats)
    assert chunk_counts(feats, 3)[:2] == [len(featurize([recs[0]], tok, CHUNK, OVERLAP))] * 2 and len(feats) > 3
    assert first.example_index == [0, 1, 2]
    for k, idx in enumerate(first.example_index):
        c = feats.example_index.index(idx)
        assert first.input_ids[k] == feats.input_ids[c] and first.offsets[k] == feats.offsets[c]
    assert label_text(context, first, 0) == words[2]
    assert (first.start_positions[1], first.end_positions[1]) == (0, 0)  # its answer was cut off with the context
    assert label_text("short context here", first, 2) == "short"


def test_chunk_counts_include_records_without_chunks():
    feats = Features(example_index=[0, 0, 0, 2, 3, 3])
    assert chunk_counts(feats, 5) == [3, 0, 1, 2, 0]


def test_features_dict_round_trip(tok, numbered, tmp_path):
    words, context = numbered[0], numbered[1]
    feats = featurize([record(context, words[30]), record("It flows north.", "north")], tok, CHUNK, OVERLAP)
    d = feats.to_dict()
    assert set(d) == {"input_ids", "token_type_ids", "offsets", "example_index", "start_positions", "end_positions"}
    assert Features.from_dict(d) == feats
    # through JSON, offsets come back as lists; from_dict restores tuples and keeps None
    back = Features.from_dict(json.loads(json.dumps(d)))
    assert back == feats
    assert all(o is None or isinstance(o, tuple) for offs in back.offsets for o in offs)
    assert len(back) == len(feats) and back.lengths() == feats.lengths()
    # and through the stage's own save/load
    path = tmp_path / "f" / "features.pt"
    save_features(feats, path, {"chunk_length": CHUNK, "overlap": OVERLAP})
    assert load_features(path, {"chunk_length": CHUNK}) == feats
    with pytest.raises(ValueError, match="other params"):
        load_features(path, {"chunk_length": 128})
    with pytest.raises(FileNotFoundError):
        load_features(tmp_path / "nope.pt", {})


def test_token_type_ids_mark_context(tok, numbered):
    feats = featurize([record(numbered[1])], tok, CHUNK, OVERLAP)
    for tt, offs in zip(feats.token_type_ids, feats.offsets, strict=True):
        ctx = ctx_indices(offs)
        assert len(tt) == len(offs)
        assert all(tt[k] == 1 for k in ctx) and all(t == 0 for t in tt[: ctx[0]])


def test_without_questions_drops_every_chunk_of_the_skipped_questions() -> None:
    tok = load_tokenizer(ModelConfig())
    context = " ".join(f"Sentence {i} says the river is {i} kilometres long." for i in range(40))
    records = [
        {
            "id": f"q{i}",
            "title": "T",
            "context": context,
            "question": f"Which river is {i} kilometres long?",
            "answers": {"text": [f"{i} kilometres"], "answer_start": [context.index(f" {i} kilometres") + 1]},
            "is_impossible": False,
        }
        for i in range(6)
    ]
    feats = featurize(records, tok, 64, 16, 32)
    skip = {r["id"] for r in sample_questions(records, 2, seed=7)}
    assert sample_questions(records, 2, seed=7) == sample_questions(records, 2, seed=7)  # seeded
    kept = without_questions(feats, records, skip)
    per_question = len(feats) // len(records)  # one context for all: the same chunks for each question
    assert per_question > 1 and len(kept) == len(feats) - 2 * per_question
    assert {records[ex]["id"] for ex in kept.example_index} == {r["id"] for r in records} - skip
    k = feats.example_index.index(kept.example_index[0])  # a kept chunk keeps its tokens and labels
    assert (kept.input_ids[0], kept.start_positions[0]) == (feats.input_ids[k], feats.start_positions[k])
