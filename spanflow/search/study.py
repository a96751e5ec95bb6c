"""The grid search's study: its name, which points are still to train, the workers that train them, and
the summary of its trials (the tune stage, tasks/tune.py, writes the files).

Each valid grid point is trained exactly once across all workers (see spanflow/search/claims.py).
A point whose trial failed (exception, killed worker, lost heartbeat) is retried by the next run of
the search; points with a finished (complete or pruned) trial never are.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
import warnings
from dataclasses import asdict
from typing import Any

import mlflow
import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from spanflow.config import Config
from spanflow.paths import PREPARED
from spanflow.search.claims import ClaimBoard, utc_now
from spanflow.search.grid import SEARCHED_KEYS, GridPoint, grid_space
from spanflow.search.lead import best_lead
from spanflow.search.worker import (
    SearchContext,
    SearchWorker,
    make_pruner,
    trial_config,
    worker_id,
    worker_main,
)
from spanflow.tracking.runs import git_commit, setup_mlflow

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SearchIncomplete(RuntimeError):
    """Some grid points have no finished trial; rerunning the search runs exactly those."""


def redact(url: str) -> str:
    """The storage URL without its password, for logs and tags."""
    return make_url(url).render_as_string(hide_password=True)


TRIAL_SECTIONS = ("data", "model", "features", "method", "train", "eval")  # what a trial's result depends on


def study_name(cfg: Config) -> str:
    """The configured name plus a hash of everything a trial's result depends on except the grid
    itself, so a changed setting starts a fresh study and a widened grid reuses finished points."""
    version = json.loads((PREPARED / "version.json").read_text())
    template = trial_config(cfg, GridPoint(cfg.features.chunk_length, cfg.features.overlap, cfg.method.lora.rank))
    blob = {k: v for k, v in template.to_dict().items() if k in TRIAL_SECTIONS}
    blob["train"].pop("num_threads")
    blob["eval"].pop("batch_size")
    for dotted in SEARCHED_KEYS.values():
        section, *rest = dotted.split(".")
        node = blob[section]
        for part in rest[:-1]:
            node = node[part]
        node.pop(rest[-1])
    blob["data_version"] = {"train": version["train"]["content_sha256"], "split": version["split"]}
    blob["trial"] = asdict(cfg.search.trial)
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{cfg.search.study_name}-{digest}"


def _trials_by_point(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    out: dict[str, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.user_attrs.get("point", ""), []).append(t)
    return out


def plan(study: optuna.Study, board: ClaimBoard, points: list[GridPoint], grace_seconds: int) -> dict[str, Any]:
    """Which points this session trains and with which attempt number; which are done or busy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # workers that died without a word
    trials = _trials_by_point(study)
    claims: dict[str, list[dict]] = {}
    for c in board.claims(study.study_name):
        claims.setdefault(c["point"], []).append(c)
    todo, done, busy = [], [], []
    now = utc_now()
    for point in points:
        states = [t.state for t in trials.get(point.key, [])]
        point_claims = claims.get(point.key, [])
        fresh_unstarted = any(  # claimed a moment ago, its trial about to be created
            c["trial_number"] is None and (now - c["claimed_at"]).total_seconds() < grace_seconds for c in point_claims
        )
        if any(s in FINISHED for s in states):
            done.append(point)
        elif TrialState.RUNNING in states or fresh_unstarted:
            busy.append(point)
        else:
            todo.append((point, len(point_claims)))  # attempt n+1 after n failed or lost ones
    return {"todo": todo, "done": done, "busy": busy}


def open_study(cfg: Config, name: str, storage: optuna.storages.RDBStorage) -> optuna.Study:
    space = grid_space(cfg)  # the sampler's grid is the points' (other methods than LoRA: one rank)
    return optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.GridSampler(space, seed=cfg.train.seed),
        pruner=make_pruner(cfg),
        direction="maximize",
        load_if_exists=True,
    )


def parent_run(cfg: Config, study: optuna.Study) -> str:
    """The search's MLflow run: created once per study, reopened when the search is resumed."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    experiment_id = setup_mlflow(cfg)
    if run_id:
        try:
            mlflow.get_run(run_id)
            return run_id
        except mlflow.exceptions.MlflowException:
            pass  # another tracking store than the one the study was started with
    run = mlflow.MlflowClient().create_run(
        experiment_id,
        run_name=f"search-{study.study_name}",
        tags={"optuna.study": study.study_name, "spanflow.stage": "tune", "git_commit": git_commit()},
    )
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def run_workers(ctx: SearchContext, workers: int, storage: optuna.storages.RDBStorage) -> None:
    """One worker in this process, or `workers` spawned processes; a dead process's trial is failed."""
    if workers == 1:
        SearchWorker(ctx).run()
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=worker_main, args=(ctx, threads), name=f"search-worker-{i}") for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
        dead = {p.pid for p in procs if p.exitcode != 0}
        if dead:
            _fail_trials_of(ctx, storage, dead)


def _fail_trials_of(ctx: SearchContext, storage: optuna.storages.RDBStorage, pids: set[int | None]) -> None:
    """Dead worker processes: their running trials fail now (not a heartbeat grace later), and a
    claim they made without starting its trial is released."""
    board = ClaimBoard(ctx.storage_url)
    for pid in pids:
        board.release_unstarted(ctx.study_name, worker_id(pid))
    board.dispose()
    study = optuna.load_study(study_name=ctx.study_name, storage=storage)
    study_id = storage.get_study_id_from_name(ctx.study_name)
    client = mlflow.MlflowClient()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("pid") in pids:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "error", "worker process died")  # first: a finished trial is final
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            if run_id := t.user_attrs.get("mlflow_run_id"):
                client.set_terminated(run_id, "KILLED")
            print(f"trial {t.number} {t.user_attrs.get('point')}: failed, its worker (pid {t.user_attrs['pid']}) died")


def wait_for_others(study: optuna.Study, points: list[GridPoint], grace_seconds: int) -> None:
    """Points still running on other machines: wait for them (dead ones are failed by heartbeat)."""
    keys = {p.key for p in points}
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        running = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("point") in keys
        ]
        if not running:
            return
        print(f"waiting for {len(running)} trial(s) running on other workers")
        time.sleep(min(10, grace_seconds))


def trial_rows(study: optuna.Study, skipped: dict[GridPoint, str]) -> list[dict[str, Any]]:
    """One row per trial, plus one per skipped point: the table behind the plots. A trial's F1 is the one at
    the last step it trained: its budget when complete, the rung where it stopped when pruned."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        steps, budget = t.user_attrs.get("steps_run", 0), t.user_attrs.get("budget_steps")
        train_seconds = t.user_attrs.get("train_seconds")
        row = {
            "trial": t.number,
            "point": t.user_attrs.get("point"),
            **t.params,
            "state": t.state.name.lower(),
            "val_f1": t.value if t.value is not None else t.user_attrs.get("last_val_f1"),
            "val_exact_match": t.user_attrs.get("val_exact_match"),
            "steps_run": steps,
            "budget_steps": budget,
            "seconds": t.user_attrs.get("seconds"),
            "saved_seconds": 0.0,
            "peak_rss_mb": t.user_attrs.get("peak_rss_mb"),
            "worker": t.user_attrs.get("worker"),
            "attempt": t.user_attrs.get("attempt"),
            "note": t.user_attrs.get("error", ""),
        }
        if t.state == TrialState.PRUNED and steps and budget and train_seconds:
            row["saved_seconds"] = round((budget - steps) * train_seconds / steps, 2)  # the steps it did not train
            row["note"] = f"pruned at step {steps} of {budget}"
        rows.append(row)
    for point, reason in skipped.items():
        rows.append({"trial": None, "point": point.key, **point.params(), "state": "skipped", "note": reason})
    return rows


def lead_of_best(study: optuna.Study, rows: list[dict], best: dict | None, seed: int) -> dict | None:
    """The best point's lead over the runner-up against the noise (spanflow/search/lead.py)."""
    if best is None:
        return None
    attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
    scored = [r for r in rows if r["state"] in ("complete", "pruned") and r["trial"] != best["trial"]]
    ranked = [best, *sorted(scored, key=lambda r: (-(r["steps_run"] or 0), -(r["val_f1"] or 0)))]
    trials = [{"point": r["point"], "per_question": attrs[r["trial"]].get("val_f1_per_question", {})} for r in ranked]
    return best_lead(trials, seed)


def summarize(study: optuna.Study, rows: list[dict], points: list[GridPoint], wall: float, seed: int) -> dict[str, Any]:
    trials = [r for r in rows if r["state"] != "skipped"]
    count = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "skipped")}
    finished = {r["point"] for r in trials if r["state"] in ("complete", "pruned")}
    complete = [r for r in trials if r["state"] == "complete"]
    order = {p.key: i for i, p in enumerate(points)}
    best = max(complete, key=lambda r: (r["val_f1"], -order.get(r["point"], 0)), default=None)
    return {
        "study": study.study_name,
        "grid_points": len(points) + count["skipped"],
        "trials_complete": count["complete"],
        "trials_pruned": count["pruned"],
        "trials_failed": count["fail"],
        "points_skipped": count["skipped"],
        "points_missing": sorted(p.key for p in points if p.key not in finished),
        "best_trial": best["trial"] if best else None,
        "best_point": best["point"] if best else None,
        "best_val_f1": best["val_f1"] if best else None,
        "best_val_exact_match": best["val_exact_match"] if best else None,
        "best_params": {SEARCHED_KEYS[k]: best[k] for k in SEARCHED_KEYS} if best else None,
        "wall_seconds": round(wall, 1),  # this run of the search
        "wall_seconds_total": round(study.user_attrs["wall_seconds_total"], 1),  # all runs of this study
        "trial_seconds_total": round(sum(r["seconds"] or 0 for r in trials), 1),
        "pruning_saved_seconds": round(sum(r["saved_seconds"] or 0 for r in trials), 1),
        "lead": lead_of_best(study, rows, best, seed),
    }
