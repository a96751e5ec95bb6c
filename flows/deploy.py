"""`spanflow deploy`: serve the qa-pipeline flow as a Prefect deployment on `schedule.cron`.

The deployment is served with `Flow.serve`, which hands the flow *object* to the runner: the runner
cloudpickles it into each flow-run process (Prefect 3.8.8: `Runner.aadd_flow` registers the flow,
`DirectSubprocessStarter` runs it with `run_flow_in_subprocess`), so `with_options(retries=...)`
applies to scheduled and triggered runs. `prefect.serve(flow.to_deployment(...))` would not do that:
its runs re-import the flow from the entrypoint and lose the options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Flow
from prefect.schedules import Cron, Schedule
from prefect.types.entrypoint import EntrypointType

from spanflow.config import Config, load_config


@dataclass(frozen=True)
class ServedPipeline:
    """Everything `serve_pipeline` hands to `Flow.serve`."""

    flow: Flow[..., Any]  # qa_pipeline with the retries of schedule.*
    name: str  # deployment name: runs as `qa-pipeline/<name>`
    schedule: Schedule
    parameters: dict[str, Any]
    description: str
    tags: list[str] = field(default_factory=list)


def build_served_pipeline(cfg: Config, params: str | Path, overrides: list[str] | None = None) -> ServedPipeline:
    """The deployment for `cfg.schedule`; runs read `params` (made absolute) with `overrides`. Starts nothing."""
    from flows.pipeline import qa_pipeline

    sc = cfg.schedule
    params_file = str(Path(params).resolve())
    flow = qa_pipeline.with_options(retries=sc.retries, retry_delay_seconds=sc.retry_delay_seconds)
    description = (
        f"spanflow qa-pipeline with {params_file}"
        + (f" ({', '.join(overrides)})" if overrides else "")
        + f", on cron '{sc.cron}' ({sc.timezone}); a failed run is retried {sc.retries}x after"
        f" {sc.retry_delay_seconds} s. Runs in the directory where `spanflow deploy` was started."
    )
    return ServedPipeline(
        flow=flow,
        name=sc.deployment,
        schedule=Cron(sc.cron, timezone=sc.timezone),
        parameters={"params": params_file, "overrides": list(overrides or [])},
        description=description,
        tags=["spanflow", "qa-pipeline", "scheduled"],
    )


def serve_pipeline(params: str | Path, overrides: list[str] | None = None) -> None:
    """Register the deployment and run its scheduled or triggered flow runs until stopped (blocks).

    Flow runs work in the current directory (the project root): relative paths in params resolve there.
    One run at a time: the pipeline's stages share results/ and models/.
    """
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ValueError(
            "PREFECT_API_URL is not set: a schedule needs a running Prefect server "
            "(`prefect server start`, then `export PREFECT_API_URL=http://127.0.0.1:4200/api`)"
        )
    served = build_served_pipeline(load_config(params, overrides), params, overrides)
    served.flow.serve(
        name=served.name,
        schedule=served.schedule,
        parameters=served.parameters,
        description=served.description,
        tags=served.tags,
        limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
