"""The model registry from the shell: promote by hand, list versions, predict, serve."""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from spanflow.config import Config
from spanflow.serving import THREADS_ENV
from spanflow.tracking.runs import setup_mlflow


def champion_uri(cfg: Config) -> str:
    return f"models:/{cfg.registry.model_name}@{cfg.registry.champion_alias}"


def _client(cfg: Config) -> MlflowClient:
    setup_mlflow(cfg)
    return MlflowClient()


def promote_by_hand(cfg: Config, version: int, reason: str) -> None:
    """Move the champion alias to `version`; who, when and why become tags of that version."""
    if not reason.strip():
        raise ValueError("--reason: say why this version is promoted")
    client = _client(cfg)
    name = cfg.registry.model_name
    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ValueError(f"--version {version}: registered model {name!r} has no such version") from exc
    aliases = client.get_registered_model(name).aliases
    previous = aliases.get(cfg.registry.champion_alias)
    tags = {
        "promotion.decision": "promoted by hand",
        "promotion.reason": reason,
        "promoted_by": getpass.getuser(),
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "promotion.replaced_version": str(previous) if previous is not None else "none",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, cfg.registry.champion_alias, str(version))
    print(f"{name} v{version} is now @{cfg.registry.champion_alias} (was v{previous}); reason: {reason}")


def versions_table(cfg: Config) -> str:
    """Every version of the registered model, newest first, with its aliases and dev scores."""
    client = _client(cfg)
    name = cfg.registry.model_name
    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as exc:
        raise ValueError(f"registry.model_name: no registered model {name!r} at {cfg.tracking_uri}") from exc
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(f"@{alias}")
    rows = [
        "| version | aliases | dev EM | dev F1 | dev questions | created (UTC) | promotion |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version))
    for mv in versions:
        t = mv.tags
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        decision = t.get("promotion.decision", "")
        if decision:
            decision += f" ({t.get('promoted_by')})" if "promoted_by" in t else ""
        rows.append(
            f"| {mv.version} | {' '.join(sorted(by_version.get(str(mv.version), [])))} | "
            f"{t.get('dev_exact_match', '')} | {t.get('dev_f1', '')} | {t.get('dev_questions', '')} | "
            f"{created} | {decision} |"
        )
    return f"{name} at {cfg.tracking_uri}\n\n" + "\n".join(rows)


def predict_file(cfg: Config, question: str, context_file: str, model_uri: str | None) -> str:
    """One question over the text of a file, through the registered pyfunc; JSON out."""
    import mlflow.pyfunc

    path = Path(context_file)
    if not path.is_file():
        raise FileNotFoundError(f"--context-file {path}: no such file")
    context = path.read_text(encoding="utf-8")
    if not context.strip():
        raise ValueError(f"--context-file {path}: the file is empty")
    if not question.strip():
        raise ValueError("--question: empty")
    setup_mlflow(cfg)
    uri = model_uri or champion_uri(cfg)
    model = mlflow.pyfunc.load_model(uri)
    t0 = time.perf_counter()
    out = model.predict(pd.DataFrame({"question": [question], "context": [context]}))
    seconds = time.perf_counter() - t0
    row = out.iloc[0]
    answer = {
        "answer": row["answer"],
        "start": int(row["start"]),
        "end": int(row["end"]),
        "score": float(row["score"]),
        # versions registered before no_answer_score existed do not return it
        **({"no_answer_score": float(row["no_answer_score"])} if "no_answer_score" in row else {}),
        "model_uri": uri,
        "context_chars": len(context),
        "seconds": round(seconds, 3),
    }
    return json.dumps(answer, ensure_ascii=False, indent=2)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS says, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def serve_command(
    cfg: Config, uri: str, host: str | None, port: int | None, workers: int = 1
) -> tuple[list[str], dict[str, str]]:
    """`mlflow models serve` of `uri` with `workers` worker processes, and its environment.

    MLflow 3 starts `uvicorn --workers N` (its `--workers` option, or MLFLOW_MODELS_WORKERS); each worker process
    loads the model and answers its requests with its own torch threads. Left alone each would take every core,
    so N workers would run N times the cores' threads against each other: each gets the usable CPUs // N
    (at least 1) through SPANFLOW_TORCH_THREADS, unless that is already set, which the pyfunc applies when it
    loads; OMP_NUM_THREADS gets the same default, for versions registered before the pyfunc read it."""
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "--host",
        host or cfg.serving.host,
        "--port",
        str(port or cfg.serving.port),
        "--workers",
        str(workers),
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": cfg.tracking_uri,  # models:/ URIs resolve in this registry
        # mlflow starts `uvicorn` by name: this environment's bin first, even when it is not activated
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    env.setdefault(THREADS_ENV, str(max(1, usable_cpus() // workers)))
    env.setdefault("OMP_NUM_THREADS", env[THREADS_ENV])
    return command, env


def serve(cfg: Config, model_uri: str | None, host: str | None, port: int | None, workers: int = 1) -> None:
    """Replace this process with `mlflow models serve` on the registered model (default: the champion), once
    the model's URI is known to resolve (a wrong one is a one-line error here, not a server traceback)."""
    uri = model_uri or champion_uri(cfg)
    store = cfg.tracking_uri.removeprefix("sqlite:///")
    if uri.startswith("models:/") and store != cfg.tracking_uri and not Path(store).is_file():
        raise ValueError(f"--model-uri {uri}: no MLflow store at {cfg.tracking_uri} here (run `make run` first)")
    mlflow.set_tracking_uri(cfg.tracking_uri)  # to resolve models:/ URIs; opening a store would create one
    try:
        mlflow.models.get_model_info(uri)
    except Exception as exc:  # MlflowException, OSError: whatever the store raises for a missing model
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--model-uri {uri}: no model there ({message[:300]})") from None
    command, env = serve_command(cfg, uri, host, port, workers)
    print(" ".join(command[1:]), f"({THREADS_ENV}={env[THREADS_ENV]})", flush=True)
    os.execve(sys.executable, command, env)
