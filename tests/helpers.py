"""Small shared test helpers: a tiny local QA model, tiny SQuAD-style records, a tiny config.

Used by the unit tests and by the pipeline integration test; keep the signatures stable:
``make_tiny_model_dir(path)``, ``tiny_records(n)``, ``tiny_config(model_dir, overrides=None)``. Other backbones, built
alike and loaded through `model.name_or_path`: ``make_tiny_albert_dir(path)`` and ``make_tiny_llama_dir(path)`` (a
decoder with a byte-level BPE tokenizer trained here, shaped as a LLaMA tokenizer is).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import BertConfig, BertForQuestionAnswering

from spanflow.config import Config, ModelConfig, load_config

_TITLES = ("Rivers", "Mountains", "Inventors", "Harbours")
_NAMES = ("Alder", "Brenna", "Corvin", "Dalmar", "Elsin", "Farrow", "Gildea", "Holm", "Ivers", "Juno", "Kestrel")
_PLACES = ("Norland", "Vester", "Ostmark", "Sudvale", "Midgard", "Calder", "Westholm")


def make_tiny_model_dir(path: Path) -> Path:
    """A randomly initialised 2-layer BERT QA model (hidden size 32) plus the packaged tokenizer, saved in `path`.

    `ModelConfig(name_or_path=str(path))` loads it through the ordinary local-path code path.
    """
    from spanflow.models.modeling import load_tokenizer  # heavy imports only when a model is wanted

    path = Path(path)
    tokenizer = load_tokenizer(ModelConfig())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertForQuestionAnswering(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_albert_dir(path: Path) -> Path:
    """A randomly initialised ALBERT QA model (one group of weights shared by 2 layers, factorised 16-wide embeddings,
    hidden size 32) with the packaged BERT WordPiece tokenizer (ALBERT's own is a SentencePiece model: the tokenizer
    does not change what the architecture does), saved in `path`."""
    from transformers import AlbertConfig, AlbertForQuestionAnswering

    from spanflow.models.modeling import load_tokenizer

    path = Path(path)
    tokenizer = load_tokenizer(ModelConfig())
    config = AlbertConfig(
        vocab_size=len(tokenizer),
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AlbertForQuestionAnswering(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_llama_style_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on `tiny_records`' text, shaped as a LLaMA tokenizer is: a BOS token before
    each sequence, an EOS token, no pad token, padding on the left, no token_type_ids, offsets that keep a word's
    leading space (no trimming)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = [t for r in tiny_records(200) for t in (r["question"], r["context"])]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(text, trainer)
    bos = bpe.token_to_id("<s>")
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def make_tiny_llama_dir(path: Path) -> Path:
    """A randomly initialised 2-layer LLaMA QA model (hidden size 32, grouped-query attention: 4 heads over 2 key/value
    heads) with `make_llama_style_tokenizer`, saved in `path`."""
    from transformers import LlamaConfig, LlamaForQuestionAnswering

    path = Path(path)
    tokenizer = make_llama_style_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForQuestionAnswering(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fact(i: int) -> tuple[str, str, str, str]:
    """(title, context, question, answer) for the i-th record; the answer is literally in the context."""
    title = _TITLES[i % len(_TITLES)]
    name = _NAMES[i % len(_NAMES)]
    place = _PLACES[(i // len(_NAMES) + i) % len(_PLACES)]
    year = str(1700 + (i * 37) % 300)
    number = str(100 + (i * 53) % 900)
    filler = " It is often described in old travel guides, and visitors still come every summer." * (i % 3)
    if title == "Rivers":
        context = f"The {name} river flows through {place}. It is {number} kilometres long and was mapped in {year}."
        qa = [
            (f"Through which land does the {name} river flow?", place),
            (f"How long is the {name} river?", f"{number} kilometres"),
            (f"When was the {name} river mapped?", year),
        ]
    elif title == "Mountains":
        context = f"Mount {name} rises {number} metres above {place}. Its summit was first reached in {year}."
        qa = [
            (f"How high is Mount {name}?", f"{number} metres"),
            (f"When was Mount {name} first climbed?", year),
            (f"Above which land does Mount {name} rise?", place),
        ]
    elif title == "Inventors":
        context = f"{name} was an inventor from {place}. In {year} {name} built a clock with {number} gears."
        qa = [
            (f"Where was {name} from?", place),
            (f"In which year did {name} build a clock?", year),
            (f"How many gears did the clock of {name} have?", number),
        ]
    else:
        context = f"The harbour of {place} was founded by {name} in {year}. It can hold {number} ships."
        qa = [
            (f"Who founded the harbour of {place}?", name),
            (f"When was the harbour of {place} founded?", year),
            (f"How many ships can the harbour of {place} hold?", f"{number} ships"),
        ]
    question, answer = qa[(i // len(_TITLES)) % len(qa)]
    return title, context + filler, question, answer


def tiny_records(n: int) -> list[dict]:
    """`n` small, valid, answerable SQuAD v1.1-style flat records over a few titles."""
    records = []
    for i in range(n):
        title, context, question, answer = _fact(i)
        start = re.search(rf"\b{re.escape(answer)}\b", context).start()  # whole words: "789" is not in "1789"
        records.append(
            {
                "id": f"tiny-{i:04d}",
                "title": title,
                "context": context,
                "question": question,
                "answers": {"text": [answer], "answer_start": [start]},
                "is_impossible": False,
            }
        )
    return records


def tiny_config(model_dir: Path | str, overrides: list[str] | None = None) -> Config:
    """Defaults + the tiny model + small chunks and a short, fast training run; `overrides` win."""
    base = [
        f"model.name_or_path={json.dumps(str(model_dir))}",  # JSON-quoted: any path stays a YAML string
        "features.chunk_length=64",
        "features.overlap=16",
        "features.max_query_length=16",
        "train.batch_size=4",
        "train.epochs=2",
        "train.learning_rate=1e-3",
        "eval.batch_size=16",
    ]
    return load_config(None, base + list(overrides or []))
