"""Stage train: the method applied to the backbone, trained on the training split, tracked in MLflow."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

import mlflow
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import set_seed

from spanflow.answering.inference import default_device, resolve_precision
from spanflow.config import LORA_METHODS, Config
from spanflow.data.features import Features
from spanflow.data.splits import (
    check_prepared,
    load_split_features,
    split_records,
    trial_train_records,
    without_questions,
)
from spanflow.data.squad import read_jsonl
from spanflow.io_utils import atomic_write_json, atomic_write_text
from spanflow.models.layer_mix import layer_weights_report
from spanflow.models.modeling import apply_method, export_merged, load_backbone, load_tokenizer
from spanflow.models.warm_start import load_warm_start
from spanflow.paths import CURVES_FILE, HISTORY_FILE, LAYER_WEIGHTS_FILE, MODEL, PREPARED, TRAIN_SUMMARY_FILE
from spanflow.search.best_params import BEST_PARAMS_FILE, final_config, read_best_params
from spanflow.tracking.plots import layer_weights, learning_curves
from spanflow.tracking.runs import (
    describe_run,
    git_commit,
    load_run_ref,
    log_split_input,
    prefect_tags,
    save_run_ref,
    setup_mlflow,
)
from spanflow.training.loop import EpochStats, train_model
from spanflow.training.memory import peak_rss_mb, reset_peak_rss


def _data_tags(version: dict) -> dict[str, str]:
    tags = {}
    for split in ("train", "dev", "abstain"):
        if split not in version:
            continue
        v = version[split]
        tags[f"data.{split}.content_sha256"] = v["content_sha256"]
        tags[f"data.{split}.dvc_md5"] = str(v["dvc_md5"])
        tags[f"data.{split}.source"] = v["source"]
    return tags


def _write_history(history: list[EpochStats]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(history[0])))
    writer.writeheader()
    writer.writerows(asdict(h) for h in history)
    atomic_write_text(HISTORY_FILE, buf.getvalue())


def _start_run(cfg: Config, resume: bool) -> mlflow.ActiveRun:
    experiment_id = setup_mlflow(cfg)
    if resume:
        try:
            return mlflow.start_run(run_id=load_run_ref()["run_id"])
        except FileNotFoundError:
            pass
    run_name = f"{cfg.method.name}-c{cfg.features.chunk_length}-o{cfg.features.overlap}"
    if cfg.method.name in LORA_METHODS:
        run_name += f"-r{cfg.method.lora.rank}"
    elif cfg.method.name == "freeze":
        run_name += f"-k{cfg.method.freeze.trainable_layers}"
    elif cfg.method.name == "layer_mix":
        run_name += f"-{cfg.method.layer_mix.backbone}" + (f"-r{cfg.method.lora.rank}" if cfg.method.uses_lora else "")
    elif cfg.method.name == "prompt":
        run_name += f"-p{cfg.method.prompt.tokens}"
    parent = {"mlflow.parentRunId": cfg.tracking.parent_run_id} if cfg.tracking.parent_run_id else None
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=parent)


def _search_tags(cfg: Config, info: dict) -> dict[str, str]:
    """Where the chunk length, overlap and rank came from (`info`: best_params.yaml)."""
    if not cfg.search.enabled:
        return {"search.source": "params.yaml"}
    tags = {"search.source": str(info.get("source"))}
    for key in ("study", "trial", "mlflow_parent_run_id", "val_f1"):
        if info.get(key) is not None:
            tags[f"search.{key}"] = str(info[key])
    return tags


def warm_start_file(cfg: Config, info: dict) -> Path | None:
    """The best trial's weights the final model starts from (train.warm_start), or None: no search, or the
    search had none to give (`info`, best_params.yaml, says which)."""
    if not (cfg.train.warm_start and cfg.search.enabled):
        return None
    name = info.get("warm_start")
    if name is None:
        return None
    if not Path(name).is_file():
        raise FileNotFoundError(f"{BEST_PARAMS_FILE} names warm_start {name}, which is missing; rerun the tune stage")
    return Path(name)


def train_stage(cfg: Config, resume: bool = False) -> dict:
    """Train the final model: params.yaml with the search's best point, on the training articles
    (plus the validation articles when train.include_validation, then without per-epoch validation)."""
    cfg = final_config(cfg)
    best = read_best_params() if cfg.search.enabled else {}
    reset_peak_rss()  # this stage's peak, not the flow process's
    version = check_prepared(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_feats = load_split_features(cfg, "train")
    if cfg.train.include_validation:
        val_feats, val_records = Features(), []
    else:
        val_feats, val_records = load_split_features(cfg, "val"), read_jsonl(PREPARED / "val.jsonl")

    with _start_run(cfg, resume) as run:
        save_run_ref(run.info.run_id, run.info.experiment_id)
        mlflow.log_params(cfg.flat())
        mlflow.set_tags(
            {**_data_tags(version), "git_commit": git_commit(), **prefect_tags(), **_search_tags(cfg, best)}
        )
        mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config/params.resolved.yaml")
        train_records = split_records("train", cfg.train.include_validation)
        log_split_input(train_records, "squad-train", str(PREPARED / "train.jsonl"), "training")
        if val_records:
            log_split_input(val_records, "squad-val", str(PREPARED / "val.jsonl"), "validation")

        set_seed(cfg.train.seed)  # the new QA head and the LoRA adapters start from the seed ...
        device = default_device()
        backbone = load_backbone(cfg.model, cfg.method, resolve_precision(cfg.train.precision, device), device)
        prepared = apply_method(backbone, cfg.method)
        warm, skipped = warm_start_file(cfg, best), 0
        if warm is not None:  # ... or from the search's best trial
            loaded = load_warm_start(prepared.model, warm)
            print(f"warm start: {loaded} trainable tensors from {warm}")
            mlflow.set_tag("train.warm_start", str(warm))
            if cfg.train.skip_trial_questions:  # the trial trained on these: the pass goes on with the others
                seen = {r["id"] for r in trial_train_records(cfg)}
                rest = without_questions(train_feats, train_records, seen)
                if len(rest):
                    print(f"warm start: {len(seen):,} questions of the trials skipped, {len(rest):,} chunks left")
                    train_feats, skipped = rest, len(seen)
                else:  # the trials trained on every question: a second pass over them all
                    print("warm start: the trials trained on every training question; the final model trains on all")
        prepared.model.to(device)
        print(
            f"method {cfg.method.name}: {prepared.trainable_params:,} of {prepared.total_params:,} parameters trainable"
        )

        def log_step(step: int, loss: float, lr: float) -> None:
            mlflow.log_metrics({"train_loss_step": loss, "learning_rate": lr}, step=step)

        def log_epoch(stats: EpochStats) -> None:
            metrics = {
                k: v for k, v in asdict(stats).items() if k not in ("epoch", "step", "seconds") and v is not None
            }
            mlflow.log_metrics({**metrics, "epoch_train_seconds": stats.seconds}, step=stats.epoch)

        result = train_model(
            prepared,
            train_feats,
            val_feats,
            val_records,
            cfg,
            tokenizer.pad_token_id,
            MODEL / "checkpoints",
            resume=resume,
            on_epoch=log_epoch,
            on_log=log_step,
        )
        layers = layer_weights_report(prepared.model, cfg.method.name)  # the kept weights, before LoRA merges
        export_merged(prepared.model, tokenizer, MODEL / "hf")
        describe_run(
            f"Final model: {cfg.method.name} ({prepared.trainable_params:,} trainable parameters) on "
            f"{cfg.model.name_or_path}, chunks of {cfg.features.chunk_length} tokens overlapping by "
            f"{cfg.features.overlap}, {result.steps} steps over {len(train_feats):,} chunks of "
            f"{len(train_records):,} training questions in "
            f"{result.precision}; "
            + (f"started from the search's best trial ({warm})." if warm else "started from the seed.")
        )

        summary = {
            "run_id": run.info.run_id,
            "method": cfg.method.name,
            "warm_start": str(warm) if warm else None,
            "trial_questions_skipped": skipped,
            "precision": result.precision,
            "trainable_params": prepared.trainable_params,
            "total_params": prepared.total_params,
            "train_seconds": round(result.train_seconds, 2),
            "train_examples_per_second": round(result.examples_per_second, 2),
            "train_chunks": len(train_feats),
            "steps": result.steps,
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
            "train_peak_rss_mb": round(peak_rss_mb(), 1),
            "layer_mix": layers if layers["learned"] else None,
            "history": [asdict(h) for h in result.history],
        }
        atomic_write_json(TRAIN_SUMMARY_FILE, summary)
        _write_history(result.history)
        learning_curves(summary["history"], CURVES_FILE, result.step_log)
        layer_weights(layers, LAYER_WEIGHTS_FILE)  # every method: the others' is the last layer alone
        if layers["learned"]:  # method layer_mix: the softmax weights per hidden state (0: the embeddings' output)
            mlflow.log_metrics({f"layer_weight_{i}": w for i, w in zip(layers["index"], layers["weight"], strict=True)})
            mlflow.log_metric("layer_mix_gamma", layers["gamma"])
            mlflow.log_dict(layers, "layer_mix/weights.json")
        mlflow.log_metrics(
            {
                k: float(summary[k])
                for k in (
                    "trainable_params",
                    "total_params",
                    "train_seconds",
                    "train_examples_per_second",
                    "train_peak_rss_mb",
                    "steps",
                )
            }
        )
        mlflow.set_tag("precision", result.precision)
        mlflow.log_artifact(str(CURVES_FILE), "plots")
        mlflow.log_artifact(str(HISTORY_FILE), "plots")
        mlflow.log_artifact(str(LAYER_WEIGHTS_FILE), "plots")
    return summary


train_task = task(train_stage, name="train", cache_policy=NO_CACHE)
