"""Stage evaluate: chunked inference on the dev set, official SQuAD scoring, efficiency figures."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.answering.bertscore import BertScorer
from spanflow.answering.inference import records_answerer
from spanflow.answering.no_answer import score_v2, tune_no_answer_threshold
from spanflow.answering.spans import Answer, answer_texts
from spanflow.answering.squad_metrics import score
from spanflow.config import Config
from spanflow.data.features import Record
from spanflow.data.splits import check_prepared, split_records
from spanflow.data.squad import read_jsonl
from spanflow.io_utils import atomic_write_json
from spanflow.paths import METRICS_FILE, MODEL, PREDICTIONS_FILE, PREPARED, TRAIN_SUMMARY_FILE
from spanflow.search.best_params import final_config
from spanflow.tracking.runs import load_run_ref, log_split_input, setup_mlflow
from spanflow.training.memory import peak_rss_mb, reset_peak_rss


def no_answer_setting(cfg: Config, version: str, answer: Callable[[list[Record]], list[Answer]]) -> tuple[float, dict]:
    """The no-answer threshold the dev answers abstain by, and how it was set: eval.no_answer_threshold, or for
    eval.tune_no_answer_threshold the one with the best F1 on the validation split. Nothing for SQuAD v1.1."""
    if version != "2.0":
        return cfg.eval.no_answer_threshold, {}
    if not cfg.eval.tune_no_answer_threshold:
        return cfg.eval.no_answer_threshold, {"no_answer_threshold": cfg.eval.no_answer_threshold}
    val = split_records("val", include_validation=False)
    threshold = tune_no_answer_threshold(val, answer(val), f"the validation split ({PREPARED / 'val.jsonl'})")
    print(f"no-answer threshold {threshold:.3f}: the best F1 on the {len(val)} validation questions")
    return threshold, {"no_answer_threshold": round(threshold, 4), "no_answer_threshold_tuned_on": len(val)}


def bertscore_metrics(cfg: Config, records: list[Record], predictions: dict[str, str]) -> dict:
    """The mean BERTScore F1 (percent) of the answers against their best gold answer, and its encoder."""
    if not cfg.eval.bertscore:
        return {}
    scores = BertScorer(cfg.eval.bertscore_model, cfg.eval.bertscore_layer).score(records, predictions)
    return {
        "bertscore_f1": round(100 * sum(scores.values()) / len(scores), 3),
        "bertscore_model": cfg.eval.bertscore_model,
    }


def evaluate_stage(cfg: Config) -> dict:
    cfg = final_config(cfg)  # dev chunks split like the final model's training chunks
    reset_peak_rss()  # this stage's peak, not the flow process's
    version = check_prepared(cfg)["dev"]["squad_version"]
    records = read_jsonl(PREPARED / "dev.jsonl")
    answer, precision = records_answerer(cfg, MODEL / "hf")
    t0 = time.perf_counter()
    answers = answer(records)
    seconds = time.perf_counter() - t0
    threshold, abstention = no_answer_setting(cfg, version, answer)
    predictions = {r["id"]: t for r, t in zip(records, answer_texts(answers, version, threshold), strict=True)}
    scores = score_v2(records, answers, threshold) if version == "2.0" else score(records, predictions, version)

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
        **abstention,
        **bertscore_metrics(cfg, records, predictions),
    }
    atomic_write_json(PREDICTIONS_FILE, predictions)
    atomic_write_json(METRICS_FILE, metrics)

    setup_mlflow(cfg)
    with mlflow.start_run(run_id=load_run_ref()["run_id"]):
        # the training figures metrics.json repeats are on this run already, under their own names
        own = {
            **{k: metrics[k] for k in scores},
            **({"bertscore_f1": metrics["bertscore_f1"]} if "bertscore_f1" in metrics else {}),
            "questions": len(records),
            "inference_ms_per_question": metrics["inference_ms_per_question"],
        }
        mlflow.log_metrics(
            {f"dev_{k}": float(v) for k, v in own.items()} | {"eval_peak_rss_mb": metrics["eval_peak_rss_mb"]}
        )
        log_split_input(records, "squad-dev", str(PREPARED / "dev.jsonl"), "evaluation")
        mlflow.log_artifact(str(PREDICTIONS_FILE))
        mlflow.log_artifact(str(METRICS_FILE))
    extra = f", BERTScore F1 {metrics['bertscore_f1']:.2f}" if "bertscore_f1" in metrics else ""
    print(
        f"dev ({len(records)} questions, SQuAD v{version}): EM {scores['exact_match']:.2f} F1 {scores['f1']:.2f}{extra}"
    )
    return metrics


evaluate_task = task(evaluate_stage, name="evaluate", cache_policy=NO_CACHE)
