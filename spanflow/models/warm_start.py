"""The final model starts where the search's best trial stopped: each complete trial logs the weights its
method trains (LoRA and QA head) to its MLflow run, the tune stage fetches the best one into
models/search/, and the train stage loads it instead of starting from the seed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
import torch
from safetensors.torch import load_file, save_file

from spanflow.models.modeling import load_trainable_state, trainable_state
from spanflow.paths import SEARCH_MODEL

WARM_START_FILE = SEARCH_MODEL / "best_trial.safetensors"
TRIAL_ARTIFACT = "trial/trainable.safetensors"  # in each complete trial's MLflow run


def log_trial_weights(model: torch.nn.Module) -> None:
    """Log the trainable weights of a finished trial to the active MLflow run."""
    with tempfile.TemporaryDirectory(prefix="spanflow-trial-weights-") as tmp:
        path = Path(tmp) / Path(TRIAL_ARTIFACT).name
        save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, str(path))
        mlflow.log_artifact(str(path), str(Path(TRIAL_ARTIFACT).parent))


def fetch_best_trial_weights(run_id: str | None) -> Path | None:
    """Copy the best trial's logged weights to WARM_START_FILE (emptying models/search/ first); None, with
    the reason printed, when that run has none (a trial logged by older code, or another tracking store)."""
    shutil.rmtree(SEARCH_MODEL, ignore_errors=True)
    SEARCH_MODEL.mkdir(parents=True)
    if run_id is None:
        return None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TRIAL_ARTIFACT)
    except Exception as exc:  # MlflowException or OSError, depending on the store
        print(
            f"warm start: the best trial's run {run_id} has no {TRIAL_ARTIFACT} ({type(exc).__name__}); "
            "the final model will start from the seed"
        )
        return None
    shutil.copyfile(local, WARM_START_FILE)
    return WARM_START_FILE


def load_warm_start(model: torch.nn.Module, path: Path) -> int:
    """Load a trial's trainable weights into `model`; they must cover exactly the weights the model trains,
    with the same shapes. Returns how many tensors were loaded."""
    state = load_file(str(path))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(trained):
        extra, missing = sorted(set(state) - set(trained)), sorted(set(trained) - set(state))
        raise ValueError(
            f"{path}: the trial's weights do not match the final model's trainable weights "
            f"(only in the file: {extra[:3]}, only in the model: {missing[:3]}); "
            "rerun the tune stage or set train.warm_start: false"
        )
    for name, value in state.items():
        if value.shape != trained[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(value.shape)}, the model's is {tuple(trained[name].shape)}; "
                "rerun the tune stage or set train.warm_start: false"
            )
    load_trainable_state(model, state)
    return len(state)
