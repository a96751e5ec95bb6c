"""Stage tune: an Optuna study over chunk_length x overlap x lora_rank, shared by any number of
workers through one storage URL, with one nested MLflow run per trial under the search's parent
run. Writes `results/best_params.yaml` for the final stages, and `results/search/` (trials table,
summary, heatmaps, durations) for people.

Each valid grid point is trained exactly once across all workers (see tasks/grid_claims.py).
A point whose trial failed (exception, killed worker, lost heartbeat) is retried by the next run of
the search; points with a finished (complete or pruned) trial never are.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import time
import warnings
from dataclasses import asdict
from typing import Any

import mlflow
import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from prefect import task
from prefect.cache_policies import NO_CACHE
from sqlalchemy.engine import make_url

from spanflow.config import Config
from spanflow.paths import PREPARED, RESULTS
from tasks.best_params import write_best_params
from tasks.grid import SEARCHED_KEYS, GridPoint, split_grid
from tasks.grid_claims import ClaimBoard, utc_now
from tasks.grid_lead import best_lead
from tasks.io_utils import atomic_write_json, atomic_write_text
from tasks.plots import search_durations, search_heatmaps
from tasks.search_worker import (
    SearchContext,
    SearchWorker,
    make_pruner,
    open_storage,
    trial_config,
    worker_id,
    worker_main,
)
from tasks.tracking import git_commit, prefect_tags, setup_mlflow
from tasks.warm_start import fetch_best_trial_weights

SEARCH_DIR = RESULTS / "search"
TRIALS_FILE = SEARCH_DIR / "trials.csv"
SUMMARY_FILE = SEARCH_DIR / "summary.json"
HEATMAP_FILE = SEARCH_DIR / "heatmap.png"
DURATIONS_FILE = SEARCH_DIR / "durations.png"
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


def _open_study(cfg: Config, name: str, storage: optuna.storages.RDBStorage) -> optuna.Study:
    space = asdict(cfg.search.space)
    return optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.GridSampler(space, seed=cfg.train.seed),
        pruner=make_pruner(cfg),
        direction="maximize",
        load_if_exists=True,
    )


def _parent_run(cfg: Config, study: optuna.Study) -> str:
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


def _run_workers(ctx: SearchContext, workers: int, storage: optuna.storages.RDBStorage) -> None:
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


def _wait_for_others(study: optuna.Study, points: list[GridPoint], grace_seconds: int) -> None:
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
    """The best point's lead over the runner-up against the noise (tasks/grid_lead.py)."""
    if best is None:
        return None
    attrs = {t.number: t.user_attrs for t in study.get_trials(deepcopy=False)}
    scored = [r for r in rows if r["state"] in ("complete", "pruned") and r["trial"] != best["trial"]]
    ranked = [best, *sorted(scored, key=lambda r: (-(r["steps_run"] or 0), -(r["val_f1"] or 0)))]
    trials = [{"point": r["point"], "per_question": attrs[r["trial"]].get("val_f1_per_question", {})} for r in ranked]
    return best_lead(trials, seed)


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


def _summarize(
    study: optuna.Study, rows: list[dict], points: list[GridPoint], wall: float, seed: int
) -> dict[str, Any]:
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
    study = _open_study(cfg, name, storage)
    study.set_user_attr("skipped_points", {p.key: reason for p, reason in skipped.items()})
    board = ClaimBoard(url)
    grace = 3 * cfg.search.heartbeat_seconds
    work = plan(study, board, points, grace)
    board.dispose()
    print(
        f"study {name} on {redact(url)}: {len(points)} points ({len(skipped)} skipped), "
        f"{len(work['done'])} already done, {len(work['busy'])} running elsewhere, {len(work['todo'])} to train"
    )
    parent = _parent_run(cfg, study)
    ctx = SearchContext(cfg, name, url, parent, tuple(work["todo"]))
    if work["todo"]:
        _run_workers(ctx, workers or cfg.search.workers, storage)
    _wait_for_others(study, points, grace)

    rows = trial_rows(study, skipped)
    wall = time.perf_counter() - t0
    study.set_user_attr("wall_seconds_total", study.user_attrs.get("wall_seconds_total", 0.0) + wall)
    summary = _summarize(study, rows, points, wall, cfg.train.seed)
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
