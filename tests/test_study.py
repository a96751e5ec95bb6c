"""spanflow study: a study file's experiments on one pipeline, and the findings on its claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from spanflow.answering.squad_metrics import score
from spanflow.config import RegistryConfig
from spanflow.data.squad import read_jsonl
from spanflow.study.findings import Outcome, judge
from spanflow.study.spec import Claim, StudyError, load_study
from tests.test_pipeline_integration import project  # noqa: F401  (the tiny project: a fixture)


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


STUDY = {
    "name": "tiny",
    "steps": 3,
    "base": ["train.include_validation=false"],
    "experiments": {"lora": [], "full": ["method.name=full"]},
    "ensembles": {"both": {"members": ["lora", "full"], "rule": "max"}},
    "data_curve": ["full", "lora"],
    "claims": [
        {"claim": "LoRA beats full fine-tuning", "source": "a test", "a": "lora", "b": "full"},
        {
            "claim": "full costs more memory",
            "source": "a test",
            "a": "lora",
            "b": "full",
            "expect": "lower",
            "metric": "trainable_params",
            "ratio": 0.5,
        },
        {"claim": "ensembling helps", "source": "a test", "a": "both", "b": "both.best_member"},
    ],
    "quick": {"steps": 2, "set": ["data.dev_limit=20"]},
}


def test_a_study_file_is_checked_before_anything_runs(tmp_path: Path):
    bad_claim = {**STUDY, "claims": [{"claim": "x", "source": "y", "a": "lora", "b": "nope"}]}
    with pytest.raises(StudyError, match="names no experiment or ensemble 'nope'"):
        load_study(_write(tmp_path / "a.yaml", bad_claim))
    for ensemble, named in (
        ({"members": ["lora", "nope"]}, r"ensembles\.e\.members: no experiment \['nope'\]"),
        ({"members": ["lora", "lora"]}, r"ensembles\.e\.members: two or more different"),
        ({"members": ["lora", "full"], "rule": "median"}, r"ensembles\.e\.rule 'median'"),
        ({"members": ["lora", "full"], "weights": [1, 2]}, r"ensembles\.e: .*weights"),
    ):
        with pytest.raises(StudyError, match=named):
            load_study(_write(tmp_path / "e.yaml", {**STUDY, "ensembles": {"e": ensemble}}))
    with pytest.raises(StudyError, match=r"expect 'worse'"):
        load_study(_write(tmp_path / "b.yaml", {**STUDY, "claims": [{**STUDY["claims"][0], "expect": "worse"}]}))
    with pytest.raises(StudyError, match="experiments.full: expected a list of KEY=VALUE"):
        load_study(_write(tmp_path / "c.yaml", {**STUDY, "experiments": {"full": "method.name=full"}}))
    with pytest.raises(StudyError, match="not found"):
        load_study(tmp_path / "missing.yaml")
    quick = load_study(_write(tmp_path / "d.yaml", STUDY), quick=True)
    assert quick.steps == 2 and quick.overrides("full")[-2:] == ["data.dev_limit=20", "train.max_steps=2"]
    assert load_study(tmp_path / "d.yaml").overrides("full") == [
        "train.include_validation=false",
        "train.max_steps=3",
        "method.name=full",
    ]


def test_an_experiment_is_redone_when_its_config_changes_not_its_tracking(tmp_path: Path):
    from tasks.study import experiment_settings

    study = load_study(_write(tmp_path / "s.yaml", STUDY))
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    lora = experiment_settings(params, [], study, "lora")
    assert lora == experiment_settings(params, ["tracking.experiment=elsewhere"], study, "lora")
    assert lora["config"]["method"]["name"] == "lora" and lora["overrides"] == study.overrides("lora")
    assert experiment_settings(params, [], study, "full")["config"]["method"]["name"] == "full"
    changed = experiment_settings(params, ["train.learning_rate=1e-3"], study, "lora")
    assert changed != lora and changed["config"]["train"]["learning_rate"] == 1e-3


def _outcome(name: str, f1: np.ndarray, **metrics: float) -> Outcome:
    return Outcome(name, {"f1": float(f1.mean()), **metrics}, f1, 100)


def test_verdicts_follow_the_paired_interval():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, 400)
    gate = RegistryConfig(bootstrap_resamples=1000)
    better, same = _outcome("a", np.clip(base + 10, 0, 100)), _outcome("a", base + rng.normal(0, 0.1, 400))
    b = _outcome("b", base)
    claim = Claim("a beats b", "test", "a", "b")
    assert judge(claim, better, b, gate).verdict == "holds"
    assert judge(claim, b, better, gate).verdict == "does not hold"
    assert judge(Claim("a = b", "test", "a", "b", expect="equal", margin=1.0), same, b, gate).verdict == "holds"
    assert judge(Claim("a = b", "test", "a", "b", expect="equal", margin=1.0), better, b, gate).verdict == (
        "does not hold"
    )
    noisy = _outcome("a", np.clip(base + rng.normal(0, 30, 400), 0, 100))
    assert judge(claim, noisy, b, gate).verdict == "inconclusive here"
    cheap = Claim("a uses less", "test", "a", "b", expect="lower", metric="train_peak_rss_mb", ratio=0.5)
    low, high = _outcome("a", base, train_peak_rss_mb=400.0), _outcome("b", base, train_peak_rss_mb=1000.0)
    assert judge(cheap, low, high, gate).verdict == "holds" and judge(cheap, high, low, gate).verdict == "does not hold"


def test_study_flow_runs_every_experiment_once_nested_in_mlflow(request: pytest.FixtureRequest, prefect_server: str):
    from mlflow import MlflowClient

    from flows.stages import study_flow

    root = request.getfixturevalue("project")  # a tiny copy of the project, as the current directory
    # mlflow.set_tracking_uri in an earlier test exports MLFLOW_TRACKING_URI, which would outrank params.yaml here
    request.getfixturevalue("monkeypatch").delenv("MLFLOW_TRACKING_URI", raising=False)

    study_file = _write(root / "tiny-study.yaml", STUDY)
    summary = study_flow("params.yaml", ["data.dev_limit=20"], str(study_file))
    findings = (root / "results/study/findings.md").read_text()
    assert "| LoRA beats full fine-tuning | a test | lora vs full (better) |" in findings
    assert "trainable_params lora / full" in findings and "| full | `method.name=full` |" in findings
    assert {f["verdict"] for f in summary["findings"]} <= {"holds", "does not hold", "inconclusive here"}
    assert summary["findings"][1]["verdict"] == "holds"  # LoRA trains far fewer parameters
    assert (root / "results/study/pareto.png").is_file() and (root / "results/study/data_curve.png").is_file()
    for name in STUDY["experiments"]:
        metrics = json.loads((root / f"studies/runs/tiny/{name}/results/metrics.json").read_text())
        assert metrics["dev_questions"] == 20
    assert summary["experiments"]["full"]["trainable_params"] > summary["experiments"]["lora"]["trainable_params"]
    # the ensemble answered with both trained models; its costs are theirs together, its F1 its own predictions'
    both, members = summary["experiments"]["both"], [summary["experiments"][m] for m in ("lora", "full")]
    assert both["trainable_params"] == sum(m["trainable_params"] for m in members)
    assert both["train_peak_rss_mb"] == max(m["train_peak_rss_mb"] for m in members)
    records = read_jsonl(root / "studies/runs/tiny/lora/data/prepared/dev.jsonl")
    predictions = json.loads((root / "studies/runs/tiny/both/results/predictions.json").read_text())
    assert len(predictions) == 20 and both["f1"] == pytest.approx(score(records, predictions, "1.1")["f1"], abs=1e-3)
    best = max(("lora", "full"), key=lambda m: summary["experiments"][m]["f1"])
    assert f"vs {best} " in summary["findings"][2]["measured"] and "| both | `max of lora + full` |" in findings

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    parent = summary["mlflow_parent_run_id"]
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.params["method.name"] for r in children) == ["full", "lora"]
    assert "study/findings.md" in {a.path for a in client.list_artifacts(parent, "study")}

    again = study_flow("params.yaml", ["data.dev_limit=20"], str(study_file))  # all done: nothing retrains
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{again['mlflow_parent_run_id']}'"
    )
    assert children == [] and again["experiments"] == summary["experiments"]
