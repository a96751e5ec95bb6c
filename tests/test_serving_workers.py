"""`spanflow serve --workers N`: the `mlflow models serve` command it runs and the torch threads each worker gets."""

from __future__ import annotations

import pytest

from spanflow.config import load_config
from spanflow.serving import THREADS_ENV
from spanflow.serving.qa_pyfunc import torch_threads_from_env
from spanflow.tracking import registry_cli


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_cli, "usable_cpus", lambda: 2)
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize(("workers", "threads"), [(1, "2"), (2, "1"), (3, "1")])
def test_each_worker_gets_its_share_of_the_cpus(two_cpus: None, workers: int, threads: str) -> None:
    cfg = load_config(None)
    command, env = registry_cli.serve_command(cfg, "models:/m@champion", None, 5005, workers)
    assert command[1:5] == ["-m", "mlflow", "models", "serve"]
    assert _option(command, "--workers") == str(workers)  # uvicorn's worker processes
    assert _option(command, "--port") == "5005" and _option(command, "--host") == cfg.serving.host
    assert _option(command[2:], "-m") == "models:/m@champion"  # after `python -m mlflow`
    assert env[THREADS_ENV] == threads and env["OMP_NUM_THREADS"] == threads  # never fewer than 1


def test_threads_set_by_the_user_win(two_cpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "2")
    _, env = registry_cli.serve_command(load_config(None), "models:/m@champion", None, None, 2)
    assert env[THREADS_ENV] == "2" and env["OMP_NUM_THREADS"] == "2"


def test_no_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="--workers 0"):
        registry_cli.serve_command(load_config(None), "models:/m@champion", None, None, 0)


def test_the_pyfunc_reads_its_threads() -> None:
    assert torch_threads_from_env({}) is None  # torch's default
    assert torch_threads_from_env({THREADS_ENV: ""}) is None
    assert torch_threads_from_env({THREADS_ENV: " 3 "}) == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=THREADS_ENV):
            torch_threads_from_env({THREADS_ENV: bad})
