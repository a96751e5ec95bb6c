"""Registered model versions answering again: downloaded, with the chunking, decoding and abstaining they were
registered with. The promotion gate re-scores an old champion through here, and `spanflow ensemble` its members."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlflow
from mlflow.models import Model

from spanflow.answering.inference import (
    default_device,
    load_ensemble_model,
    model_answerer,
    records_answerer,
    resolve_precision,
)
from spanflow.answering.spans import REGISTERED_BEFORE_SPAN_SCORING, Answer
from spanflow.config import Config
from spanflow.data.features import Record
from spanflow.models.modeling import load_saved_tokenizer


def registered_files(name: str, version: int | str, dst: str | Path) -> tuple[list[Path], dict]:
    """A registered version's model directories (one; an ensemble's members in order), downloaded into `dst`,
    and the settings it serves with."""
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(dst)))
    artifacts = Model.load(local).flavors["python_function"]["artifacts"]
    settings = json.loads((local / artifacts["settings"]["path"]).read_text())
    keys = ["model_dir"] + [f"model_dir_{k}" for k in range(1, settings.get("ensemble_members", 1))]
    return [local / artifacts[key]["path"] for key in keys], settings


def registered_config(cfg: Config, settings: dict) -> Config:
    """`cfg` with the chunking, decoding and abstaining a registered version serves with."""
    return cfg.with_values(
        {
            "features.chunk_length": settings["chunk_length"],
            "features.overlap": settings["overlap"],
            "features.max_query_length": settings["max_query_length"],
            "eval.max_answer_length": settings["max_answer_length"],
            "eval.n_best": settings["n_best"],
            "eval.span_scoring": settings.get("span_scoring", REGISTERED_BEFORE_SPAN_SCORING),
            "eval.no_answer_threshold": settings.get("no_answer_threshold", 0.0),
            "eval.tune_no_answer_threshold": False,  # a registered version abstains by the threshold it was given
        }
    )


def version_answerer(
    cfg: Config, name: str, version: int | str, dst: str | Path
) -> tuple[Callable[[list[Record]], list[Answer]], Config]:
    """A function answering records as registered `version` does (an ensemble as one), and its config."""
    model_dirs, settings = registered_files(name, version, dst)
    own = registered_config(cfg, settings)
    if not settings.get("ensemble_rule"):
        return records_answerer(own, model_dirs[0])[0], own
    precision = resolve_precision(cfg.train.precision, default_device())
    model = load_ensemble_model(model_dirs, settings["ensemble_rule"], precision, default_device())
    tokenizer = load_saved_tokenizer(model_dirs[0])
    return model_answerer(own, model, tokenizer, precision), own
