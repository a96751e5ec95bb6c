"""Context splitting: question + context -> overlapping chunks of at most `chunk_length` tokens (less the
virtual tokens of a soft prompt, which fill the rest of the model's `chunk_length` positions).

Consecutive chunks share `overlap` context tokens. Every chunk keeps, per token, the character
span it covers in the context (None for question and special tokens), so that predicted token
spans map back to answer text. Training labels point at the answer tokens, or at index 0 when the
chunk does not hold the whole answer (or the question has none).

Every backbone gets one layout: the question first, then the context. A decoder reads left to right,
so the context's tokens see the question only this way round. Index 0, the no-answer position, is
[CLS] for an encoder (BERT, ALBERT) and the BOS token for a decoder whose tokenizer adds one (LLaMA);
otherwise it is the question's first token. It is never an answer: only context tokens have
character offsets, and span decoding keeps to them. Chunks are not padded here (`pad_batch` pads on
the right), so the tokenizer's padding side does not matter.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

Record = dict[str, Any]
Offset = tuple[int, int] | None

# A fast tokenizer keeps its truncation settings in state that each call sets and then encodes with: two threads
# tokenizing at once (a serving process answers requests in threads, all with one tokenizer) could encode with the
# other's settings, e.g. a 4,000-token context as one unsplit chunk. Every tokenizer call here holds this lock.
_TOKENIZER_LOCK = threading.Lock()


@dataclass
class Features:
    """Unpadded chunks, one entry per chunk; `example_index` points back at the record."""

    input_ids: list[list[int]] = field(default_factory=list)
    token_type_ids: list[list[int]] = field(default_factory=list)
    offsets: list[list[Offset]] = field(default_factory=list)
    example_index: list[int] = field(default_factory=list)
    start_positions: list[int] = field(default_factory=list)
    end_positions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Features:
        d = dict(d)
        d["offsets"] = [[tuple(o) if o is not None else None for o in offs] for offs in d["offsets"]]
        return cls(**d)


def _truncate_question(question: str, tokenizer: PreTrainedTokenizerFast, max_tokens: int) -> str:
    question = question.lstrip()  # leading blanks would only waste tokens
    with _TOKENIZER_LOCK:
        enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return question
    return question[: enc["offset_mapping"][max_tokens - 1][1]]


def featurize(
    records: list[Record],
    tokenizer: PreTrainedTokenizerFast,
    chunk_length: int,
    overlap: int,
    max_query_length: int = 64,
    batch_size: int = 256,
    virtual_tokens: int = 0,
) -> Features:
    """Tokenize and split every record into chunks with labels and character offsets. A chunk's `chunk_length`
    positions include the `virtual_tokens` a soft prompt puts before it (`MethodConfig.virtual_tokens` when
    training, the saved model's when answering): the tokenizer gets the rest."""
    if not tokenizer.is_fast:
        raise ValueError("context splitting needs a fast tokenizer (offset mappings)")
    max_length = chunk_length - virtual_tokens
    if virtual_tokens and overlap >= max_length - max_query_length - 3:  # [CLS] question [SEP] context [SEP]
        raise ValueError(
            f"features.chunk_length: {chunk_length} leaves no room for context after {virtual_tokens} virtual "
            f"tokens, a question of up to {max_query_length} tokens and an overlap of {overlap}"
        )
    feats = Features()
    for lo in range(0, len(records), batch_size):
        batch = records[lo : lo + batch_size]
        questions = [_truncate_question(r["question"], tokenizer, max_query_length) for r in batch]
        with _TOKENIZER_LOCK:
            enc = tokenizer(
                questions,
                [r["context"] for r in batch],
                truncation="only_second",
                max_length=max_length,
                stride=overlap,
                return_overflowing_tokens=True,
                return_offsets_mapping=True,
                padding=False,
            )
        for i, ids in enumerate(enc["input_ids"]):
            local = enc["overflow_to_sample_mapping"][i]
            record = batch[local]
            seq_ids = enc.sequence_ids(i)
            offsets: list[Offset] = [
                tuple(o) if seq_ids[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])
            ]
            start, end = _label(record, offsets)
            feats.input_ids.append(list(ids))
            feats.token_type_ids.append(list(enc["token_type_ids"][i]) if "token_type_ids" in enc else [0] * len(ids))
            feats.offsets.append(offsets)
            feats.example_index.append(lo + local)
            feats.start_positions.append(start)
            feats.end_positions.append(end)
    return feats


def first_chunks(feats: Features) -> Features:
    """Each record's first chunk only: its context truncated after one chunk, as a model that never splits sees it
    (`features.train_contexts: truncate`). Its label is the answer's tokens when they are inside, else index 0."""
    keep = [k for k, idx in enumerate(feats.example_index) if k == 0 or feats.example_index[k - 1] != idx]
    return Features(**{name: [values[k] for k in keep] for name, values in feats.to_dict().items()})


def _label(record: Record, offsets: list[Offset]) -> tuple[int, int]:
    """Token indices of the first gold answer inside this chunk, or (0, 0): the no-answer position."""
    answers = record["answers"]
    if not answers["text"]:
        return 0, 0
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    ctx = [k for k, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return 0, 0
    start_tok = next(k for k in ctx if offsets[k][1] > start_char)
    end_tok = next(k for k in reversed(ctx) if offsets[k][0] < end_char)
    return start_tok, end_tok


def chunk_counts(feats: Features, n_records: int) -> list[int]:
    """How many chunks each record was split into."""
    counts = [0] * n_records
    for idx in feats.example_index:
        counts[idx] += 1
    return counts


def save_features(feats: Features, path: Path, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"meta": meta, "features": feats.to_dict()}, tmp)
    os.replace(tmp, path)


def load_features(path: Path, expect: dict[str, Any]) -> Features:
    """Load chunks written by the featurize stage, refusing ones made with other params."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no features; run the featurize stage first")
    blob = torch.load(path, weights_only=True)
    stale = {k: (blob["meta"].get(k), v) for k, v in expect.items() if blob["meta"].get(k) != v}
    if stale:
        raise ValueError(f"{path}: made with other params {stale} (have, want); rerun the featurize stage")
    return Features.from_dict(blob["features"])
