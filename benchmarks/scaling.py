"""How training and inference time grow with the context: 1, 2, 4, 8 chunks per question, and chunk length.

    .venv/bin/python -m benchmarks.scaling [--questions 24] [--chunks 1 2 4 8] [--lengths 128 192 256 384]
        [--train-steps 4] [--reps 3] [--json out.json]

Contexts of exactly k chunks are built from real dev questions: the question's own paragraph (which holds
the answer) followed by paragraphs of other articles, cut at the token where the k-th chunk is full, so every
question has the same number of chunks and every chunk is full length. Inference is `answer_questions` (what
evaluation and serving run: featurize, length-sorted batches, span decoding); training is `train_model` steps
over those chunks. Reported: seconds per question and per chunk at each k, the least-squares slope (seconds per
extra chunk) and how far the largest k sits from a straight line through the smallest one (1.0 = linear).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.train_compare import bench_config, load_splits

CHUNKS = (1, 2, 4, 8)
LENGTHS = (128, 192, 256, 384)


def _context_tokens_for(k: int, chunk_length: int, overlap: int, question_tokens: int) -> int:
    """Context tokens that fill exactly k chunks: [CLS] q [SEP] context [SEP] per chunk, `overlap` shared."""
    room = chunk_length - question_tokens - 3
    return room + (k - 1) * (room - overlap)


def records_with_chunks(records: list[dict], tokenizer: Any, k: int, chunk_length: int, overlap: int, mql: int):
    """Copies of `records` whose contexts fill exactly k chunks (own paragraph first, then other articles')."""
    from spanflow.data.features import _truncate_question

    paragraphs = list(dict.fromkeys(r["context"] for r in records))
    out = []
    for n, r in enumerate(records):
        q_tokens = len(
            tokenizer(_truncate_question(r["question"], tokenizer, mql), add_special_tokens=False)["input_ids"]
        )
        need = _context_tokens_for(k, chunk_length, overlap, q_tokens)
        text, i = r["context"], n
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < need:
            i += 1
            filler = paragraphs[i % len(paragraphs)]
            if filler != r["context"]:
                text += " " + filler
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        text = text[: enc["offset_mapping"][need - 1][1]]
        out.append({**r, "id": f"{r['id']}-k{k}", "context": text})
    return out


def _timed(fn, reps: int) -> dict[str, float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def _fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line through (xs, ys), and how much y grew from the first x to the last against x itself."""
    slope, intercept = _slope(xs, ys)
    return {
        "slope": slope,
        "intercept_ms": intercept,
        "growth_largest_vs_smallest": ys[-1] / ys[0],
        "linear_growth": xs[-1] / xs[0],
    }


def measure(
    questions: int = 24,
    chunks: tuple[int, ...] = CHUNKS,
    lengths: tuple[int, ...] = LENGTHS,
    train_steps: int = 4,
    reps: int = 3,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    import torch
    from transformers import set_seed

    from spanflow.answering.inference import answer_questions, default_device, resolve_precision
    from spanflow.data.features import featurize
    from spanflow.models.modeling import apply_method, load_backbone, load_tokenizer
    from spanflow.search.worker import sample_questions
    from spanflow.training.loop import train_model

    cfg = bench_config(list(overrides or []))
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    f, e, tc = cfg.features, cfg.eval, cfg.train
    device = default_device()
    precision = resolve_precision(tc.precision, device)
    tokenizer = load_tokenizer(cfg.model)
    _, val, _ = load_splits(cfg)
    base = sample_questions(val, questions, cfg.data.seed)
    set_seed(tc.seed)
    infer_model = load_backbone(cfg.model).to(device).eval()  # the merged export has this architecture
    prepared = apply_method(load_backbone(cfg.model), cfg.method)
    prepared.model.to(device)

    def infer(recs: list[dict], chunk_length: int, overlap: int) -> None:
        answer_questions(
            infer_model, tokenizer, recs, chunk_length, overlap, f.max_query_length,
            e.max_answer_length, e.n_best, e.batch_size, precision, e.workers, e.span_scoring,
        )  # fmt: skip

    def train(feats: Any, chunk_length: int, overlap: int) -> None:
        from spanflow.data.features import Features

        run_cfg = cfg.with_values(
            {"train.max_steps": train_steps, "train.epochs": 1, "features.chunk_length": chunk_length,
             "features.overlap": overlap}
        )  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="scaling-") as ckpt:
            train_model(prepared, feats, Features(), [], run_cfg, tokenizer.pad_token_id, Path(ckpt))

    def point(chunk_length: int, overlap: int, k: int) -> dict[str, Any]:
        recs = records_with_chunks(base, tokenizer, k, chunk_length, overlap, f.max_query_length)
        feats = featurize(recs, tokenizer, chunk_length, overlap, f.max_query_length)
        per_q = [feats.example_index.count(i) for i in range(len(recs))]
        if set(per_q) != {k}:
            raise RuntimeError(f"chunk {chunk_length}/{overlap}: asked for {k} chunks per question, got {set(per_q)}")
        # training: the same number of chunks at every k (train_steps batches), so time per chunk is comparable
        n_train = train_steps * tc.batch_size
        reps_needed = -(-n_train // len(feats))
        train_feats = featurize(recs * reps_needed, tokenizer, chunk_length, overlap, f.max_query_length)
        infer(recs[:2], chunk_length, overlap)  # warm-up: oneDNN sets up kernels per shape
        inf = _timed(lambda: infer(recs, chunk_length, overlap), reps)
        trn = _timed(lambda: train(train_feats, chunk_length, overlap), reps)
        chunks_trained = min(n_train, len(train_feats))
        row = {
            "chunk_length": chunk_length,
            "overlap": overlap,
            "chunks_per_question": k,
            "questions": len(recs),
            "infer_seconds": inf,
            "infer_ms_per_question": 1000 * inf["median"] / len(recs),
            "infer_ms_per_chunk": 1000 * inf["median"] / len(feats),
            "train_ms_per_chunk": 1000 * trn["median"] / chunks_trained,
            "train_ms_per_question": 1000 * trn["median"] / chunks_trained * k,
        }
        print(
            f"chunk {chunk_length}/{overlap} k={k}: infer {row['infer_ms_per_question']:.1f} ms/question"
            f" ({row['infer_ms_per_chunk']:.1f} ms/chunk), train {row['train_ms_per_chunk']:.1f} ms/chunk",
            file=sys.stderr,
        )
        return row

    by_chunks = [point(f.chunk_length, f.overlap, k) for k in chunks]
    ks = [float(k) for k in chunks]
    fits = {}
    for key in ("infer_ms_per_question", "train_ms_per_question"):
        fit = _fit(ks, [r[key] for r in by_chunks])  # slope: ms per extra chunk
        fit["linearity"] = fit["growth_largest_vs_smallest"] / fit["linear_growth"]  # 1.0 linear, < 1 amortized
        fits[key] = fit
    by_length = []
    for length in lengths:
        overlap = min(f.overlap, length // 4)
        by_length.append(point(length, overlap, 1))
    lengths_x = [float(r["chunk_length"]) for r in by_length]
    # slope: ms per token of chunk length; attention is quadratic in length, so growth above linear shows it
    length_fits = {
        key: _fit(lengths_x, [r[key] for r in by_length]) for key in ("infer_ms_per_chunk", "train_ms_per_chunk")
    }
    return {
        "settings": {
            "questions": len(base),
            "chunks": list(chunks),
            "lengths": list(lengths),
            "train_steps": train_steps,
            "reps": reps,
            "precision": precision,
            "threads": torch.get_num_threads(),
            "method": cfg.method.name,
            "batch_size": tc.batch_size,
            "eval_batch_size": e.batch_size,
        },
        "by_chunks": by_chunks,
        "chunk_fits": fits,
        "by_chunk_length": by_length,
        "length_fits": length_fits,
    }


def print_table(res: dict[str, Any]) -> None:
    print(
        "| chunks/question | chunk length | infer ms/question | infer ms/chunk | train ms/chunk | train ms/question |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in res["by_chunks"] + res["by_chunk_length"]:
        print(
            f"| {r['chunks_per_question']} | {r['chunk_length']} | {r['infer_ms_per_question']:.1f} |"
            f" {r['infer_ms_per_chunk']:.1f} | {r['train_ms_per_chunk']:.1f} | {r['train_ms_per_question']:.1f} |"
        )
    ks = res["settings"]["chunks"]
    for key, fit in res["chunk_fits"].items():
        print(
            f"{key}: slope {fit['slope']:.1f} ms per chunk, intercept {fit['intercept_ms']:.1f} ms,"
            f" x{fit['growth_largest_vs_smallest']:.2f} from {ks[0]} to {ks[-1]} chunks"
            f" (linear: x{fit['linear_growth']:.0f})"
        )
    lengths = res["settings"]["lengths"]
    for key, fit in res.get("length_fits", {}).items():
        print(
            f"{key}: slope {fit['slope']:.3f} ms per token of chunk length,"
            f" x{fit['growth_largest_vs_smallest']:.2f} from {lengths[0]} to {lengths[-1]} tokens"
            f" (linear: x{fit['linear_growth']:.1f})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    res = measure(args.questions, tuple(args.chunks), tuple(args.lengths), args.train_steps, args.reps, args.overrides)
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
