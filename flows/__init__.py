"""Prefect flows: one per stage (what `dvc repro` runs) and the end-to-end `qa-pipeline`."""
