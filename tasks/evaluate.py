"""Stage evaluate: chunked inference on the dev set, official SQuAD scoring, efficiency figures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import AutoTokenizer

from spanflow.config import Config
from spanflow.paths import MODEL, PREPARED, RESULTS
from tasks.best_params import final_config
from tasks.data import read_jsonl
from tasks.inference import answer_questions, default_device, load_qa_model, resolve_precision
from tasks.io_utils import atomic_write_json
from tasks.memory import peak_rss_mb
from tasks.spans import answer_texts
from tasks.squad_metrics import score
from tasks.tracking import load_run_ref, setup_mlflow
from tasks.train import SUMMARY_FILE

PREDICTIONS_FILE = RESULTS / "predictions.json"
METRICS_FILE = RESULTS / "metrics.json"


def predict_records(
    cfg: Config, model_dir: Path, records: list[dict], version: str
) -> tuple[dict[str, str], float, str]:
    """id -> answer text for `records`, with the chunking and decoding of `cfg`; also the seconds it took
    and the precision it ran in. The promotion gate re-scores an old champion through here too."""
    device = default_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    precision = resolve_precision(cfg.train.precision, device)
    model = load_qa_model(model_dir, precision, device)
    t0 = time.perf_counter()
    answers = answer_questions(
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
    seconds = time.perf_counter() - t0
    texts = answer_texts(answers, version, cfg.eval.no_answer_threshold)
    return {r["id"]: t for r, t in zip(records, texts, strict=True)}, seconds, precision


def evaluate_stage(cfg: Config) -> dict:
    cfg = final_config(cfg)  # dev chunks split like the final model's training chunks
    records = read_jsonl(PREPARED / "dev.jsonl")
    version = json.loads((PREPARED / "version.json").read_text())["dev"]["squad_version"]
    predictions, seconds, precision = predict_records(cfg, MODEL / "hf", records, version)
    scores = score(records, predictions, version)

    train = json.loads(SUMMARY_FILE.read_text())
    metrics = {
        **{k: round(v, 3) for k, v in scores.items()},
        "squad_version": version,
        "dev_questions": len(records),
        "trainable_params": train["trainable_params"],
        "total_params": train["total_params"],
        "train_seconds": train["train_seconds"],
        "train_examples_per_second": train["train_examples_per_second"],
        "inference_ms_per_question": round(1000 * seconds / len(records), 2),
        "train_peak_rss_mb": train["train_peak_rss_mb"],
        "eval_peak_rss_mb": round(peak_rss_mb(), 1),
        "precision": precision,
    }
    atomic_write_json(PREDICTIONS_FILE, predictions)
    atomic_write_json(METRICS_FILE, metrics)

    setup_mlflow(cfg)
    with mlflow.start_run(run_id=load_run_ref()["run_id"]):
        mlflow.log_metrics({f"dev_{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        mlflow.log_artifact(str(PREDICTIONS_FILE))
        mlflow.log_artifact(str(METRICS_FILE))
    print(f"dev ({len(records)} questions, SQuAD v{version}): EM {scores['exact_match']:.2f} F1 {scores['f1']:.2f}")
    return metrics


evaluate_task = task(evaluate_stage, name="evaluate", cache_policy=NO_CACHE)
