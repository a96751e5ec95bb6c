"""Chunked inference: batches of chunks sorted by length, dynamic padding, autocast, span decoding."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from spanflow.answering.onnx_runtime import OnnxQAModel, ensure_onnx
from spanflow.answering.spans import DEFAULT_SPAN_SCORING, Answer, answer_texts, best_spans
from spanflow.config import Config
from spanflow.data.features import Features, Record, featurize
from spanflow.models.ensemble import EnsembleQAModel, check_shared_tokenizer
from spanflow.models.modeling import load_saved_tokenizer, load_trained, takes_token_type_ids
from spanflow.models.qa_loss import span_loss
from spanflow.models.soft_prompt import virtual_tokens
from spanflow.paths import ONNX_CACHE

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto': bf16 where the hardware runs it natively (AMX/avx512-bf16 CPUs, Ampere+ GPUs),
    else fp16 on CUDA, else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        cpu_bf16 = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
        return "bf16" if cpu_bf16 else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision: fp16 needs a CUDA device; on CPU use bf16 or fp32")
    return precision


def autocast(
    device: torch.device, precision: str, model: torch.nn.Module | None = None
) -> contextlib.AbstractContextManager:
    """Mixed precision for `precision`; nothing to do when `model`'s weights are already stored in its dtype."""
    dtype = PRECISIONS[precision]
    if dtype is None or (model is not None and next(model.parameters()).dtype == dtype):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_qa_model(model_dir: str | Path, precision: str, device: torch.device) -> torch.nn.Module:
    """A saved QA model ready to answer questions: on `device`, in eval mode, its weights stored in the dtype
    of `precision` (bf16/fp16), so that no Linear casts its fp32 weight on every call as autocast does
    (bf16 weights at batch 16 ran 1.24x the questions/s of bf16 autocast at batch 64 here: benchmarks/README.md).
    Training keeps fp32 weights under autocast; only answering uses this."""
    model = load_trained(model_dir).to(device)
    dtype = PRECISIONS[precision]
    return model.to(dtype) if dtype is not None else model


def load_answering_model(
    model_dir: str | Path,
    runtime: str,
    precision: str,
    device: torch.device,
    workers: int = 1,
    int8_skip_modules: list[str] | tuple[str, ...] = (),
    onnx_file: str | Path | None = None,
) -> tuple[torch.nn.Module | OnnxQAModel, str]:
    """The model that answers with `runtime` (torch | onnx | onnx_int8), and the precision it computes in.
    ONNX Runtime runs on the CPU in fp32 (int8 Linears for onnx_int8), from `onnx_file` or an export of
    `model_dir` (cached in models/onnx); its `workers` batches in flight share torch's thread count."""
    if runtime == "torch":
        return load_qa_model(model_dir, precision, device), precision
    onnx_file = onnx_file or ensure_onnx(Path(model_dir), runtime, list(int8_skip_modules), ONNX_CACHE)
    threads = max(1, torch.get_num_threads() // max(1, workers))
    return OnnxQAModel(Path(onnx_file), threads), "fp32"


def load_members(model_dirs: list[str | Path], precision: str, device: torch.device) -> list[torch.nn.Module]:
    """Saved QA models meant to answer together: checked to share one tokenizer, then each loaded to answer."""
    dirs = [Path(d) for d in model_dirs]
    check_shared_tokenizer(dirs)
    return [load_qa_model(d, precision, device) for d in dirs]


def load_ensemble_model(
    model_dirs: list[str | Path], rule: str, precision: str, device: torch.device
) -> EnsembleQAModel:
    """Saved QA models answering as one by `rule` (max | mean of their probabilities); torch only."""
    return EnsembleQAModel(load_members(model_dirs, precision, device), rule)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def padded_width(length: int, multiple_of: int) -> int:
    """`length` rounded up to a multiple of `multiple_of`: the width a batch is padded to."""
    return -(-length // multiple_of) * multiple_of


def pad_batch(
    feats: Features, idx: list[int], pad_id: int, with_labels: bool, multiple_of: int = 1, token_types: bool = True
) -> dict[str, torch.Tensor]:
    """Dynamic padding: pad to the longest chunk of this batch, rounded up to `multiple_of` tokens, on the right.
    `token_types`: whether the model takes token_type_ids (a decoder has none to give them to)."""
    width = padded_width(max(len(feats.input_ids[i]) for i in idx), multiple_of)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(idx), width), dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(feats.input_ids[i])
        ids[row, :n] = torch.tensor(feats.input_ids[i])
        types[row, :n] = torch.tensor(feats.token_type_ids[i])
        mask[row, :n] = 1
    batch = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
    if not token_types:
        del batch["token_type_ids"]
    if with_labels:
        batch["start_positions"] = torch.tensor([feats.start_positions[i] for i in idx])
        batch["end_positions"] = torch.tensor([feats.end_positions[i] for i in idx])
    return batch


def length_sorted_batches(feats: Features, batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(feats)), key=lambda i: len(feats.input_ids[i]), reverse=True)
    for lo in range(0, len(order), batch_size):
        yield order[lo : lo + batch_size]


def run_model(
    model: torch.nn.Module | OnnxQAModel,
    feats: Features,
    batch_size: int,
    precision: str,
    pad_id: int,
    with_loss: bool = False,
    workers: int = 1,
) -> tuple[list[np.ndarray], list[np.ndarray], float | None]:
    """Start/end logits per chunk (trimmed to its length) and, with labels, the mean loss (`span_loss`).

    On the CPU, `workers` threads run whole batches side by side, each with its share of torch's threads: two
    workers of one thread answered 1.17x the questions/s of one worker of two threads on the 2-core development
    CPU (`benchmarks/README.md`). On a GPU the batches run one after another. An `OnnxQAModel` answers on the
    CPU, without a loss."""
    onnx = isinstance(model, OnnxQAModel)
    if onnx and with_loss:
        raise ValueError("run_model: the loss needs the torch model; ONNX Runtime only answers")
    device = torch.device("cpu") if onnx else next(model.parameters()).device
    workers = max(1, workers) if device.type == "cpu" else 1
    was_training = not onnx and model.training
    if not onnx:
        model.eval()
    starts: list[np.ndarray] = [np.empty(0)] * len(feats)
    ends: list[np.ndarray] = [np.empty(0)] * len(feats)
    threads = torch.get_num_threads()
    token_types = onnx or takes_token_type_ids(model)  # an ONNX session picks the inputs it has

    def forward(idx: list[int]) -> tuple[list[int], np.ndarray, np.ndarray, float]:
        batch = {k: v.to(device) for k, v in pad_batch(feats, idx, pad_id, with_loss, 1, token_types).items()}
        if onnx:
            return idx, *model.logits(batch), 0.0
        labels = (batch.pop("start_positions"), batch.pop("end_positions")) if with_loss else None
        with torch.inference_mode(), autocast(device, precision, model):  # both are per thread too
            out = model(**batch)
            loss = 0.0
            if labels is not None:
                loss = float(span_loss(out.start_logits, out.end_logits, batch["attention_mask"], *labels)) * len(idx)
        return idx, out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy(), loss

    batches = list(length_sorted_batches(feats, batch_size))
    loss_sum = 0.0
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1:
                # torch's thread count is per calling thread: each worker takes its share once
                share = (max(1, threads // workers),)
                pool = stack.enter_context(ThreadPoolExecutor(workers, "run-model", torch.set_num_threads, share))
                results = pool.map(forward, batches)  # in batch order
            else:
                results = map(forward, batches)
            for idx, s, e, loss in results:
                for row, i in enumerate(idx):
                    n_tok = len(feats.input_ids[i])
                    starts[i], ends[i] = s[row, :n_tok], e[row, :n_tok]
                loss_sum += loss
    finally:
        if workers > 1:
            torch.set_num_threads(threads)  # the setting is partly process-wide: put the caller's back
        if not onnx:
            model.train(was_training)
    return starts, ends, (loss_sum / len(feats) if with_loss and len(feats) else None)


def answer_questions(
    model: torch.nn.Module | OnnxQAModel,
    tokenizer,
    records: list[Record],
    chunk_length: int,
    overlap: int,
    max_query_length: int,
    max_answer_length: int,
    n_best: int,
    batch_size: int,
    precision: str,
    workers: int = 1,
    span_scoring: str = DEFAULT_SPAN_SCORING,
) -> list[Answer]:
    """Question + context of any length -> best answer span, with its own context splitting (a soft prompt's
    virtual tokens, which the model knows, take their share of `chunk_length`)."""
    feats = featurize(records, tokenizer, chunk_length, overlap, max_query_length, virtual_tokens=virtual_tokens(model))
    starts, ends, _ = run_model(model, feats, batch_size, precision, tokenizer.pad_token_id, workers=workers)
    return best_spans(records, feats, starts, ends, max_answer_length, n_best, span_scoring)


def records_answerer(cfg: Config, model_dir: Path) -> tuple[Callable[[list[Record]], list[Answer]], str]:
    """A function that answers records with the model in `model_dir` and the chunking and decoding of `cfg`,
    loaded once; and the precision it computes in."""
    device = default_device()
    model, precision = load_answering_model(
        model_dir,
        cfg.eval.runtime,
        resolve_precision(cfg.train.precision, device),
        device,
        cfg.eval.workers,
        cfg.eval.int8_skip_modules,
    )
    return model_answerer(cfg, model, load_saved_tokenizer(model_dir), precision), precision


def model_answerer(
    cfg: Config, model: torch.nn.Module | OnnxQAModel, tokenizer, precision: str
) -> Callable[[list[Record]], list[Answer]]:
    """A function that answers records with `model`, by the chunking and decoding of `cfg`."""

    def answer(records: list[Record]) -> list[Answer]:
        return answer_questions(
            model,
            tokenizer,
            records,
            cfg.features.chunk_length,
            cfg.features.overlap,
            cfg.features.max_query_length,
            cfg.eval.max_answer_length,
            cfg.eval.n_best,
            cfg.eval.batch_size,
            precision,
            cfg.eval.workers,
            cfg.eval.span_scoring,
        )

    return answer


def predict_records(
    cfg: Config, model_dir: Path, records: list[dict], version: str
) -> tuple[dict[str, str], float, str]:
    """id -> answer text for `records`, with the chunking and decoding of `cfg`; also the seconds it took
    and the precision it ran in. The promotion gate re-scores an old champion through here too."""
    answer, precision = records_answerer(cfg, model_dir)
    t0 = time.perf_counter()
    answers = answer(records)
    seconds = time.perf_counter() - t0
    texts = answer_texts(answers, version, cfg.eval.no_answer_threshold)
    return {r["id"]: t for r, t in zip(records, texts, strict=True)}, seconds, precision
