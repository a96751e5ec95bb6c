"""One experiment of a study (`spanflow study` starts it): prepare -> featurize -> train -> evaluate in the current
directory, the experiment's workspace, as its own process, so that its peak memory and its time are its own.

    python -m flows.experiment --params /abs/params.yaml [--set key=value ...] [--resume]
"""

from __future__ import annotations

import argparse

from prefect import flow

from flows.stages import prepare_data
from spanflow.config import load_config
from tasks.evaluate import evaluate_task
from tasks.featurize import featurize_task
from tasks.train import train_task


@flow(name="qa-study-experiment", log_prints=True)
def experiment_flow(params: str, overrides: list[str], resume: bool = False) -> dict:
    cfg = load_config(params, overrides)
    prepare_data(cfg)
    featurize_task(cfg)
    train_task(cfg, resume)
    return evaluate_task(cfg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m flows.experiment", description=__doc__)
    parser.add_argument("--params", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    experiment_flow(args.params, args.overrides, args.resume)
