"""Stage train: the method applied to the backbone, trained on the training split, tracked in MLflow."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path

import mlflow
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from transformers import set_seed

from spanflow.config import Config
from spanflow.paths import MODEL, PREPARED, RESULTS
from tasks.best_params import BEST_PARAMS_FILE, final_config
from tasks.data import read_jsonl
from tasks.features import Features
from tasks.featurize import load_split_features
from tasks.inference import default_device
from tasks.io_utils import atomic_write_json, atomic_write_text
from tasks.memory import peak_rss_mb
from tasks.modeling import apply_method, export_merged, load_backbone, load_tokenizer
from tasks.plots import learning_curves
from tasks.tracking import git_commit, load_run_ref, prefect_tags, save_run_ref, setup_mlflow
from tasks.training import EpochStats, train_model
from tasks.warm_start import load_warm_start

SUMMARY_FILE = MODEL / "train.json"
HISTORY_FILE = RESULTS / "history.csv"
CURVES_FILE = RESULTS / "learning_curves.png"


def _data_tags() -> dict[str, str]:
    version = json.loads((PREPARED / "version.json").read_text())
    tags = {}
    for split in ("train", "dev"):
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
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name)


def _search_tags(cfg: Config) -> dict[str, str]:
    """Where the chunk length, overlap and rank came from."""
    if not cfg.search.enabled:
        return {"search.source": "params.yaml"}
    info = yaml.safe_load(BEST_PARAMS_FILE.read_text())
    tags = {"search.source": str(info.get("source"))}
    for key in ("study", "trial", "mlflow_parent_run_id", "val_f1"):
        if info.get(key) is not None:
            tags[f"search.{key}"] = str(info[key])
    return tags


def warm_start_file(cfg: Config) -> Path | None:
    """The best trial's weights the final model starts from (train.warm_start), or None: no search, or the
    search had none to give (best_params.yaml says which)."""
    if not (cfg.train.warm_start and cfg.search.enabled):
        return None
    name = yaml.safe_load(BEST_PARAMS_FILE.read_text()).get("warm_start")
    if name is None:
        return None
    if not Path(name).is_file():
        raise FileNotFoundError(f"{BEST_PARAMS_FILE} names warm_start {name}, which is missing; rerun the tune stage")
    return Path(name)


def train_stage(cfg: Config, resume: bool = False) -> dict:
    """Train the final model: params.yaml with the search's best point, on the training articles
    (plus the validation articles when train.include_validation, then without per-epoch validation)."""
    cfg = final_config(cfg)
    tokenizer = load_tokenizer(cfg.model)
    train_feats = load_split_features(cfg, "train")
    if cfg.train.include_validation:
        val_feats, val_records = Features(), []
    else:
        val_feats, val_records = load_split_features(cfg, "val"), read_jsonl(PREPARED / "val.jsonl")

    with _start_run(cfg, resume) as run:
        save_run_ref(run.info.run_id, run.info.experiment_id)
        mlflow.log_params(cfg.flat())
        mlflow.set_tags({**_data_tags(), "git_commit": git_commit(), **prefect_tags(), **_search_tags(cfg)})
        mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config/params.resolved.yaml")

        set_seed(cfg.train.seed)  # the new QA head and the LoRA adapters start from the seed ...
        prepared = apply_method(load_backbone(cfg.model), cfg.method)
        warm = warm_start_file(cfg)
        if warm is not None:  # ... or from the search's best trial
            loaded = load_warm_start(prepared.model, warm)
            print(f"warm start: {loaded} trainable tensors from {warm}")
            mlflow.set_tag("train.warm_start", str(warm))
        prepared.model.to(default_device())
        print(
            f"method {cfg.method.name}: {prepared.trainable_params:,} of {prepared.total_params:,} parameters trainable"
        )

        def log_epoch(stats: EpochStats) -> None:
            metrics = {k: v for k, v in asdict(stats).items() if k not in ("epoch", "step") and v is not None}
            mlflow.log_metrics(metrics, step=stats.epoch)

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
        )
        export_merged(prepared.model, tokenizer, MODEL / "hf")

        summary = {
            "run_id": run.info.run_id,
            "method": cfg.method.name,
            "warm_start": str(warm) if warm else None,
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
            "history": [asdict(h) for h in result.history],
        }
        atomic_write_json(SUMMARY_FILE, summary)
        _write_history(result.history)
        learning_curves(summary["history"], CURVES_FILE)
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
    return summary


train_task = task(train_stage, name="train", cache_policy=NO_CACHE)
