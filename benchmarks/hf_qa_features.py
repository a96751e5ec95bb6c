"""Training features the way the Hugging Face question-answering example prepares them.

A port of `prepare_train_features` from transformers' `examples/pytorch/question-answering/run_qa.py`
(with `--pad_to_max_length`, its default): question + context tokenized with `truncation="only_second"`,
overflowing chunks of `max_seq_length` tokens sharing `doc_stride` tokens, every chunk padded to
`max_seq_length`, start/end positions on the answer tokens or on the [CLS] index when the chunk does not hold
the whole answer. Unlike spanflow's `featurize`, run_qa.py does not cut long questions (it has no
`max_query_length`); it only strips their leading blanks.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast

Record = dict[str, Any]


def prepare_train_features(
    examples: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerFast,
    max_seq_length: int,
    doc_stride: int,
    pad_to_max_length: bool = True,
) -> dict[str, list[Any]]:
    """run_qa.py's batched `prepare_train_features` (column names of the `squad` schema)."""
    pad_on_right = tokenizer.padding_side == "right"
    examples["question"] = [q.lstrip() for q in examples["question"]]
    tokenized = tokenizer(
        examples["question" if pad_on_right else "context"],
        examples["context" if pad_on_right else "question"],
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"] = []
    tokenized["end_positions"] = []
    context_id = 1 if pad_on_right else 0
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        if tokenizer.cls_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.cls_token_id)
        elif tokenizer.bos_token_id in input_ids:
            cls_index = input_ids.index(tokenizer.bos_token_id)
        else:
            cls_index = 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != context_id:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != context_id:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            tokenized["start_positions"].append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            tokenized["end_positions"].append(token_end_index + 1)
    return tokenized


def build_train_dataset(
    records: list[Record],
    tokenizer: PreTrainedTokenizerFast,
    max_seq_length: int,
    doc_stride: int,
    pad_to_max_length: bool = True,
):
    """records -> a `datasets.Dataset` of training features, through `Dataset.map(batched=True)` as run_qa.py does
    (`max_seq_length` capped at the tokenizer's `model_max_length`, the raw columns removed)."""
    import datasets

    datasets.disable_progress_bars()
    columns = ["id", "title", "context", "question", "answers"]
    raw = datasets.Dataset.from_list([{k: r[k] for k in columns} for r in records])
    max_len = min(max_seq_length, tokenizer.model_max_length)
    return raw.map(
        prepare_train_features,
        batched=True,
        remove_columns=raw.column_names,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_seq_length": max_len,
            "doc_stride": doc_stride,
            "pad_to_max_length": pad_to_max_length,
        },
    )
