"""Stage register: the trained model logged as a pyfunc (models-from-code) and registered as a new version."""

from __future__ import annotations

import json

from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.answering.onnx_runtime import ensure_onnx
from spanflow.config import Config
from spanflow.data.splits import check_prepared
from spanflow.io_utils import atomic_write_json
from spanflow.paths import METRICS_FILE, MODEL, ONNX_CACHE, REGISTERED_FILE
from spanflow.search.best_params import final_config
from spanflow.serving.registration import log_pyfunc, serving_runtime, serving_settings
from spanflow.tracking.runs import load_run_ref, setup_mlflow


def version_from_run(client: MlflowClient, name: str, run_id: str) -> int | None:
    """The version already registered from this training run (a retried flow run registers once)."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(int(v.version) for v in found) if found else None


def log_and_register(cfg: Config, run_id: str, squad_version: str, no_answer_threshold: float | None = None) -> int:
    artifacts = {"model_dir": str(MODEL / "hf")}
    runtime = serving_runtime(cfg)
    if runtime != "torch":  # the ONNX file the served model answers with (the evaluate stage's, if it made it)
        artifacts["onnx_model"] = str(ensure_onnx(MODEL / "hf", runtime, cfg.eval.int8_skip_modules, ONNX_CACHE))
    return log_pyfunc(cfg, run_id, artifacts, serving_settings(cfg, squad_version, no_answer_threshold))


def register_stage(cfg: Config) -> dict:
    """Log the model to its training run and register a new version, tagged with its dev scores. No alias
    moves here: the promote stage moves `challenger` (and maybe `champion`) once every check passed."""
    cfg = final_config(cfg)  # the served model splits contexts like it was trained
    dev = check_prepared(cfg)["dev"]
    setup_mlflow(cfg)
    run_id = load_run_ref()["run_id"]
    name = cfg.registry.model_name
    client = MlflowClient()
    metrics = json.loads(METRICS_FILE.read_text())
    version = version_from_run(client, name, run_id) or log_and_register(
        cfg, run_id, dev["squad_version"], metrics.get("no_answer_threshold")
    )
    tags = {
        "dev_exact_match": metrics["exact_match"],
        "dev_f1": metrics["f1"],
        "dev_questions": metrics["dev_questions"],
        "dev_content_sha256": dev["content_sha256"],
        "squad_version": dev["squad_version"],
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    out = {"model_name": name, "version": version, "run_id": run_id, "model_uri": f"models:/{name}/{version}", **tags}
    atomic_write_json(REGISTERED_FILE, out)
    print(f"registered {name} version {version} (dev F1 {metrics['f1']:.2f})")
    return out


register_task = task(register_stage, name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
