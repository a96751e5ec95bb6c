"""One Prefect flow per pipeline stage. DVC stages run these (`spanflow stage NAME`); the
end-to-end `qa-pipeline` flow composes the same tasks, so there is one implementation."""

from __future__ import annotations

from prefect import flow

from spanflow.config import Config, load_config
from spanflow.study.spec import DEFAULT_STUDY, load_study
from tasks.evaluate import evaluate_task
from tasks.featurize import featurize_task
from tasks.prepare import ingest_task, split_task, validate_task, version_task
from tasks.promote import promote_task
from tasks.register import register_task
from tasks.study import study_task
from tasks.train import train_task
from tasks.tune import tune_task


def prepare_data(cfg: Config) -> dict:
    """ingest -> validate -> version -> split, for the training and the dev data."""
    d = cfg.data
    train = validate_task(ingest_task(d.train, d.train_split, d.hub_config, d.train_limit))
    dev = validate_task(ingest_task(d.dev, d.dev_split, d.hub_config, d.dev_limit))
    abstain = (
        validate_task(ingest_task(d.abstain_source, d.dev_split, d.hub_config, None)) if d.abstain_source else None
    )
    return split_task(train, dev, d, version_task(train, dev, abstain), abstain)


@flow(name="qa-prepare")
def prepare_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return prepare_data(load_config(params, overrides))


@flow(name="qa-tune")
def tune_flow(params: str = "params.yaml", overrides: list[str] | None = None, workers: int | None = None) -> dict:
    return tune_task(load_config(params, overrides), workers)


@flow(name="qa-featurize")
def featurize_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return featurize_task(load_config(params, overrides))


@flow(name="qa-train")
def train_flow(params: str = "params.yaml", overrides: list[str] | None = None, resume: bool = False) -> dict:
    return train_task(load_config(params, overrides), resume)


@flow(name="qa-evaluate")
def evaluate_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return evaluate_task(load_config(params, overrides))


@flow(name="qa-register")
def register_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return register_task(load_config(params, overrides))


@flow(name="qa-promote")
def promote_flow(params: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    return promote_task(load_config(params, overrides))


@flow(name="qa-study", log_prints=True)
def study_flow(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    study_file: str = DEFAULT_STUDY,
    quick: bool = False,
) -> dict:
    """The experiments of a study file, each through the stages above, and the findings on its claims."""
    cfg = load_config(params, overrides)
    command = f"spanflow study --file {study_file}" + (" --quick" if quick else "")
    return study_task(cfg, load_study(study_file, quick), params, overrides, command)


STAGE_FLOWS = {
    "prepare": prepare_flow,
    "tune": tune_flow,
    "featurize": featurize_flow,
    "train": train_flow,
    "evaluate": evaluate_flow,
    "register": register_flow,
    "promote": promote_flow,
}
