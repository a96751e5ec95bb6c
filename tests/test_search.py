"""The grid search on a tiny model: real Optuna storage (SQLite), real MLflow store, real worker
processes. Each valid point is trained once, invalid ones are skipped, failed points are retried by
the next run only, and two workers never train the same point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from spanflow.config import load_config
from tests.helpers import make_tiny_model_dir, tiny_records

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

BIN = Path(sys.executable).parent
# chunk 48 keeps 48 - 16 - 3 = 29 context tokens after a 16-token question: overlap 32 cannot work there
VALID = {"c48-o8-r2", "c48-o8-r4", "c64-o8-r2", "c64-o8-r4", "c64-o32-r2", "c64-o32-r4"}
SKIPPED = {"c48-o32-r2", "c48-o32-r4"}


def squad_json(records: list[dict]) -> dict:
    """Flat records back into SQuAD v1.1 JSON (articles -> paragraphs -> qas)."""
    articles: dict[str, dict[str, list]] = {}
    for r in records:
        paragraphs = articles.setdefault(r["title"], {})
        paragraphs.setdefault(r["context"], []).append(
            {
                "id": r["id"],
                "question": r["question"],
                "answers": [{"text": t, "answer_start": s} for t, s in zip(*r["answers"].values(), strict=True)],
            }
        )
    return {
        "version": "1.1",
        "data": [
            {"title": t, "paragraphs": [{"context": c, "qas": qas} for c, qas in ps.items()]}
            for t, ps in articles.items()
        ],
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture
def project(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory with tiny SQuAD files, params.yaml for a 2 x 2 x 2 grid, prepared splits."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    records = tiny_records(64)
    (root / "data/train.json").write_text(json.dumps(squad_json(records[:48])))
    (root / "data/dev.json").write_text(json.dumps(squad_json(records[48:])))
    params = {
        "data": {"train": "data/train.json", "dev": "data/dev.json", "val_fraction": 0.5},
        "model": {"name_or_path": str(model_dir)},
        "features": {"chunk_length": 64, "overlap": 8, "max_query_length": 16},
        "train": {"batch_size": 4, "learning_rate": 1e-2, "precision": "fp32", "num_threads": 1},
        "eval": {"batch_size": 16},
        "search": {
            "space": {"chunk_length": [48, 64], "overlap": [8, 32], "lora_rank": [2, 4]},
            "trial": {"train_questions": 16, "val_questions": None, "epochs": 2, "max_steps": None},
            "pruner": {"min_steps": 2},  # rungs at steps 2, 4, 8, then the trial's last step
            "heartbeat_seconds": 2,
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    from tasks.prepare import check, load, split_and_write, version_info

    cfg = load_config("params.yaml")
    train, dev = (check(load(p, "train", None, None)) for p in (cfg.data.train, cfg.data.dev))
    split_and_write(train, dev, cfg.data, version_info(train, dev))
    return root


def _study(cfg) -> optuna.Study:
    from spanflow.search.study import study_name

    return optuna.load_study(study_name=study_name(cfg), storage=cfg.search_storage)


def _finished_per_point(study: optuna.Study) -> Counter:
    return Counter(t.user_attrs["point"] for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))


def test_search_trains_each_valid_point_once_skips_invalid_ones_and_nests_runs(project: Path) -> None:
    from mlflow import MlflowClient

    from spanflow.search.best_params import BEST_PARAMS_FILE, final_config
    from tasks.tune import HEATMAP_FILE, TRIALS_FILE, tune_stage

    cfg = load_config("params.yaml")
    summary = tune_stage(cfg)

    study = _study(cfg)
    assert _finished_per_point(study) == Counter({key: 1 for key in VALID})
    assert len(study.trials) == len(VALID)  # nothing else ran, nothing failed
    assert summary["points_skipped"] == 2 and summary["points_missing"] == []
    trials_csv = TRIALS_FILE.read_text()
    for key in SKIPPED:
        assert f"{key},48,32," in trials_csv and "context tokens" in trials_csv
    assert set(study.user_attrs["skipped_points"]) == SKIPPED
    assert HEATMAP_FILE.stat().st_size > 10_000
    # one in-process worker: the backbone loaded once, each (chunk length, overlap) tokenized once per split
    pairs = {(t.params["chunk_length"], t.params["overlap"]) for t in study.trials}
    assert len(pairs) == 3
    by_number = sorted(study.trials, key=lambda t: t.number)
    assert [t.user_attrs["worker_backbone_loads"] for t in by_number] == [1] * len(VALID)
    assert by_number[-1].user_attrs["worker_featurize_calls"] == 2 * len(pairs)

    # the best point: the highest validation F1 among complete trials, handed on to the final stages
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert summary["best_val_f1"] == pytest.approx(best.value)
    chosen = yaml.safe_load(BEST_PARAMS_FILE.read_text())
    assert chosen["params"] == {
        "features.chunk_length": best.params["chunk_length"],
        "features.overlap": best.params["overlap"],
        "method.lora.rank": best.params["lora_rank"],
    }
    final = final_config(cfg)
    assert (final.features.chunk_length, final.features.overlap, final.method.lora.rank) == (
        best.params["chunk_length"],
        best.params["overlap"],
        best.params["lora_rank"],
    )

    # MLflow: one parent run of the search, one nested run per trial with its figures
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    parent = client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.metrics["best_val_f1"] == pytest.approx(best.value)
    assert parent.data.metrics["points_skipped"] == 2
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "search")} >= {
        "search/heatmap.png",
        "search/durations.png",
        "search/trials.csv",
    }
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == len(VALID)
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    for t in study.trials:
        run = by_trial[t.number]
        assert run.data.params["chunk_length"] == str(t.params["chunk_length"])
        assert run.data.metrics["trial_wall_seconds"] > 0 and run.data.metrics["trial_peak_rss_mb"] > 50
        history = client.get_metric_history(run.info.run_id, "val_f1")
        scored_at = [int(k) for k in t.user_attrs["val_f1_by_step"]]
        assert [m.step for m in history] == scored_at  # every rung reached, in MLflow and in Optuna
        assert scored_at[0] == 2 and sorted(t.intermediate_values) == scored_at
        budget = t.user_attrs["budget_steps"]
        if t.state == TrialState.COMPLETE:
            assert scored_at[-1] == budget and run.info.status == "FINISHED"
        else:  # pruned at a rung before its budget, never at its last step
            assert scored_at[-1] < budget and run.info.status == "KILLED"
        per_question = t.user_attrs["val_f1_per_question"]
        assert sorted(map(int, per_question)) == scored_at
        assert sum(per_question[str(scored_at[-1])]) / len(per_question["2"]) == pytest.approx(
            t.user_attrs["val_f1_by_step"][str(scored_at[-1])], abs=0.01
        )

    # the summary weighs the best point's lead against the noise of the validation scores
    lead = summary["lead"]
    assert lead["runner_up"] != summary["best_point"] and lead["lead_low"] <= lead["lead_f1"] <= lead["lead_high"]
    assert lead["separated"] == (lead["lead_low"] > 0) and lead["best_f1_bootstrap_sd"] >= 0
    assert summary["best_point"] in lead["verdict"] and lead["runner_up"] in lead["verdict"]

    # a second run of the same search trains nothing and chooses the same point
    again = tune_stage(cfg)
    assert len(_study(cfg).trials) == len(VALID)
    assert again["best_point"] == summary["best_point"]


def test_a_failed_point_fails_the_search_and_only_it_is_rerun(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spanflow.search.worker
    from spanflow.search.best_params import BEST_PARAMS_FILE
    from spanflow.search.study import SearchIncomplete
    from tasks.tune import tune_stage

    real_train = spanflow.search.worker.train_model

    def train_or_break(prepared, train_feats, val_feats, val_records, cfg, *args, **kwargs):
        if (cfg.features.chunk_length, cfg.features.overlap, cfg.method.lora.rank) == (64, 32, 4):
            raise RuntimeError("out of memory (injected)")
        return real_train(prepared, train_feats, val_feats, val_records, cfg, *args, **kwargs)

    monkeypatch.setattr(spanflow.search.worker, "train_model", train_or_break)
    cfg = load_config("params.yaml", ["search.pruner.name=none"])  # the retry's outcome must not hinge on F1s
    with pytest.raises(SearchIncomplete, match="c64-o32-r4"):
        tune_stage(cfg)
    study = _study(cfg)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.user_attrs["point"] for t in failed] == ["c64-o32-r4"]
    assert "out of memory (injected)" in failed[0].user_attrs["error"]
    assert _finished_per_point(study) == Counter({key: 1 for key in VALID - {"c64-o32-r4"}})
    assert not BEST_PARAMS_FILE.exists()  # no choice from an incomplete grid

    monkeypatch.setattr(spanflow.search.worker, "train_model", real_train)
    summary = tune_stage(cfg)
    study = _study(cfg)
    assert _finished_per_point(study) == Counter({key: 1 for key in VALID})
    assert len(study.trials) == len(VALID) + 1  # only the failed point ran again
    retried = [t for t in study.trials if t.user_attrs["point"] == "c64-o32-r4"]
    assert [(t.state, t.user_attrs["attempt"]) for t in retried] == [(TrialState.FAIL, 0), (TrialState.COMPLETE, 1)]
    assert summary["trials_failed"] == 1 and BEST_PARAMS_FILE.is_file()


def _running_trial(cfg, timeout: float = 180) -> optuna.trial.FrozenTrial:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = _study(cfg).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        if running:
            return running[0]
        time.sleep(0.05)
    raise AssertionError("no trial started")


def test_two_worker_processes_never_repeat_a_point_and_a_killed_one_is_failed(
    project: Path, prefect_server: str
) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    cmd = [str(BIN / "spanflow"), "tune", "--workers", "2", "--set", "search.trial.epochs=4"]
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cfg = load_config("params.yaml", ["search.trial.epochs=4"])
    victim = _running_trial(cfg)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, output

    # the point the victim was on has no finished trial, and the error names it; the rest ran once
    study = _study(cfg)
    finished = _finished_per_point(study)
    (lost,) = VALID - set(finished)
    assert f"no finished trial for {lost}" in output, output
    assert finished == Counter({key: 1 for key in VALID - {lost}})
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) <= 1  # none when the kill fell between two trials
    for t in failed:
        assert (t.user_attrs["point"], t.user_attrs["pid"]) == (lost, victim.user_attrs["pid"])
        assert t.user_attrs["error"] == "worker process died"
    assert len({t.user_attrs["pid"] for t in study.trials}) == 2  # both workers trained

    # rerun: only the killed point is trained again, by two fresh workers
    rerun = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = _study(cfg)
    assert _finished_per_point(study) == Counter({key: 1 for key in VALID})
    assert len(study.trials) == len(VALID) + len(failed)


def test_saved_time_of_a_pruned_trial_is_its_missing_steps() -> None:
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    from spanflow.search.study import trial_rows

    study = optuna.create_study(direction="maximize")
    dists = {
        "chunk_length": CategoricalDistribution([64]),
        "overlap": CategoricalDistribution([8]),
        "lora_rank": CategoricalDistribution([2]),
    }
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params={"chunk_length": 64, "overlap": 8, "lora_rank": 2},
            distributions=dists,
            intermediate_values={25: 10.0},
            user_attrs={
                "point": "c64-o8-r2",
                "steps_run": 25,
                "budget_steps": 100,
                "train_seconds": 30.0,
                "last_val_f1": 10.0,
            },
        )
    )
    (row,) = trial_rows(study, {})
    assert row["state"] == "pruned" and row["saved_seconds"] == pytest.approx(90.0)  # 75 steps at 1.2 s
    assert row["val_f1"] == 10.0 and row["note"] == "pruned at step 25 of 100"


def test_rungs_are_geometric_below_the_budget_and_end_at_it() -> None:
    from spanflow.search.worker import rung_steps, trial_steps

    cfg = load_config(None, ["search.pruner.min_steps=25", "search.pruner.reduction_factor=2"])
    assert rung_steps(cfg, 100) == [25, 50, 100]
    assert rung_steps(cfg, 90) == [25, 50, 90]
    assert rung_steps(cfg, 10) == [10]
    capped = cfg.with_values({"search.trial.max_steps": 100, "search.trial.epochs": 3})
    assert trial_steps(capped, 16 * 40) == 100
    assert trial_steps(capped.with_values({"search.trial.max_steps": None}), 16 * 40 + 1) == 3 * 41


def test_the_study_name_changes_with_what_trials_depend_on_only(project: Path) -> None:
    from spanflow.search.study import study_name

    cfg = load_config("params.yaml")
    name = study_name(cfg)
    unrelated = {
        "registry.min_gain": 1.0,
        "serving.port": 6001,
        "schedule.cron": "0 5 * * *",
        "tracking.experiment": "other",
        "search.workers": 2,
        "search.space.lora_rank": [2, 4, 8],  # a wider grid reuses the finished points
    }
    assert study_name(cfg.with_values(unrelated)) == name
    assert study_name(cfg.with_values({"train.learning_rate": 5e-3})) != name
    assert study_name(cfg.with_values({"search.trial.epochs": 3})) != name
