"""The real qa-pipeline on a small slice, in a temporary project: real Prefect (temporary server),
real MLflow (SQLite store + ./mlruns), real DVC (`dvc repro` in a fresh git repo)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import make_tiny_albert_dir, make_tiny_llama_dir, make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _small_params(model_dir: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(train_limit=600, dev_limit=40, val_fraction=0.5)
    params["model"]["name_or_path"] = str(model_dir)
    params["features"].update(chunk_length=96, overlap=32, max_query_length=24)
    params["train"].update(epochs=2, max_steps=6, batch_size=8, log_every_steps=2)
    params["registry"]["model_name"] = "spanflow-qa-test"
    # 3 trials; (64, 48) leaves 64 - 24 - 3 = 37 context tokens, less than the overlap: skipped
    params["search"].update(heartbeat_seconds=2, workers=1)
    params["search"]["space"] = {"chunk_length": [64, 96], "overlap": [32, 48], "lora_rank": [4]}
    params["search"]["trial"] = {"train_questions": 16, "epochs": 2, "max_steps": None}
    return params


def spanflow_run(project: Path, overrides: list[str], env: dict) -> subprocess.CompletedProcess:
    """`spanflow run --set ...` in `project`; fails the test with the end of its stderr unless it succeeds."""
    run = subprocess.run(
        [str(BIN / "spanflow"), "run", *(arg for o in overrides for arg in ("--set", o))],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's pipeline files with a tiny local model, as a fresh git + DVC repo."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore", "tasks", "spanflow"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    shutil.copytree(REPO / "data" / "squad", root / "data" / "squad")
    shutil.copytree(REPO / "data" / "leaderboard", root / "data" / "leaderboard")
    model_dir = make_tiny_model_dir(tmp_path / "tiny-bert")
    (root / "params.yaml").write_text(yaml.safe_dump(_small_params(model_dir), sort_keys=False))
    monkeypatch.chdir(root)
    return root


def _git_dvc_init(root: Path) -> None:
    for cmd in (
        ["git", "init", "-q"],
        [str(BIN / "dvc"), "init", "-q"],
        [str(BIN / "dvc"), "config", "core.analytics", "false"],
    ):
        subprocess.run(cmd, cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], cwd=root, check=True)


def test_qa_pipeline_flow_lands_in_mlflow_prefect_and_registry(project: Path, prefect_server: str) -> None:
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import qa_pipeline

    out = qa_pipeline(params="params.yaml")

    # files each stage wrote
    predictions = json.loads((project / "results" / "predictions.json").read_text())
    dev_ids = [json.loads(line)["id"] for line in (project / "data/prepared/dev.jsonl").read_text().splitlines()]
    assert list(predictions) == dev_ids and len(dev_ids) == 40
    assert all(isinstance(v, str) for v in predictions.values())
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert 0 <= metrics["f1"] <= 100 and metrics["dev_questions"] == 40
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert "| system | EM | F1 |" in out["report"] and "Logistic Regression" in out["report"]

    # the search ran first; the final model was trained with its best point on all training articles
    search = out["search"]
    assert search["trials_complete"] + search["trials_pruned"] == 3 and search["points_skipped"] == 1
    best_file = yaml.safe_load((project / "results/best_params.yaml").read_text())
    best = best_file["params"]
    assert best == search["best_params"]
    # ... starting from the best trial's weights, which its MLflow run holds
    assert best_file["warm_start"] == "models/search/best_trial.safetensors"
    assert (project / best_file["warm_start"]).is_file()
    train_json = json.loads((project / "models/final/train.json").read_text())
    assert train_json["warm_start"] == best_file["warm_start"]
    assert train_json["trial_questions_skipped"] == 16  # ... and going on with the questions the trials did not see

    # MLflow: params, per-epoch metrics, tags, artifacts
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(out["run_id"])
    assert run.data.params["features.chunk_length"] == str(best["features.chunk_length"])
    assert run.data.params["features.overlap"] == str(best["features.overlap"])
    assert run.data.params["train.include_validation"] == "True"
    assert run.data.tags["search.mlflow_parent_run_id"] == search["mlflow_parent_run_id"]
    assert run.data.params["method.name"] == "lora"
    assert run.data.metrics["dev_f1"] == pytest.approx(metrics["f1"])
    assert "dev_trainable_params" not in run.data.metrics and "seconds" not in run.data.metrics  # one name each
    assert run.info.run_name == f"lora-c{best['features.chunk_length']}-o{best['features.overlap']}-r4"
    assert run.data.tags["mlflow.note.content"].startswith("Final model: lora")
    inputs = {
        (d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context"))
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {("squad-train", "training"), ("squad-dev", "evaluation")}  # validation articles trained on
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 1
    lr = client.get_metric_history(run.info.run_id, "learning_rate")  # every 2 of the 6 steps
    assert [m.step for m in lr] == [2, 4, 6] and all(m.value > 0 for m in lr[:-1])
    assert len(client.get_metric_history(run.info.run_id, "train_loss_step")) == 3
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{search['mlflow_parent_run_id']}'"
    )
    assert len(children) == 3
    assert run.data.tags["train.warm_start"] == best_file["warm_start"]
    best_trial = next(c for c in children if c.info.run_id == best_file["mlflow_run_id"])
    assert [a.path for a in client.list_artifacts(best_trial.info.run_id, "trial")] == ["trial/trainable.safetensors"]
    md5 = hashlib.md5((project / "data/squad/train-v1.1.json.gz").read_bytes()).hexdigest()
    assert run.data.tags["data.train.dvc_md5"] == md5
    assert len(run.data.tags["data.train.content_sha256"]) == 64
    assert run.data.tags["git_commit"]
    assert run.data.tags["prefect.flow_run_id"] == out["flow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.json", "metrics.json", "config", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {
        "plots/learning_curves.png",
        "plots/history.csv",
    }
    assert (project / "mlruns").is_dir() and any((project / "mlruns").iterdir())

    # registry: the first model is challenger and champion -> a pyfunc that answers over a long context
    version = client.get_model_version_by_alias("spanflow-qa-test", "challenger")
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("spanflow-qa-test", "champion").version == version.version
    assert out["promotion"]["promoted"] and f"v{version.version} promoted to `@champion`" in out["report"]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/spanflow-qa-test@challenger")
    context = " ".join(f"Sentence number {i} talks about nothing at all." for i in range(120))
    context += " The capital of France is Paris."
    import pandas as pd

    answer = model.predict(pd.DataFrame({"question": ["What is the capital of France?"], "context": [context]}))
    row = answer.iloc[0]
    assert context[row["start"] : row["end"]] == row["answer"]
    assert len(row["answer"]) > 0

    # Prefect: the flow run completed on the server, with its results artifact (server REST API)
    flow_run = httpx.get(f"{prefect_server}/flow_runs/{out['flow_run_id']}").json()
    assert flow_run["state"]["type"] == "COMPLETED"
    assert flow_run["name"] in out["report"]
    found = httpx.post(
        f"{prefect_server}/artifacts/filter",
        json={"artifacts": {"key": {"any_": ["qa-results"]}, "flow_run_id": {"any_": [out["flow_run_id"]]}}},
    ).json()
    assert len(found) == 1 and found[0]["type"] == "markdown"  # other tests' flow runs have theirs
    assert "| system | EM | F1 |" in found[0]["data"]


def test_squad2_profile_tunes_the_threshold_on_validation_and_serves_it(project: Path, prefect_server: str) -> None:
    """`--profile squad2`: abstain articles outside the test articles train and validate, the threshold is tuned on
    validation, the v2.0 figures are reported beside the v2.0 leaderboard and the registered version abstains by
    the tuned threshold."""
    import mlflow

    from flows.pipeline import qa_pipeline
    from spanflow.config import profile_overrides

    overrides = profile_overrides(str(REPO / "profiles/squad2.yaml"))
    out = qa_pipeline(
        params="params.yaml",
        overrides=[*overrides, "search.enabled=false", "data.train_articles=2", "data.abstain_articles=2"],
    )
    prepared = {
        s: [json.loads(x) for x in (project / f"data/prepared/{s}.jsonl").read_text().splitlines()]
        for s in ("train", "val", "dev")
    }
    assert not {r["title"] for r in prepared["dev"]} & {r["title"] for r in prepared["train"] + prepared["val"]}
    assert any(r["is_impossible"] for r in prepared["train"]) and any(r["is_impossible"] for r in prepared["val"])
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert metrics["squad_version"] == "2.0" and metrics["dev_questions"] == 40
    assert metrics["no_answer_threshold_tuned_on"] == len(prepared["val"])
    assert {"HasAns_f1", "NoAns_f1", "best_f1", "best_f1_thresh"} <= set(metrics)
    assert 0 <= metrics["bertscore_f1"] <= 100 and "BERTScore F1 of our answers" in out["report"]
    assert "learned to abstain" in out["report"] and "BERT single model" in out["report"]

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    local = Path(mlflow.artifacts.download_artifacts("models:/spanflow-qa-test@challenger"))
    settings = json.loads(next(local.rglob("settings.json")).read_text())
    assert settings["squad_version"] == "2.0"
    assert settings["no_answer_threshold"] == pytest.approx(metrics["no_answer_threshold"], abs=1e-4)


def _dvc(root: Path, *args: str, env: dict) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_dvc_repro_runs_the_stages_and_reruns_only_what_changed(project: Path, prefect_server: str) -> None:
    _git_dvc_init(project)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server}
    first = _dvc(project, "repro", env=env)
    for stage in ("prepare", "tune", "featurize", "train", "evaluate", "register", "promote"):
        assert f"Running stage '{stage}'" in first
    # a tracked file names no machine path; the MLflow run names the commit, not "-dirty" from its own outputs
    tracked = subprocess.run(["git", "ls-files"], cwd=project, capture_output=True, text=True).stdout.split()
    for name in [*tracked, "dvc.lock"]:
        if (project / name).is_file() and (project / name).suffix in {".yaml", ".json", ".csv", ".lock", ""}:
            assert str(project) not in (project / name).read_text(errors="ignore"), name
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "tune", "featurize", "train", "evaluate", "register", "promote"}
    promotion = json.loads((project / "results" / "promotion.json").read_text())
    assert promotion["promoted"] and promotion["reason"] == "first model: there was no champion"
    plots = json.loads(_dvc(project, "plots", "show", "--json", env=env))["data"]
    images = {
        "results/learning_curves.png",
        "results/layer_weights.png",  # the last layer alone, for method lora
        "results/search/heatmap.png",
        "results/search/durations.png",
    }
    assert set(plots) == images  # images only: DVC's Vega plots are blank offline
    for name in images:
        assert (project / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    metrics_out = _dvc(project, "metrics", "show", env=env)
    f1 = json.loads((project / "results" / "metrics.json").read_text())["f1"]
    assert "results/metrics.json" in metrics_out and "exact_match" in metrics_out and f"{f1:g}"[:4] in metrics_out

    # a knob only evaluation reads: everything upstream is skipped
    params = yaml.safe_load((project / "params.yaml").read_text())
    evaluation = params.setdefault("eval", {})
    evaluation["batch_size"] = 2 * evaluation.get("batch_size", 16)  # differs from whatever it was
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = _dvc(project, "repro", env=env)
    for stage in ("prepare", "tune", "featurize", "train"):
        assert f"Stage '{stage}' didn't change, skipping" in second
    assert "Running stage 'evaluate'" in second
    assert _dvc(project, "status", env=env).strip().endswith("Data and pipelines are up to date.")


def test_make_run_and_dvc_repro_are_one_path(project: Path, prefect_server: str, tmp_path: Path) -> None:
    """`spanflow run` (make run) on params.yaml leaves dvc.lock recording its outputs: nothing left to redo;
    with an override it leaves dvc.lock alone, and DVC sees the difference."""
    import mlflow

    (project / "studies").mkdir()
    for name in ("dvc.yaml", "default.yaml"):  # the study's stage, which a pipeline run must not record as done
        shutil.copy(REPO / "studies" / name, project / "studies" / name)
    _git_dvc_init(project)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server}
    run = subprocess.run([str(BIN / "spanflow"), "run"], cwd=project, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "dvc.lock records this run" in run.stdout + run.stderr
    assert _dvc(project, "status", "dvc.yaml", env=env).strip().endswith("Data and pipelines are up to date.")
    assert not (project / "studies/dvc.lock").exists() and "study" in _dvc(project, "status", env=env)
    again = _dvc(project, "repro", env=env)
    assert "Running stage" not in again, again
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    train_run = client.get_run(json.loads((project / "models/final/run.json").read_text())["run_id"])
    assert train_run.data.tags["git_commit"] == commit

    # the overrides train by method freeze (search, warm start and all) and evaluate and register with ONNX Runtime
    # (int8): the version carries its ONNX file
    overrides = ["eval.runtime=onnx_int8", "method.name=freeze", "method.freeze.trainable_layers=1"]
    run = spanflow_run(project, overrides, env)
    assert "dvc.lock left as it was" in run.stdout + run.stderr
    assert "evaluate" in _dvc(project, "status", env=env)
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert metrics["runtime"] == "onnx_int8" and 0 < metrics["trainable_params"] < metrics["total_params"]
    assert json.loads((project / "models/final/train.json").read_text())["method"] == "freeze"
    version = json.loads((project / "results/registered.json").read_text())["version"]
    source = client.get_model_version_download_uri("spanflow-qa-test", str(version))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "downloaded")))
    onnx_files = list(local.glob("artifacts/**/model.int8.onnx"))
    assert len(onnx_files) == 1 and onnx_files[0].stat().st_size > 0
    settings = json.loads(next(local.glob("artifacts/**/settings.json")).read_text())
    assert settings["runtime"] == "onnx_int8"
    assert any(line.startswith("onnxruntime==") for line in (local / "requirements.txt").read_text().splitlines())


def _bad_offset(project: Path) -> tuple[str, bytes, list[str]]:
    squad = json.loads((project / "data/squad/train-v1.1-head.json").read_text())
    qa = squad["data"][3]["paragraphs"][2]["qas"][1]
    qa["answers"][0]["answer_start"] += 7
    return "bad-train.json", json.dumps(squad).encode(), [qa["id"], "answer_start"]


def _truncated_gzip(project: Path) -> tuple[str, bytes, list[str]]:
    whole = (project / "data/squad/train-v1.1.json.gz").read_bytes()
    return "bad-train.json.gz", whole[: len(whole) // 2], ["not a readable gzip file"]


def _gzip_of_text(project: Path) -> tuple[str, bytes, list[str]]:
    return "bad-train.json.gz", gzip.compress(b"title,context\nNormans,Normandy\n"), ["malformed JSON at line 1"]


@pytest.mark.parametrize("make_bad", [_bad_offset, _truncated_gzip, _gzip_of_text])
def test_bad_input_stops_the_flow_and_writes_nothing(project: Path, prefect_server: str, make_bad) -> None:
    from flows.stages import prepare_flow
    from spanflow.data.squad import DataValidationError

    name, payload, named = make_bad(project)
    bad = project / "data/squad" / name
    bad.write_bytes(payload)
    # an earlier good result must survive a rejected input
    prepare_flow(params="params.yaml")
    before = {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()}

    with pytest.raises(DataValidationError) as err:
        prepare_flow(params="params.yaml", overrides=[f"data.train={bad}", "data.train_limit=null"])
    message = str(err.value)
    assert name in message and all(n in message for n in named), message
    assert {p.name: p.read_bytes() for p in (project / "data/prepared").iterdir()} == before


def test_cli_rejects_unknown_override_key(project: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "spanflow"), "run", "--set", "train.epochz=1"], cwd=project, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "train.epochz" in proc.stderr


BACKBONES = {"bert": make_tiny_model_dir, "albert": make_tiny_albert_dir, "llama": make_tiny_llama_dir}


@pytest.mark.parametrize(
    ("backbone", "method", "search"),
    [("bert", "qlora", True), ("albert", "lora", False), ("llama", "qlora", False)],  # the last: the QLoRA study's
)
def test_spanflow_run_trains_evaluates_and_registers_on_a_backbone_by_a_method(
    project: Path, prefect_server: str, tmp_path: Path, backbone: str, method: str, search: bool
) -> None:
    """`spanflow run --set method.name=...` with `model.name_or_path` a tiny local model (tests/helpers.py): the search
    (one point, warm start) where it runs, training, evaluation and registration; the saved model is a plain fp32
    model that the registered pyfunc answers with, at exact characters of the context."""
    import mlflow
    import pandas as pd

    model_dir = BACKBONES[backbone](tmp_path / f"tiny-{backbone}")
    overrides = [f"model.name_or_path={model_dir}", f"method.name={method}", "train.max_steps=3"]
    if search:
        overrides += ["search.space.chunk_length=[96]", "search.space.overlap=[32]", "search.trial.max_steps=2"]
    else:
        overrides += ["search.enabled=false"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server}
    run = spanflow_run(project, overrides, env)
    assert "kernels-community" not in run.stdout + run.stderr  # bitsandbytes' note about a Hub kernel is quieted
    train = json.loads((project / "models/final/train.json").read_text())
    assert train["method"] == method and train["steps"] == 3 and bool(train["warm_start"]) == search
    assert 0 < train["trainable_params"] < train["total_params"]
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0 <= metrics["f1"] <= 100 and metrics["dev_questions"] == 40
    assert metrics["train_peak_rss_mb"] > 0 and metrics["eval_peak_rss_mb"] > 0
    saved = json.loads((project / "models/final/hf/config.json").read_text())
    assert "quantization_config" not in saved and saved["model_type"] == backbone

    version = json.loads((project / "results/registered.json").read_text())["version"]
    uri = f"sqlite:///{project / 'mlflow.db'}"  # named here: the process may still resolve an earlier test's registry
    source = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(
        "spanflow-qa-test", str(version)
    )
    model = mlflow.pyfunc.load_model(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path)))
    context = "The harbour of Vester was founded by Brenna Holm in 1843. It can hold 120 ships."
    question = "Who founded the harbour of Vester?"
    row = model.predict(pd.DataFrame({"question": [question], "context": [context]})).iloc[0]
    assert row["answer"] and context[row["start"] : row["end"]] == row["answer"]
