"""MLflow set-up and the tags that tie a run to its data, code and orchestrator."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow

from spanflow.config import Config
from spanflow.paths import MODEL
from tasks.io_utils import atomic_write_json

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


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
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
