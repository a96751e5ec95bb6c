"""`spanflow deploy` as a real served process against the temporary Prefect server: the deployment's
schedule and parameters come from params.yaml, triggered runs execute the pipeline in the project,
and the flow retries of `schedule.*` apply to deployment runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from spanflow.config import load_config
from tests import test_pipeline_integration as integration

project = integration.project  # the tiny temporary project (fixture), chdir'ed into

RUN_TIMEOUT_S = 400  # the tiny pipeline takes 30-60 s; slow CI machines get room
START_TIMEOUT_S = 180  # `spanflow deploy` imports torch, transformers, MLflow and Prefect first


def _write_params(project: Path, name: str, schedule: dict, **data: str) -> Path:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["schedule"] = schedule
    params["data"].update(data)
    path = project / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@contextmanager
def _served(project: Path, prefect_server: str, *args: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`spanflow deploy ARGS` in the project, against the test server; always stopped afterwards."""
    log = project / "deploy.log"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with log.open("wb") as out:
        # its own process group: the flow-run processes the runner spawns are stopped with it
        proc = subprocess.Popen(
            [sys.executable, "-m", "spanflow.cli", "deploy", *args],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc, log
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_deployment(name: str, proc: subprocess.Popen, log: Path):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + START_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                pass
            assert proc.poll() is None, f"spanflow deploy exited with {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no deployment {name} after {START_TIMEOUT_S} s:\n{log.read_text()}"
            time.sleep(1)


def _trigger(name: str, log: Path):
    """A run of the deployment, waited for until it is final (the served process executes it)."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name, timeout=RUN_TIMEOUT_S, poll_interval=2)
    assert flow_run.state is not None and flow_run.state.is_final(), (
        f"run {flow_run.name} is {flow_run.state!r} after {RUN_TIMEOUT_S} s:\n{log.read_text()}"
    )
    return flow_run


def test_build_served_pipeline_takes_schedule_and_retries_from_params(project: Path) -> None:
    from flows.deploy import build_served_pipeline

    schedule = {"deployment": "nightly", "cron": "15 4 * * 1", "timezone": "Europe/Berlin"}
    path = _write_params(project, "deploy.yaml", {**schedule, "retries": 3, "retry_delay_seconds": 7})
    served = build_served_pipeline(load_config(path), "deploy.yaml", ["train.epochs=1"])
    assert served.name == "nightly"
    assert (served.schedule.cron, served.schedule.timezone) == ("15 4 * * 1", "Europe/Berlin")
    assert served.parameters == {"params": str(path.resolve()), "overrides": ["train.epochs=1"]}
    assert served.flow.name == "qa-pipeline"
    assert (served.flow.retries, served.flow.retry_delay_seconds) == (3, 7)
    assert "15 4 * * 1" in served.description and "spanflow" in served.tags


def test_spanflow_deploy_serves_the_pipeline_on_the_cron_of_params(project: Path, prefect_server: str) -> None:
    from mlflow import MlflowClient

    schedule = {"deployment": "test-nightly", "cron": "15 4 * * 1", "timezone": "Europe/Berlin"}
    params = _write_params(project, "params.yaml", {**schedule, "retries": 1, "retry_delay_seconds": 0})
    name = "qa-pipeline/test-nightly"

    with _served(project, prefect_server, "--params", "params.yaml", "--set", "train.max_steps=4") as (proc, log):
        deployment = _wait_for_deployment(name, proc, log)
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
            ("15 4 * * 1", "Europe/Berlin", True)
        ]
        assert deployment.parameters == {"params": str(params.resolve()), "overrides": ["train.max_steps=4"]}
        assert deployment.entrypoint == "flows.pipeline.qa_pipeline"
        assert "spanflow" in deployment.tags and "15 4 * * 1" in deployment.description

        flow_run = _trigger(name, log)
        assert flow_run.state.is_completed(), f"{flow_run.state!r}\n{log.read_text()}"

    assert flow_run.deployment_id == deployment.id and flow_run.run_count == 1
    assert flow_run.empirical_policy.retries == 1  # schedule.retries reached the run
    # the run worked in the project the deployment was served from, with the params file and the override
    assert (project / "results" / "metrics.json").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'spanflow-qa-test'")
    assert len(versions) == 1
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["prefect.flow_run_id"] == str(flow_run.id)
    assert run.data.params["train.max_steps"] == "4"


def test_a_failed_deployment_run_is_retried_as_params_say(project: Path, prefect_server: str) -> None:
    schedule = {"deployment": "test-retry", "cron": "0 3 * * *", "timezone": "UTC"}
    _write_params(
        project, "failing.yaml", {**schedule, "retries": 1, "retry_delay_seconds": 0}, train="data/squad/missing.json"
    )
    name = "qa-pipeline/test-retry"

    with _served(project, prefect_server, "--params", "failing.yaml") as (proc, log):
        _wait_for_deployment(name, proc, log)
        flow_run = _trigger(name, log)

    assert flow_run.state.is_failed(), f"{flow_run.state!r}\n{log.read_text()}"
    assert "missing.json" in (flow_run.state.message or "") + log.read_text()
    # the first attempt failed, schedule.retries=1 ran it once more, in the same served process
    assert flow_run.empirical_policy.retries == 1
    assert flow_run.run_count == 2
    assert not (project / "results" / "metrics.json").exists()
    assert not (project / "results" / "registered.json").exists()
    assert not (project / "results" / "promotion.json").exists()


def test_deploy_without_a_prefect_server_says_what_to_start(project: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a profile with no API URL in it
    done = subprocess.run(
        [sys.executable, "-m", "spanflow.cli", "deploy"], cwd=project, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "PREFECT_API_URL is not set" in done.stderr and "prefect server start" in done.stderr
