"""spanflow.tracking.runs: MLflow follows the config of each run, in a process that runs several."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from spanflow.config import load_config
from spanflow.tracking.runs import setup_mlflow


def test_each_project_logs_to_its_own_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        cfg = load_config(None)
        setup_mlflow(cfg)
        assert mlflow.get_tracking_uri() == cfg.tracking_uri == f"sqlite:///{(tmp_path / name).resolve()}/mlflow.db"
        assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow's export must not outrank params.yaml


def test_the_users_tracking_uri_stays_in_charge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path.resolve()}/shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    setup_mlflow(load_config(None))
    assert mlflow.get_tracking_uri() == uri and os.environ["MLFLOW_TRACKING_URI"] == uri
