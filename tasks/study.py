"""Stage study (`spanflow study`): the experiments of a study file, each through the pipeline's own stages in a
process and a workspace of its own (studies/runs/<study>/<experiment>/), then the findings: results/study/findings.md
and the plots.

Every experiment shares params.yaml, the study's base overrides and its step budget; its training run is nested
under one MLflow parent run of the study. An experiment whose workspace holds the result of the same overrides is
skipped, one cut short resumes from its last checkpoint, so a study resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL

from spanflow.answering.bootstrap import question_f1
from spanflow.answering.inference import default_device, load_ensemble_model, resolve_precision
from spanflow.config import Config, load_config
from spanflow.data.squad import read_jsonl
from spanflow.io_utils import atomic_write_json, atomic_write_text
from spanflow.models.modeling import load_saved_tokenizer
from spanflow.paths import METRICS_FILE, MODEL, PREDICTIONS_FILE, PREPARED, RESULTS, TRAIN_SUMMARY_FILE
from spanflow.study.findings import Outcome, data_curve_plot, findings_markdown, judge, pareto_plot
from spanflow.study.spec import BEST_MEMBER, Study
from spanflow.tracking.runs import setup_mlflow
from tasks.ensemble import answer_and_score

STUDY_RESULTS = RESULTS / "study"
RUNS = Path("studies/runs")
SHARED = ("data/squad", "data/leaderboard")  # read by every experiment: linked, not copied


def workspace(root: Path, study: Study, name: str) -> Path:
    ws = root / RUNS / study.name / name
    for shared in SHARED:
        link = ws / shared
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((root / shared).resolve(), target_is_directory=True)
    return ws


def experiment_overrides(cfg: Config, overrides: list[str], study: Study, name: str, parent: str) -> list[str]:
    """The command's, the study's and the experiment's overrides, tracked in the project's MLflow store (`cfg`'s,
    as absolute paths: the experiment runs in its workspace) under the study's parent run."""
    tracking = [
        f"tracking.tracking_uri={json.dumps(cfg.tracking_uri)}",
        f"tracking.artifact_root={json.dumps(str(Path(cfg.tracking.artifact_root).resolve()))}",
        f"tracking.parent_run_id={parent}",
        "search.enabled=false",  # an experiment is one point: the grid search is the pipeline's business
    ]
    return [*overrides, *study.overrides(name), *tracking]


def experiment_settings(params: Path, overrides: list[str], study: Study, name: str) -> dict:
    """What an experiment's result depends on: its overrides and the config they give with params.yaml and the
    command's `overrides` (where it is tracked aside), so that a changed params.yaml reruns the experiments it
    changes and only those."""
    cfg = load_config(params, [*overrides, *study.overrides(name), "search.enabled=false"]).to_dict()
    for section in ("tracking", "registry", "serving", "schedule"):
        cfg.pop(section, None)
    return json.loads(json.dumps({"overrides": study.overrides(name), "config": cfg}, default=str))


def run_experiment(params: Path, overrides: list[str], study: Study, name: str, ws: Path, wanted: dict) -> None:
    """prepare -> featurize -> train -> evaluate in `ws`, in a process of its own (flows/experiment.py: its peak
    memory is its own, not what earlier experiments left in this one); skipped when done with the `wanted`
    settings."""
    done = ws / "experiment.json"
    marker = json.loads(done.read_text()) if done.is_file() else {}
    if marker == {**wanted, "done": True} and (ws / METRICS_FILE).is_file():
        print(f"study {study.name}: {name} already done, skipped")
        return
    print(f"study {study.name}: {name} ({study.describe(name)})")
    cmd = [sys.executable, "-m", "flows.experiment", "--params", str(params), *(f"--set={o}" for o in overrides)]
    if marker == {**wanted, "done": False} and (ws / MODEL / "checkpoints").is_dir():
        cmd.append("--resume")  # cut short before, with these settings: on from its last checkpoint
    atomic_write_json(done, {**wanted, "done": False})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}
    api = PREFECT_API_URL.value()
    if api:  # the experiment's flow run joins this one's server
        env["PREFECT_API_URL"] = api
    if subprocess.run(cmd, cwd=ws, env=env).returncode != 0:
        raise RuntimeError(f"study {study.name}: experiment {name} failed (its log is above); rerun to resume it")
    atomic_write_json(done, {**wanted, "done": True})


def outcome(ws: Path, name: str) -> Outcome:
    metrics = json.loads((ws / METRICS_FILE).read_text())
    metrics["train_steps"] = json.loads((ws / TRAIN_SUMMARY_FILE).read_text())["steps"]
    version = json.loads((ws / PREPARED / "version.json").read_text())
    return Outcome(name, metrics, workspace_f1(ws, ws / PREPARED / "dev.jsonl", metrics), version["split"]["train"])


def workspace_f1(ws: Path, dev: Path, metrics: dict) -> np.ndarray:
    """The F1 (0-100) of every question in `dev` by the predictions in workspace `ws`, in dev order."""
    predictions = json.loads((ws / PREDICTIONS_FILE).read_text())
    return question_f1(read_jsonl(dev), predictions, metrics["squad_version"])


def ensemble_outcome(
    root: Path,
    params: Path,
    overrides: list[str],
    study: Study,
    name: str,
    members: dict[str, Outcome],
    settings: dict[str, dict],
) -> Outcome:
    """The ensemble `name` of the study's trained experiments, answering the dev questions (with its first member's
    chunking and decoding) in a workspace of its own; skipped when done with the same members. Its costs are its
    members' together: the sum of their training time and parameters, the larger of their peak memories."""
    spec = study.ensembles[name]
    ws = root / RUNS / study.name / name
    wanted = {"members": {m: settings[m] for m in spec.members}, "rule": spec.rule}
    done = ws / "experiment.json"
    if not (done.is_file() and json.loads(done.read_text()) == wanted and (ws / METRICS_FILE).is_file()):
        print(f"study {study.name}: {name} ({study.describe(name)})")
        first = root / RUNS / study.name / spec.members[0]
        own = load_config(params, [*overrides, *study.overrides(spec.members[0])])
        device = default_device()
        precision = resolve_precision(own.train.precision, device)
        dirs = [root / RUNS / study.name / m / MODEL / "hf" for m in spec.members]
        model = load_ensemble_model(dirs, spec.rule, precision, device)
        records = read_jsonl(first / PREPARED / "dev.jsonl")
        version = members[spec.members[0]].metrics["squad_version"]
        tokenizer = load_saved_tokenizer(dirs[0])
        predictions, scores, _ = answer_and_score(own, model, tokenizer, precision, records, version)
        of = [members[m].metrics for m in spec.members]
        metrics = {
            **{k: round(v, 3) for k, v in scores.items()},
            "squad_version": version,
            "dev_questions": len(records),
            "train_seconds": sum(m["train_seconds"] for m in of),
            "train_peak_rss_mb": max(m["train_peak_rss_mb"] for m in of),
            "trainable_params": sum(m["trainable_params"] for m in of),
            "total_params": sum(m["total_params"] for m in of),
            "train_steps": sum(m["train_steps"] for m in of),
        }
        atomic_write_json(ws / PREDICTIONS_FILE, predictions)
        atomic_write_json(ws / METRICS_FILE, metrics)
        atomic_write_json(done, wanted)
    metrics = json.loads((ws / METRICS_FILE).read_text())
    f1 = workspace_f1(ws, root / RUNS / study.name / spec.members[0] / PREPARED / "dev.jsonl", metrics)
    return Outcome(name, metrics, f1, max(members[m].train_questions for m in spec.members))


def study_stage(
    cfg: Config, study: Study, params: str = "params.yaml", overrides: list[str] | None = None, command: str = ""
) -> dict:
    """Run the study's experiments (resuming, skipping what is done) and write its findings."""
    root = Path.cwd()
    with mlflow.start_run(experiment_id=setup_mlflow(cfg), run_name=f"study-{study.name}") as parent:
        mlflow.log_params({"study.name": study.name, "study.steps": study.steps, "study.file": str(study.path)})
        parent_id = parent.info.run_id
    params_file, overrides = Path(params).resolve(), overrides or []
    outcomes: dict[str, Outcome] = {}
    settings = {name: experiment_settings(params_file, overrides, study, name) for name in study.experiments}
    for name in study.experiments:
        ws = workspace(root, study, name)
        extra = experiment_overrides(cfg, overrides, study, name, parent_id)
        run_experiment(params_file, extra, study, name, ws, settings[name])
        outcomes[name] = outcome(ws, name)
    for name in study.ensembles:
        outcomes[name] = ensemble_outcome(root, params_file, overrides, study, name, outcomes, settings)
    sides = dict(outcomes)  # what a claim may name: experiments, ensembles, and each ensemble's best member
    for name, spec in study.ensembles.items():
        best = max(spec.members, key=lambda m: outcomes[m].metrics["f1"])
        sides[f"{name}{BEST_MEMBER}"] = outcomes[best]
    dev_ids = {n: len(o.question_f1) for n, o in outcomes.items()}
    if len(set(dev_ids.values())) != 1:
        raise ValueError(
            f"study {study.name}: the experiments answered different dev sets {dev_ids}; keep data.dev alike"
        )
    findings = [judge(c, sides[c.a], sides[c.b], cfg.registry) for c in study.claims]
    STUDY_RESULTS.mkdir(parents=True, exist_ok=True)
    markdown = findings_markdown(study, outcomes, findings, command or f"spanflow study --file {study.path}")
    atomic_write_text(STUDY_RESULTS / "findings.md", markdown)
    summary = {
        "study": study.name,
        "steps": study.steps,
        "experiments": {
            n: {
                k: o.metrics[k]
                for k in ("exact_match", "f1", "train_seconds", "train_peak_rss_mb", "trainable_params", "total_params")
            }
            for n, o in outcomes.items()
        },
        "findings": [{"claim": f.claim.claim, "measured": f.measured, "verdict": f.verdict} for f in findings],
        "mlflow_parent_run_id": parent_id,
    }
    atomic_write_json(STUDY_RESULTS / "summary.json", summary)
    plots = [pareto_plot(outcomes, STUDY_RESULTS / "pareto.png")]
    if study.data_curve:
        plots.append(data_curve_plot([outcomes[n] for n in study.data_curve], STUDY_RESULTS / "data_curve.png"))
    with mlflow.start_run(run_id=parent_id):
        mlflow.log_metrics({f"{n}_dev_f1": o.metrics["f1"] for n, o in outcomes.items()})
        mlflow.log_artifact(str(STUDY_RESULTS / "findings.md"), "study")
        mlflow.log_artifact(str(STUDY_RESULTS / "summary.json"), "study")
        for plot in plots:
            mlflow.log_artifact(str(plot), "study")
    print(markdown)
    return summary


study_task = task(study_stage, name="study", cache_policy=NO_CACHE)
