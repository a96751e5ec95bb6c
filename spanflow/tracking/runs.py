"""MLflow set-up and the tags that tie a run to its data, code and orchestrator."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow

from spanflow.config import Config
from spanflow.io_utils import atomic_write_json
from spanflow.paths import MODEL

RUN_FILE = MODEL / "run.json"


def setup_mlflow(cfg: Config) -> str:
    """Point MLflow at the tracking store and the experiment; return the experiment id."""
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(cfg.tracking_uri)
    # MLflow also exports the URI to the environment, where it would outrank params.yaml for every
    # later config in this process: only the user's own setting may stay there
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        root = cfg.tracking.artifact_root
        location = root if "://" in root else Path(root).resolve().as_uri()
        return mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    return exp.experiment_id


PIPELINE_OUTPUTS = ("results", "dvc.lock", "models/.gitignore", "data/.gitignore")  # tracked, rewritten by a run


def git_commit() -> str:
    """HEAD, with `-dirty` when tracked source differs from it; the files a run itself rewrites do not count."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        excluded = [f":(exclude){p}" for p in PIPELINE_OUTPUTS]
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded]
        dirty = subprocess.run(status, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prefect_tags() -> dict[str, str]:
    """The Prefect flow run this code runs in, if any."""
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    except Exception:  # not inside a flow run
        pass
    return {}


def save_run_ref(run_id: str, experiment_id: str) -> None:
    atomic_write_json(RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id})


def load_run_ref() -> dict[str, Any]:
    if not RUN_FILE.is_file():
        raise FileNotFoundError(f"{RUN_FILE}: no trained model here; run the train stage first")
    return json.loads(RUN_FILE.read_text())


def log_split_input(records: list[dict], name: str, source: str, context: str) -> None:
    """Log a split as an MLflow dataset input of the active run (context: training / validation / evaluation):
    its questions' ids, titles and questions, with the prepared file as the source. MLflow keeps the schema,
    a digest and the row count, not the data."""
    import pandas as pd

    frame = pd.DataFrame(
        {
            "id": [r["id"] for r in records],
            "title": [r.get("title", "") for r in records],
            "question": [r["question"] for r in records],
        }
    )
    mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=name), context=context)


def describe_run(text: str) -> None:
    """The run's description in the MLflow UI (the `mlflow.note.content` tag)."""
    mlflow.set_tag("mlflow.note.content", text)
