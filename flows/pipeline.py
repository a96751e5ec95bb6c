"""The end-to-end Prefect flow `qa-pipeline`: prepare -> tune -> featurize -> train -> evaluate -> register
-> promote. Promotion is the last step, so a run that fails earlier moves no alias."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.stages import prepare_data
from spanflow.config import load_config
from spanflow.tracking.dvc_lock import record_run_in_dvc
from tasks.evaluate import evaluate_task
from tasks.featurize import featurize_task
from tasks.promote import promote_task
from tasks.register import register_task
from tasks.report import report_task
from tasks.train import train_task
from tasks.tune import tune_task

STAGES = ("prepare", "tune", "featurize", "train", "evaluate", "register", "promote")


@flow(name="qa-pipeline", log_prints=True)
def qa_pipeline(params: str = "params.yaml", overrides: list[str] | None = None, resume: bool = False) -> dict:
    cfg = load_config(params, overrides)
    stage = iter(f"stage {k} of 7: {name}" for k, name in enumerate(STAGES, start=1))
    print(next(stage))
    prepare_data(cfg)
    print(next(stage))
    search = tune_task(cfg)
    print(next(stage))
    featurize_task(cfg)
    print(next(stage))
    trained = train_task(cfg, resume)
    print(next(stage))
    metrics = evaluate_task(cfg)
    print(next(stage))
    registered = register_task(cfg)
    print(next(stage))
    promotion = promote_task(cfg)
    links = {
        "MLflow run": f"`{trained['run_id']}` (`mlflow ui --backend-store-uri {cfg.tracking_uri}`)",
        "Prefect flow run": f"`{flow_run.name}` ({flow_run.id})",
    }
    if search.get("study"):
        links["Search (MLflow parent run)"] = f"`{search['mlflow_parent_run_id']}`, study `{search['study']}`"
    table = report_task(cfg, metrics, registered, links, search, promotion)
    create_markdown_artifact(markdown=table, key="qa-results", description="spanflow qa-pipeline results")
    print(record_run_in_dvc(params, overrides))
    return {
        "metrics": metrics,
        "registered": registered,
        "promotion": promotion,
        "run_id": trained["run_id"],
        "search": search,
        "flow_run_id": str(flow_run.id),
        "report": table,
    }
