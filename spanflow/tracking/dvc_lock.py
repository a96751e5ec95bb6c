"""`make run` and `dvc repro` as one path: after qa-pipeline has run every stage on params.yaml as it
stands, `dvc commit` records what the run produced in dvc.lock, so `dvc status` and `dvc repro` find
nothing left to do. The stages DVC runs are the same code (flows/stages.py), so the outputs are the
ones `dvc repro` would have made."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def record_run_in_dvc(params: str, overrides: list[str] | None) -> str:
    """Commit this run's outputs to dvc.lock when the run used params.yaml without overrides; returns what
    it did, for the log. A failed commit is reported, not raised: the run's results are already written."""
    if not (Path("dvc.yaml").is_file() and Path(".dvc").is_dir()):
        return "dvc.lock not written: no DVC project here"
    if overrides or Path(params).resolve() != Path("params.yaml").resolve():
        return (
            "dvc.lock left as it was: this run's params are not params.yaml as it stands "
            "(overrides, a profile or another file)"
        )
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    # dvc.yaml's stages only: studies/dvc.yaml's study did not run here and must not be recorded as done
    proc = subprocess.run([dvc, "commit", "--force", "--quiet", "dvc.yaml"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"dvc.lock not updated: `dvc commit` failed: {(proc.stderr or proc.stdout).strip()[-500:]}"
    return "dvc.lock records this run: `dvc status` is up to date and `dvc repro` has nothing to redo"
