"""The `question-answering` pipeline of transformers 5.2.0 over SQuAD records, timed.

Runs inside benchmarks/.venv-tf52 (made by `benchmarks.infer_compare.ensure_tf52_venv`), started by
benchmarks/infer_compare.py; imports only the standard library, torch, transformers and the project's
standard-library-only `spanflow/training/memory.py`.

    benchmarks/.venv-tf52/bin/python benchmarks/pipeline_side.py --model-dir models/final/hf \\
        --records dev.jsonl --max-seq-len 256 --doc-stride 64 --max-answer-len 30 --out pipeline.json

The pipeline is built once (not timed), warmed up on the first few records (not timed), then run over
all records in one call. Mapping to spanflow's settings: max_seq_len = features.chunk_length,
doc_stride = features.overlap (tokens shared by consecutive chunks), max_question_len =
features.max_query_length (only read by slow tokenizers), max_answer_len = eval.max_answer_length.
Writes {"predictions": {id: answer}, "seconds", "questions", "transformers", "torch", "threads", ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

# for spanflow.training.memory, outside the project's venv
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spanflow.training.memory import peak_rss_mb  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WARMUP_RECORDS = 3


def read_records(path: Path) -> list[dict[str, Any]]:
    """JSON lines with at least id, question and context."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def answer_all(qa: Any, records: list[dict[str, Any]], call_kwargs: dict[str, Any]) -> list[str]:
    """One pipeline call over all records (its own DataLoader loop); the answer text per record."""
    # QuestionAnsweringPipeline.__call__ takes keywords only: parallel lists of questions and contexts
    out = qa(question=[r["question"] for r in records], context=[r["context"] for r in records], **call_kwargs)
    if isinstance(out, dict):  # a single question comes back unwrapped
        out = [out]
    # top_k=1 gives one dict per question (a list only if top_k > 1)
    return [(o[0] if isinstance(o, list) else o)["answer"] for o in out]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="Hugging Face QA model with its tokenizer")
    parser.add_argument("--records", required=True, type=Path, help="JSONL: id, question, context per line")
    parser.add_argument("--max-seq-len", type=int, required=True)
    parser.add_argument("--doc-stride", type=int, required=True, help="overlapping tokens between chunks")
    parser.add_argument("--max-answer-len", type=int, required=True)
    parser.add_argument("--max-question-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1, help="pipeline batch_size (1 = its default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model weights dtype")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    records = read_records(args.records)
    qa = transformers.pipeline(
        "question-answering",
        model=str(args.model_dir),
        tokenizer=str(args.model_dir),
        device="cpu",
        dtype=DTYPES[args.dtype],
    )
    call_kwargs = {
        "top_k": 1,
        "doc_stride": args.doc_stride,
        "max_answer_len": args.max_answer_len,
        "max_seq_len": args.max_seq_len,
        "max_question_len": args.max_question_len,
        "handle_impossible_answer": False,
        "batch_size": args.batch_size,
    }
    answer_all(qa, records[:WARMUP_RECORDS], call_kwargs)

    t0 = time.perf_counter()
    answers = answer_all(qa, records, call_kwargs)
    seconds = time.perf_counter() - t0

    result = {
        "predictions": {r["id"]: a for r, a in zip(records, answers, strict=True)},
        "seconds": seconds,
        "questions": len(records),
        "questions_per_second": len(records) / seconds,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "tokenizer_is_fast": bool(qa.tokenizer.is_fast),
        "call_kwargs": call_kwargs,
        "peak_rss_mb": peak_rss_mb(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
