"""Promotion gate, hand promotion, the registry listing and the served model, on a real MLflow store,
a real Prefect server and a real `mlflow models serve` process on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import make_tiny_model_dir
from tests.test_pipeline_integration import REPO, _small_params

BIN = Path(sys.executable).parent
MODEL_NAME = "spanflow-qa-test"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> Iterator[Path]:
    """A tiny project whose qa-pipeline ran once (method adapter): version 1 registered, and champion as the first
    model."""
    from flows.pipeline import qa_pipeline

    tmp = tmp_path_factory.mktemp("registry")
    root = tmp / "project"
    root.mkdir()
    shutil.copytree(REPO / "tasks", root / "tasks")
    shutil.copytree(REPO / "data" / "squad", root / "data" / "squad")
    shutil.copytree(REPO / "data" / "leaderboard", root / "data" / "leaderboard")
    params = _small_params(make_tiny_model_dir(tmp / "tiny-bert"))
    params["search"]["enabled"] = False
    params["serving"]["max_batch"] = 3
    # Houlsby adapters: the method whose weights do not merge, so the served model must rebuild them
    params["method"]["name"] = "adapter"
    params["method"]["adapter"]["size"] = 8
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        out = qa_pipeline(params="params.yaml")
        assert out["promotion"]["promoted"] and out["promotion"]["champion_version"] is None
        yield root
    finally:
        os.chdir(cwd)


def _cli(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [str(BIN / "spanflow"), *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def _aliases(client) -> dict[str, int]:
    return {alias: int(v) for alias, v in client.get_registered_model(MODEL_NAME).aliases.items()}


def test_gate_keeps_the_champion_for_an_equal_model_and_promotes_a_better_one(project: Path, prefect_server: str):
    from mlflow import MlflowClient

    from spanflow.config import load_config
    from tasks.evaluate import evaluate_stage
    from tasks.promote import PROMOTION_FILE, promote_stage
    from tasks.register import register_stage
    from tasks.train import train_stage

    cfg = load_config("params.yaml")
    client = MlflowClient()
    assert _aliases(client) == {"champion": 1, "challenger": 1}
    first_tags = client.get_model_version(MODEL_NAME, "1").tags
    assert first_tags["promotion.decision"] == "promoted" and first_tags["promoted_by"] == "promotion gate"
    assert float(first_tags["dev_f1"]) >= 0 and first_tags["dev_questions"] == "40"

    # the same params again: same answers, an interval of exactly zero, the champion stays
    train_stage(cfg)
    evaluate_stage(cfg)
    assert register_stage(cfg)["version"] == 2
    assert register_stage(cfg)["version"] == 2, "a retried register must not add a version"
    result = promote_stage(cfg)
    assert not result["promoted"] and result["champion_scores_from"] == "its own dev evaluation"
    b = result["bootstrap"]
    assert b["resamples"] == cfg.registry.bootstrap_resamples >= 1000 and b["questions"] == 40
    assert b["low"] <= b["mean_gain"] <= b["high"] and not b["low"] > cfg.registry.min_gain
    assert _aliases(client) == {"champion": 1, "challenger": 2}
    assert json.loads(PROMOTION_FILE.read_text()) == result
    run = client.get_run(json.loads(Path("results/registered.json").read_text())["run_id"])
    assert run.data.tags["promotion.decision"] == "not promoted"
    assert run.data.tags["promotion.champion_version"] == "1"
    assert run.data.metrics["promotion_f1_gain_low"] == pytest.approx(b["low"])

    # a check that fails before the decision moves nothing
    predictions = Path("results/predictions.json")
    saved = predictions.read_text()
    predictions.unlink()
    with pytest.raises(FileNotFoundError):
        promote_stage(cfg)
    assert _aliases(client) == {"champion": 1, "challenger": 2}

    # a challenger that answers every question right: the interval clears min_gain, v2 becomes champion
    records = [json.loads(line) for line in Path("data/prepared/dev.jsonl").read_text().splitlines()]
    predictions.write_text(json.dumps({r["id"]: r["answers"]["text"][0] for r in records}))
    result = promote_stage(cfg)
    assert result["promoted"] and result["challenger_f1"] == 100.0
    assert result["bootstrap"]["low"] > cfg.registry.min_gain
    assert _aliases(client) == {"champion": 2, "challenger": 2}
    assert client.get_model_version(MODEL_NAME, "2").tags["promotion.decision"] == "promoted"
    predictions.write_text(saved)

    # by hand, back to v1, with who and why
    done = _cli(project, "promote", "--version", "1", "--reason", "roll back: v2 scored on doctored answers")
    assert done.returncode == 0, done.stderr
    tags = client.get_model_version(MODEL_NAME, "1").tags
    assert tags["promotion.reason"] == "roll back: v2 scored on doctored answers"
    assert tags["promotion.decision"] == "promoted by hand" and tags["promoted_by"]
    assert tags["promotion.replaced_version"] == "2"
    assert _aliases(client)["champion"] == 1
    bad = _cli(project, "promote", "--version", "99", "--reason", "x")
    assert bad.returncode == 1 and "--version 99" in bad.stderr and "no such version" in bad.stderr

    listing = _cli(project, "registry")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split("|")[1].strip(): line for line in listing.stdout.splitlines() if line.startswith("| ")}
    assert "@champion" in lines["1"] and "@challenger" in lines["2"]
    assert first_tags["dev_f1"] in lines["1"] and "promoted by hand" in lines["1"]


def test_champion_evaluated_on_other_questions_is_rescored_on_the_challengers(project: Path, prefect_server: str):
    import mlflow
    from mlflow import MlflowClient

    from flows.pipeline import qa_pipeline
    from tasks.promote import CHAMPION_PREDICTIONS_ARTIFACT

    client = MlflowClient()
    champion = _aliases(client)["champion"]
    own = mlflow.artifacts.load_dict(
        f"runs:/{client.get_model_version(MODEL_NAME, str(champion)).run_id}/predictions.json"
    )
    assert len(own) == 40
    out = qa_pipeline(params="params.yaml", overrides=["data.dev_limit=60"])
    result = out["promotion"]
    assert result["champion_version"] == champion
    assert result["champion_scores_from"] == "re-scored on the challenger's dev questions"
    assert result["bootstrap"]["questions"] == 60
    assert _aliases(client)["champion"] == (result["challenger_version"] if result["promoted"] else champion)

    # the re-scored answers cover the 60 questions and repeat the champion's own answers on its 40
    rescored = mlflow.artifacts.load_dict(f"runs:/{out['run_id']}/{CHAMPION_PREDICTIONS_ARTIFACT}")
    records = {
        json.loads(line)["id"]: json.loads(line) for line in Path("data/prepared/dev.jsonl").read_text().splitlines()
    }
    assert set(rescored) == set(records)
    assert all(text in records[i]["context"] for i, text in rescored.items())
    same = sum(rescored[i] == text for i, text in own.items())
    assert same >= 0.9 * len(own), f"re-scoring disagrees with the champion's own answers on {len(own) - same}/40"

    # the decision is a Prefect Markdown artifact of the flow run
    found = httpx.post(f"{prefect_server}/artifacts/filter", json={"artifacts": {"key": {"any_": ["promotion"]}}})
    mine = [a for a in found.json() if a["flow_run_id"] == out["flow_run_id"]]
    assert len(mine) == 1 and mine[0]["type"] == "markdown"
    assert f"challenger v{result['challenger_version']}" in mine[0]["data"]
    assert "Paired bootstrap over 60 dev questions" in mine[0]["data"]


def test_ensemble_of_versions_is_scored_registered_and_served(project: Path, prefect_server: str):
    """`spanflow ensemble`: v1 and v2 (trained alike) scored alone and together, registered as one version that
    serves a long context; an ensemble of identical members answers as the member does."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from flows.stages import prepare_data
    from spanflow.config import load_config

    prepare_data(load_config("params.yaml"))  # the dev questions of params.yaml, whatever a test before prepared
    bad = _cli(project, "ensemble", "1")
    assert bad.returncode == 1 and "two or more different versions" in bad.stderr
    done = _cli(project, "ensemble", "1", "2", "--register")
    assert done.returncode == 0, done.stderr
    out = json.loads((project / "results/ensemble.json").read_text())
    assert set(out["scores"]) == {"v1", "v2", "max", "mean"}
    assert out["scores"]["max"] == out["scores"]["v1"] == out["scores"]["v2"]
    assert out["gain_over_best_member"]["max"]["mean_gain"] == 0.0
    version = out["registered_version"]
    tags = MlflowClient().get_model_version(MODEL_NAME, str(version)).tags
    assert tags["ensemble.versions"] == "1,2" and tags["ensemble.rule"] == "max"
    assert float(tags["dev_f1"]) == pytest.approx(out["scores"]["max"]["f1"])

    context = " ".join(f"Sentence number {i} talks about nothing at all." for i in range(150))
    rows = pd.DataFrame({"question": ["Who founded the harbour?"], "context": [context + " Ada founded the harbour."]})
    served = {v: mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{v}").predict(rows) for v in (1, version)}
    row = served[version].iloc[0]
    assert rows.context[0][row["start"] : row["end"]] == row["answer"]
    pd.testing.assert_frame_equal(served[version], served[1], atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_champion_answers_long_contexts_and_rejects_bad_requests(project: Path):
    port = _free_port()
    # the environment's bin deliberately not on PATH: `spanflow serve` must work from a venv that is not activated
    env = {**os.environ, "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != str(BIN))}
    server = subprocess.Popen(
        [str(BIN / "spanflow"), "serve", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the model server did not come up"
            time.sleep(1)

        filler = " ".join(f"Ledger entry {i} notes a shipment of grain to the northern harbour." for i in range(200))
        context = filler + " The lighthouse at Calder was built by Brenna Holm in 1843. " + filler
        assert len(context) > 10_000
        question = "Who built the lighthouse at Calder?"
        ok = httpx.post(
            f"{url}/invocations", json={"dataframe_records": [{"question": question, "context": context}]}, timeout=120
        )
        assert ok.status_code == 200, ok.text
        [answer] = ok.json()["predictions"]
        assert set(answer) == {"answer", "start", "end", "score", "no_answer_score"}
        assert context[answer["start"] : answer["end"]] == answer["answer"] and answer["answer"]
        assert 0 <= answer["score"] <= 1 and 0 <= answer["no_answer_score"] <= 1  # probabilities

        # spanflow's reason is the whole message: no echo of the request (the long context), no MLflow wording
        row = {"question": question, "context": context}
        bad_requests = {
            "field 'question' is missing": {"dataframe_records": [{"context": context}]},
            "field 'context' is missing": {"dataframe_split": {"columns": ["question"], "data": [[question]]}},
            "row 0: field 'context' is empty": {"dataframe_records": [{"question": question, "context": "   "}]},
            "row 1: field 'question' is empty": {"dataframe_records": [row, {**row, "question": ""}]},
            "row 0: field 'question' must be a string": {"dataframe_records": [{**row, "question": 7}]},
            "batch of 4 rows is over serving.max_batch = 3": {"dataframe_records": [row] * 4},
            "the request has no rows": {"dataframe_records": []},
        }
        for reason, body in bad_requests.items():
            bad = httpx.post(f"{url}/invocations", json=body, timeout=60)
            assert bad.status_code == 400, (reason, bad.status_code, bad.text[:500])
            assert bad.json()["message"].startswith(reason), (reason, bad.text[:500])
            assert len(bad.text) < 500 and "Ledger entry" not in bad.text, (reason, bad.text[:500])
        malformed = httpx.post(
            f"{url}/invocations", content=b"{not json", headers={"Content-Type": "application/json"}, timeout=60
        )
        assert malformed.status_code == 400

        # still serving after the bad ones, batches included
        batch = [{"question": question, "context": context}, {"question": "Who?", "context": "Ada wrote it."}]
        again = httpx.post(f"{url}/invocations", json={"dataframe_records": batch}, timeout=120)
        assert again.status_code == 200 and len(again.json()["predictions"]) == 2
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()


def test_two_worker_processes_answer_concurrent_clients(project: Path):
    """`spanflow serve --workers 2`: two uvicorn worker processes each load the champion (the server comes up only
    once both logged their startup), and 4 clients x 3 requests side by side, through the load test's own loop
    (benchmarks/load_test.py), all get the same, correct answer; the server still answers afterwards."""
    from benchmarks.load_test import burst
    from benchmarks.serve_latency import spanflow_server

    filler = " ".join(f"Ledger entry {i} notes a shipment of grain to the northern harbour." for i in range(150))
    context = filler + " The lighthouse at Calder was built by Brenna Holm in 1843. " + filler
    body = {"dataframe_records": [{"question": "Who built the lighthouse at Calder?", "context": context}]}
    with spanflow_server(workers=2, startup_timeout=180, cwd=project) as (url, _):
        summary, answers = burst(url, body, context, clients=4, requests=3)
        assert httpx.get(f"{url}/ping", timeout=30).status_code == 200
        again = httpx.post(f"{url}/invocations", json=body, timeout=120)
    assert summary["errors"] == 0 and summary["answered"] == 12, summary["error_kinds"]
    assert len(answers) == 1  # the same weights and settings in both processes
    assert again.status_code == 200 and again.json()["predictions"][0]["answer"] in answers


def test_predict_answers_from_a_context_file_and_names_a_missing_one(project: Path, tmp_path: Path):
    context = tmp_path / "context.txt"
    text = "Old harbour records. " * 600 + "The Vester bridge opened in 1911. " + "More records follow. " * 10
    context.write_text(text)
    done = _cli(project, "predict", "--question", "When did the Vester bridge open?", "--context-file", str(context))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["context_chars"] == len(text) > 10_000
    assert text[answer["start"] : answer["end"]] == answer["answer"]
    assert 0 <= answer["score"] <= 1 and 0 <= answer["no_answer_score"] <= 1
    assert answer["model_uri"] == f"models:/{MODEL_NAME}@champion"

    missing = _cli(project, "predict", "--question", "Q?", "--context-file", str(tmp_path / "nope.txt"))
    assert missing.returncode == 1 and "nope.txt" in missing.stderr


def test_registered_span_scoring_decides_the_served_answers(project: Path, tmp_path: Path):
    """The version carries eval.span_scoring in its settings and the pyfunc answers with it; a version
    registered before the setting existed answers with logit_sum."""
    import mlflow
    import pandas as pd
    from mlflow.models import Model
    from mlflow.pyfunc import PythonModelContext

    from spanflow.serving.qa_pyfunc import SpanQAModel

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path)))
    artifacts = Model.load(local).flavors["python_function"]["artifacts"]
    settings = json.loads((local / artifacts["settings"]["path"]).read_text())
    config = json.loads((local / artifacts["model_dir"]["path"] / "config.json").read_text())
    assert config["spanflow_adapter"] == {"size": 8}  # the version carries its adapters; the pyfunc rebuilds them
    assert settings["span_scoring"] == yaml.safe_load((project / "params.yaml").read_text())["eval"]["span_scoring"]

    filler = " ".join(f"Entry {i} records a cargo of salt bound for the southern port." for i in range(40))
    rows = pd.DataFrame(
        {
            "question": ["Who built the lighthouse at Calder?", "When did the Vester bridge open?"],
            "context": [
                filler + " The lighthouse at Calder was built by Brenna Holm in 1843. " + filler,
                "The Vester bridge opened in 1911. " + filler,
            ],
        }
    )

    def served(**change: str | None) -> pd.DataFrame:
        own = {k: v for k, v in {**settings, **change}.items() if v is not None}
        path = tmp_path / f"settings-{len(change)}-{change.get('span_scoring')}.json"
        path.write_text(json.dumps(own))
        model = SpanQAModel()
        model.load_context(
            PythonModelContext({"settings": str(path), "model_dir": str(local / artifacts["model_dir"]["path"])}, None)
        )
        return model.predict(None, rows)

    by_sum, by_softmax = served(span_scoring="logit_sum"), served(span_scoring="chunk_softmax")
    before = served(span_scoring=None)
    for frame in (by_sum, by_softmax):  # probabilities under either rule
        assert frame["score"].between(0, 1).all() and frame["no_answer_score"].between(0, 1).all()
    assert not by_sum.equals(by_softmax)
    pd.testing.assert_frame_equal(before, by_sum)
    for frame in (by_sum, by_softmax):
        for context, (start, end, text) in zip(
            rows["context"], frame[["start", "end", "answer"]].itertuples(index=False), strict=True
        ):
            assert context[start:end] == text


def test_requirements_are_pinned_without_local_version_labels():
    from spanflow.serving.registration import SERVING_REQUIREMENTS, pinned_requirement, serving_requirements

    assert pinned_requirement("torch", "2.13.0+cpu") == "torch==2.13.0"
    assert pinned_requirement("torch", "2.4.1+cu121") == "torch==2.4.1"
    assert pinned_requirement("foo", "1.0.post2+ubuntu.3") == "foo==1.0.post2"
    assert pinned_requirement("numpy", "2.4.6") == "numpy==2.4.6"
    pins = serving_requirements()
    assert [pin.split("==")[0] for pin in pins] == list(SERVING_REQUIREMENTS)
    assert not any("+" in pin for pin in pins), pins


def test_registered_model_requirements_install_from_a_plain_index(project: Path, tmp_path: Path):
    """The logged requirements.txt pins no local version (torch==2.13.0, not torch==2.13.0+cpu): a plain package
    index serves them, for `mlflow models serve --env-manager virtualenv` or a Docker image of the model."""
    import importlib.metadata as md

    import mlflow
    from packaging.requirements import Requirement
    from packaging.version import Version

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL_NAME}/1", dst_path=str(tmp_path)))
    lines = [line for line in (local / "requirements.txt").read_text().splitlines() if line.strip()]
    pinned = {}
    for line in lines:
        req = Requirement(line)
        for spec in req.specifier:
            assert Version(spec.version).local is None, line
            pinned[req.name] = spec.version
    assert pinned["torch"] == Version(md.version("torch")).public
    assert {"mlflow", "torch", "transformers", "pandas", "numpy"} <= set(pinned)


def test_served_score_is_a_probability_however_often_the_context_repeats(tmp_path: Path):
    """On real model outputs: a tiny BERT, and the same made confident (its QA head x100, no position embeddings,
    so that every chunk of a repeated context answers alike). Repeated 40 times, the confident model's answer is
    found in most chunks and the ranking sum over chunks (the score served before) exceeds 1; the served score,
    the answer's probability in the chunk most sure of it, stays in [0, 1], and the answers are the same."""
    import pandas as pd
    import torch
    from mlflow.pyfunc import PythonModelContext
    from transformers import AutoTokenizer

    from spanflow.answering.inference import answer_questions, load_qa_model
    from spanflow.serving.qa_pyfunc import SpanQAModel, request_records
    from spanflow.serving.registration import serving_settings
    from tests.helpers import tiny_config

    plain = make_tiny_model_dir(tmp_path / "tiny")
    confident = load_qa_model(plain, "fp32", torch.device("cpu"))
    with torch.no_grad():
        confident.qa_outputs.weight.mul_(100)
        confident.bert.embeddings.position_embeddings.weight.zero_()
    confident.save_pretrained(tmp_path / "confident")
    AutoTokenizer.from_pretrained(plain).save_pretrained(tmp_path / "confident")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(serving_settings(tiny_config(plain))))
    assert json.loads(settings.read_text())["span_scoring"] == "chunk_softmax"

    base = "The lighthouse at Calder was built by Brenna Holm in 1843."
    rows = pd.DataFrame(
        {"question": ["Who built the lighthouse at Calder?"] * 3, "context": [" ".join([base] * k) for k in (1, 6, 40)]}
    )
    for model_dir in (plain, tmp_path / "confident"):
        model = SpanQAModel()
        model.load_context(PythonModelContext({"settings": str(settings), "model_dir": str(model_dir)}, None))
        out = model.predict(None, rows)
        assert out["score"].between(0, 1).all() and out["no_answer_score"].between(0, 1).all(), out
        s = model.settings
        answers = answer_questions(
            model.model,
            model.tokenizer,
            request_records(rows, s["max_batch"]),
            *(s[k] for k in ("chunk_length", "overlap", "max_query_length", "max_answer_length", "n_best")),
            *(s[k] for k in ("batch_size", "precision", "workers", "span_scoring")),
        )
        assert list(out["answer"]) == [a.text for a in answers]
        assert list(out["score"]) == [a.probability for a in answers]
    assert answers[-1].score > 0, "the ranking sum of the confident model's answer over the 40 copies is above 1"


def test_a_squad2_version_abstains_by_its_threshold(tmp_path: Path):
    """Settings of a v2.0 model: a threshold below any score gap abstains ("" at -1, -1) with the no-answer score
    served; one above it answers as a v1.1 model does."""
    import pandas as pd
    from mlflow.pyfunc import PythonModelContext

    from spanflow.serving.qa_pyfunc import SpanQAModel
    from spanflow.serving.registration import serving_settings
    from tests.helpers import tiny_config

    model_dir = make_tiny_model_dir(tmp_path / "tiny")
    rows = pd.DataFrame({"question": ["When did the bridge open?"], "context": ["The Vester bridge opened in 1911."]})
    served = {}
    for version, threshold in (("1.1", 0.0), ("2.0", -1e9), ("2.0", 1e9)):
        settings = tmp_path / f"{version}-{threshold}.json"
        cfg = tiny_config(model_dir, [f"eval.no_answer_threshold={threshold}"])
        settings.write_text(json.dumps(serving_settings(cfg, version)))
        model = SpanQAModel()
        model.load_context(PythonModelContext({"settings": str(settings), "model_dir": str(model_dir)}, None))
        served[version, threshold] = model.predict(None, rows)
    abstained = served["2.0", -1e9].iloc[0]
    assert (abstained["answer"], abstained["start"], abstained["end"]) == ("", -1, -1)
    assert 0 <= abstained["no_answer_score"] <= 1
    pd.testing.assert_frame_equal(served["2.0", 1e9], served["1.1", 0.0])
    assert served["1.1", 0.0].iloc[0]["answer"] != ""
