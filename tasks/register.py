"""Stage register: the trained model logged as a pyfunc (models-from-code) and registered with an alias."""

from __future__ import annotations

import importlib.metadata as md
import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.config import Config
from spanflow.paths import MODEL, RESULTS
from tasks.best_params import final_config
from tasks.io_utils import atomic_write_json
from tasks.tracking import load_run_ref, setup_mlflow

PYFUNC_FILE = Path(__file__).with_name("qa_pyfunc.py")
TASKS_DIR = Path(__file__).parent
REGISTERED_FILE = RESULTS / "registered.json"
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "pandas", "numpy")


def serving_settings(cfg: Config) -> dict:
    return {
        "chunk_length": cfg.features.chunk_length,
        "overlap": cfg.features.overlap,
        "max_query_length": cfg.features.max_query_length,
        "max_answer_length": cfg.eval.max_answer_length,
        "n_best": cfg.eval.n_best,
        "batch_size": cfg.eval.batch_size,
        "precision": "fp32",  # portable default for serving hosts of any kind
    }


def register_stage(cfg: Config) -> dict:
    cfg = final_config(cfg)  # the served model splits contexts like it was trained
    setup_mlflow(cfg)
    run_id = load_run_ref()["run_id"]
    name, alias = cfg.registry.model_name, cfg.registry.alias
    example = pd.DataFrame(
        {"question": ["Where is the Eiffel Tower?"], "context": ["The Eiffel Tower is a landmark in Paris, France."]}
    )
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        settings = Path(tmp) / "settings.json"
        settings.write_text(json.dumps(serving_settings(cfg)))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"model_dir": str(MODEL / "hf"), "settings": str(settings)},
            code_paths=[str(TASKS_DIR)],
            input_example=example,
            pip_requirements=[f"{p}=={md.version(p)}" for p in SERVING_REQUIREMENTS],
            registered_model_name=name,
        )
    version = info.registered_model_version
    client = MlflowClient()
    client.set_registered_model_alias(name, alias, version)
    out = {
        "model_name": name,
        "version": int(version),
        "alias": alias,
        "run_id": run_id,
        "model_uri": f"models:/{name}@{alias}",
    }
    atomic_write_json(REGISTERED_FILE, out)
    print(f"registered {name} version {version} as @{alias}")
    return out


register_task = task(register_stage, name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
