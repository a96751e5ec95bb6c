"""The CLI's own errors: a wrong file, model or option is one line naming it, before any traceback or
Prefect log (the real `spanflow` entry point, in a temporary directory)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spanflow import __version__

REPO = Path(__file__).resolve().parents[1]
SPANFLOW = str(Path(sys.executable).parent / "spanflow")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SPANFLOW, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spanflow: error: "), proc.stderr
    for name in names:
        assert name in lines[0]
    return lines[0]


def test_version(workdir: Path) -> None:
    proc = _run(workdir, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"spanflow {__version__}"


@pytest.mark.parametrize("command", [["run"], ["tune"], ["stage", "prepare"]])
def test_a_missing_data_file_is_one_line_before_prefect_starts(workdir: Path, command: list[str]) -> None:
    proc = _run(workdir, *command, "--set", "data.train=data/squad/no-such-train.json")
    _one_line_error(proc, "data.train", "data/squad/no-such-train.json", "file not found")
    assert proc.stdout == ""  # no flow run began
    assert not (workdir / "data").exists()


def test_predict_with_a_missing_context_file(workdir: Path) -> None:
    proc = _run(workdir, "predict", "--question", "Who?", "--context-file", "missing.txt")
    _one_line_error(proc, "--context-file missing.txt", "file not found")


def test_serve_with_a_model_that_is_not_there(workdir: Path) -> None:
    proc = _run(workdir, "serve", "--model-uri", "models:/no-such-model/3")
    _one_line_error(proc, "--model-uri models:/no-such-model/3", "no MLflow store at sqlite:///", "mlflow.db")
    assert not (workdir / "mlflow.db").exists()  # looking did not create one

    proc = _run(workdir, "serve", "--model-uri", str(workdir / "no-such-dir"))
    _one_line_error(proc, f"--model-uri {workdir / 'no-such-dir'}", "no model there")


def test_serve_with_no_workers(workdir: Path) -> None:
    proc = _run(workdir, "serve", "--workers", "0")
    _one_line_error(proc, "--workers 0", "must be >= 1")
