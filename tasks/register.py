"""Stage register: the trained model logged as a pyfunc (models-from-code) and registered as a new version."""

from __future__ import annotations

import importlib.metadata as md
import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from packaging.version import Version
from prefect import task
from prefect.cache_policies import NO_CACHE

import spanflow
from spanflow.answering.onnx_runtime import ensure_onnx
from spanflow.config import Config
from spanflow.data.splits import check_prepared
from spanflow.io_utils import atomic_write_json
from spanflow.paths import METRICS_FILE, MODEL, ONNX_CACHE, REGISTERED_FILE
from spanflow.search.best_params import final_config
from spanflow.tracking.runs import load_run_ref, setup_mlflow

LIBRARY_DIR = Path(spanflow.__file__).parent  # shipped with the model: the pyfunc answers with it
PYFUNC_FILE = LIBRARY_DIR / "serving" / "qa_pyfunc.py"  # models-from-code: MLflow runs it, nothing is pickled
SERVING_REQUIREMENTS = ("mlflow", "torch", "transformers", "pandas", "numpy")
ONNX_SERVING_REQUIREMENTS = ("onnxruntime",)
# Both inputs optional to MLflow: its schema check runs before predict and answers a missing field with its own
# words after an echo of the request; the pyfunc checks them itself and names the field and the row (a 400).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "question", required=False), ColSpec("string", "context", required=False)]),
    outputs=Schema(
        [
            ColSpec("string", "answer"),
            ColSpec("long", "start"),
            ColSpec("long", "end"),
            ColSpec("double", "score"),  # the answer's probability, in [0, 1]
            ColSpec("double", "no_answer_score"),  # the probability of no answer in the context, in [0, 1]
        ]
    ),
)


def pinned_requirement(package: str, version: str) -> str:
    """`package==version` without a PEP 440 local version label: `torch==2.13.0+cpu` -> `torch==2.13.0`. A plain
    package index serves no local versions (the +cpu wheels live on PyTorch's own index), so a model pinned to one
    would not install from PyPI (`mlflow models serve --env-manager virtualenv`, a Docker image of the model)."""
    return f"{package}=={Version(version).public}"


def serving_requirements(runtime: str = "torch") -> list[str]:
    """The installed versions of what the pyfunc imports, pinned as a plain package index serves them."""
    packages = SERVING_REQUIREMENTS + (ONNX_SERVING_REQUIREMENTS if runtime != "torch" else ())
    return [pinned_requirement(p, md.version(p)) for p in packages]


def serving_runtime(cfg: Config) -> str:
    """What the registered model answers with: serving.runtime, else the runtime it was evaluated with."""
    return cfg.serving.runtime or cfg.eval.runtime


def serving_settings(cfg: Config, squad_version: str = "1.1", no_answer_threshold: float | None = None) -> dict:
    """What the pyfunc answers with; a SQuAD 2.0 model abstains ("" answer) by the threshold it was evaluated
    with (`no_answer_threshold`, tuned on validation; else eval.no_answer_threshold)."""
    return {
        "chunk_length": cfg.features.chunk_length,
        "overlap": cfg.features.overlap,
        "max_query_length": cfg.features.max_query_length,
        "max_answer_length": cfg.eval.max_answer_length,
        "n_best": cfg.eval.n_best,
        "span_scoring": cfg.eval.span_scoring,
        "batch_size": cfg.eval.batch_size,
        "workers": cfg.eval.workers,
        "max_batch": cfg.serving.max_batch,
        "precision": cfg.serving.precision,
        "runtime": serving_runtime(cfg),
        "squad_version": squad_version,
        "no_answer_threshold": cfg.eval.no_answer_threshold if no_answer_threshold is None else no_answer_threshold,
    }


def version_from_run(client: MlflowClient, name: str, run_id: str) -> int | None:
    """The version already registered from this training run (a retried flow run registers once)."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(int(v.version) for v in found) if found else None


def log_pyfunc(cfg: Config, run_id: str, artifacts: dict[str, str], settings: dict) -> int:
    """Log the span-QA pyfunc with `artifacts` and its `settings` to `run_id` and register it as a new version."""
    example = pd.DataFrame(
        {"question": ["Where is the Eiffel Tower?"], "context": ["The Eiffel Tower is a landmark in Paris, France."]}
    )
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        settings_file = Path(tmp) / "settings.json"
        settings_file.write_text(json.dumps(settings))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={**artifacts, "settings": str(settings_file)},
            code_paths=[str(LIBRARY_DIR)],
            input_example=example,
            signature=SIGNATURE,
            pip_requirements=serving_requirements(settings["runtime"]),
            registered_model_name=cfg.registry.model_name,
        )
    return int(info.registered_model_version)


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
