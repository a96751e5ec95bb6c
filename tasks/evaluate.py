"""Stage evaluate: chunked inference on the dev set, official SQuAD scoring, efficiency figures."""

from __future__ import annotations

import json

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.answering.inference import predict_records
from spanflow.answering.squad_metrics import score
from spanflow.config import Config
from spanflow.data.splits import check_prepared
from spanflow.data.squad import read_jsonl
from spanflow.io_utils import atomic_write_json
from spanflow.paths import METRICS_FILE, MODEL, PREDICTIONS_FILE, PREPARED, TRAIN_SUMMARY_FILE
from spanflow.search.best_params import final_config
from spanflow.tracking.runs import load_run_ref, log_split_input, setup_mlflow
from spanflow.training.memory import peak_rss_mb, reset_peak_rss


def evaluate_stage(cfg: Config) -> dict:
    cfg = final_config(cfg)  # dev chunks split like the final model's training chunks
    reset_peak_rss()  # this stage's peak, not the flow process's
    version = check_prepared(cfg)["dev"]["squad_version"]
    records = read_jsonl(PREPARED / "dev.jsonl")
    predictions, seconds, precision = predict_records(cfg, MODEL / "hf", records, version)
    scores = score(records, predictions, version)

    train = json.loads(TRAIN_SUMMARY_FILE.read_text())
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
        "runtime": cfg.eval.runtime,
    }
    atomic_write_json(PREDICTIONS_FILE, predictions)
    atomic_write_json(METRICS_FILE, metrics)

    setup_mlflow(cfg)
    with mlflow.start_run(run_id=load_run_ref()["run_id"]):
        # the training figures metrics.json repeats are on this run already, under their own names
        own = {
            **{k: metrics[k] for k in scores},
            "questions": len(records),
            "inference_ms_per_question": metrics["inference_ms_per_question"],
        }
        mlflow.log_metrics(
            {f"dev_{k}": float(v) for k, v in own.items()} | {"eval_peak_rss_mb": metrics["eval_peak_rss_mb"]}
        )
        log_split_input(records, "squad-dev", str(PREPARED / "dev.jsonl"), "evaluation")
        mlflow.log_artifact(str(PREDICTIONS_FILE))
        mlflow.log_artifact(str(METRICS_FILE))
    print(f"dev ({len(records)} questions, SQuAD v{version}): EM {scores['exact_match']:.2f} F1 {scores['f1']:.2f}")
    return metrics


evaluate_task = task(evaluate_stage, name="evaluate", cache_policy=NO_CACHE)
