"""The span-QA pyfunc as an MLflow model version: what it is logged with (its code, settings, signature and pinned
requirements) and the call that logs and registers it. The register stage and `spanflow ensemble` both use it."""

from __future__ import annotations

import importlib.metadata as md
import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from packaging.version import Version

import spanflow
from spanflow.config import Config

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
