"""Stage tune: an Optuna study over chunk_length x overlap x lora_rank, shared by any number of
workers through one storage URL, with one nested MLflow run per trial under the search's parent
run. Writes `results/best_params.yaml` for the final stages, `models/search/` (the best trial's
weights, where the final model starts) and `results/search/` (trials table, summary, heatmaps,
durations) for people."""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import asdict
from typing import Any

import mlflow
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.config import Config
from spanflow.data.splits import check_prepared
from spanflow.io_utils import atomic_write_json, atomic_write_text
from spanflow.models.warm_start import fetch_best_trial_weights
from spanflow.paths import RESULTS
from spanflow.search.best_params import write_best_params
from spanflow.search.claims import ClaimBoard
from spanflow.search.grid import SEARCHED_KEYS, split_grid
from spanflow.search.study import (
    SearchIncomplete,
    open_study,
    parent_run,
    plan,
    redact,
    run_workers,
    study_name,
    summarize,
    trial_rows,
    wait_for_others,
)
from spanflow.search.worker import SearchContext, open_storage
from spanflow.tracking.plots import search_durations, search_heatmaps
from spanflow.tracking.runs import prefect_tags

SEARCH_DIR = RESULTS / "search"
TRIALS_FILE = SEARCH_DIR / "trials.csv"
SUMMARY_FILE = SEARCH_DIR / "summary.json"
HEATMAP_FILE = SEARCH_DIR / "heatmap.png"
DURATIONS_FILE = SEARCH_DIR / "durations.png"


def _write_outputs(rows: list[dict], summary: dict) -> None:
    SEARCH_DIR.mkdir(parents=True, exist_ok=True)
    fields = [
        "trial",
        "point",
        "chunk_length",
        "overlap",
        "lora_rank",
        "state",
        "val_f1",
        "val_exact_match",
        "steps_run",
        "budget_steps",
        "seconds",
        "saved_seconds",
        "peak_rss_mb",
        "worker",
        "attempt",
        "note",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(TRIALS_FILE, buf.getvalue())
    atomic_write_json(SUMMARY_FILE, summary)
    search_heatmaps(rows, HEATMAP_FILE, summary["best_point"], summary["lead"])
    search_durations(rows, DURATIONS_FILE)


def _log_parent(cfg: Config, run_id: str, summary: dict, storage_url: str, failed: bool) -> None:
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params(
            {f"search.space.{k}": str(v) for k, v in asdict(cfg.search.space).items()}
            | {f"search.trial.{k}": v for k, v in asdict(cfg.search.trial).items()}
            | {f"search.pruner.{k}": v for k, v in asdict(cfg.search.pruner).items()}
        )
        mlflow.set_tags({"optuna.storage": redact(storage_url), **prefect_tags()})
        numbers = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        lead = summary["lead"] or {}
        numbers |= {k: v for k, v in lead.items() if k.startswith("lead_")}
        mlflow.log_metrics(numbers)
        if lead:
            mlflow.set_tags({"search.separated": str(lead["separated"]), "search.verdict": lead["verdict"]})
        if summary["best_params"]:
            mlflow.log_text(yaml.safe_dump(summary["best_params"]), "best_params.yaml")
        for path in (TRIALS_FILE, SUMMARY_FILE, HEATMAP_FILE, DURATIONS_FILE):
            mlflow.log_artifact(str(path), "search")
    mlflow.MlflowClient().set_terminated(run_id, "FAILED" if failed else "FINISHED")


def tune_stage(cfg: Config, workers: int | None = None) -> dict[str, Any]:
    """Run (or resume) the grid search; write best_params.yaml; raise SearchIncomplete on failed points."""
    check_prepared(cfg)
    if not cfg.search.enabled:
        params = {dotted: cfg.get(dotted) for dotted in SEARCHED_KEYS.values()}
        write_best_params(params, {"source": "params.yaml (search.enabled is false)", "warm_start": None})
        fetch_best_trial_weights(None)  # no trial to start from: models/search/ left empty
        return {"best_params": params, "study": None}

    t0 = time.perf_counter()
    points, skipped = split_grid(cfg)
    for point, reason in skipped.items():
        print(f"grid point {point.key}: skipped, {reason}")
    url = cfg.search_storage
    storage = open_storage(url, cfg.search.heartbeat_seconds)
    name = study_name(cfg)
    study = open_study(cfg, name, storage)
    study.set_user_attr("skipped_points", {p.key: reason for p, reason in skipped.items()})
    board = ClaimBoard(url)
    grace = 3 * cfg.search.heartbeat_seconds
    work = plan(study, board, points, grace)
    board.dispose()
    print(
        f"study {name} on {redact(url)}: {len(points)} points ({len(skipped)} skipped), "
        f"{len(work['done'])} already done, {len(work['busy'])} running elsewhere, {len(work['todo'])} to train"
    )
    parent = parent_run(cfg, study)
    ctx = SearchContext(cfg, name, url, parent, tuple(work["todo"]))
    if work["todo"]:
        run_workers(ctx, workers or cfg.search.workers, storage)
    wait_for_others(study, points, grace)

    rows = trial_rows(study, skipped)
    wall = time.perf_counter() - t0
    study.set_user_attr("wall_seconds_total", study.user_attrs.get("wall_seconds_total", 0.0) + wall)
    summary = summarize(study, rows, points, wall, cfg.train.seed)
    _write_outputs(rows, summary)
    missing = summary["points_missing"]
    _log_parent(cfg, parent, summary, url, failed=bool(missing))
    if summary["best_params"] and not missing:
        best_run = study.trials[summary["best_trial"]].user_attrs.get("mlflow_run_id")
        warm = fetch_best_trial_weights(best_run)
        write_best_params(
            summary["best_params"],
            {
                "source": "search",
                "study": name,
                "storage": redact(os.environ.get("OPTUNA_STORAGE") or cfg.search.storage),  # as configured
                "trial": summary["best_trial"],
                "separated_from_runner_up": (summary["lead"] or {}).get("separated"),
                "val_f1": summary["best_val_f1"],
                "val_exact_match": summary["best_val_exact_match"],
                "mlflow_parent_run_id": parent,
                "mlflow_run_id": best_run,
                "warm_start": str(warm) if warm else None,  # the best trial's trained weights
            },
        )
    best_f1 = f"{summary['best_val_f1']:.2f}" if summary["best_val_f1"] is not None else "-"
    print(
        f"search: best {summary['best_point']} val F1 {best_f1}; "
        f"{summary['trials_complete']} complete, {summary['trials_pruned']} pruned, {summary['trials_failed']} failed; "
        f"{summary['wall_seconds']:.0f}s wall ({summary['wall_seconds_total']:.0f}s over all runs of the study), "
        f"~{summary['pruning_saved_seconds']:.0f}s saved by pruning"
    )
    if summary["lead"]:
        print(f"search: {summary['lead']['verdict']}")
    if missing:
        raise SearchIncomplete(
            f"study {name}: no finished trial for {', '.join(missing)}; rerun the search (spanflow tune) "
            "to train only these points"
        )
    return {**summary, "mlflow_parent_run_id": parent}


tune_task = task(tune_stage, name="tune", cache_policy=NO_CACHE)
