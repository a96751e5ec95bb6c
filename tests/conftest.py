"""Shared fixtures. The environment is fixed before Prefect, MLflow or Hugging Face are imported."""

from __future__ import annotations

import os
import tempfile

# Offline like the machines this runs on; Prefect's state stays out of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="spanflow-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"  # no internet: telemetry only logs errors
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_server():
    """A real, temporary Prefect API server and database for the whole test session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
