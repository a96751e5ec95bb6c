"""`spanflow run | train | evaluate | stage NAME`, each with --params FILE and repeatable --set key=value."""

from __future__ import annotations

import argparse
import os
import sys

from spanflow.config import ConfigError, load_config

STAGES = ("prepare", "tune", "featurize", "train", "evaluate", "register")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key; the value is parsed as YAML (repeatable), e.g. --set train.epochs=1",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spanflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _common(
        sub.add_parser("run", help="the whole qa-pipeline flow: prepare, tune, featurize, train, evaluate, register")
    )
    p = sub.add_parser("tune", help="prepare, then the grid search (resumes a study that was cut short)")
    _common(p)
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes on this machine (default: search.workers)"
    )
    p = sub.add_parser("train", help="prepare, tune, featurize and train (the train stage resumes with --resume)")
    _common(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last epoch checkpoint")
    _common(sub.add_parser("evaluate", help="score the trained model on the dev set"))
    p = sub.add_parser("stage", help="one pipeline stage as its own Prefect flow (what dvc.yaml runs)")
    p.add_argument("name", choices=STAGES)
    _common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        load_config(args.params, args.overrides)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(f"spanflow: error: {exc}", file=sys.stderr)
        return 2

    # the temporary server's telemetry only logs an error on machines without internet
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import qa_pipeline
    from flows.stages import STAGE_FLOWS, evaluate_flow, featurize_flow, prepare_flow, train_flow, tune_flow
    from tasks.data import DataValidationError
    from tasks.search import SearchIncomplete

    try:
        if args.command == "run":
            print(qa_pipeline(args.params, args.overrides)["report"])
        elif args.command == "tune":
            if args.workers is not None and args.workers < 1:
                raise ValueError(f"--workers {args.workers}: must be >= 1")
            prepare_flow(args.params, args.overrides)
            tune_flow(args.params, args.overrides, workers=args.workers)
        elif args.command == "train":
            prepare_flow(args.params, args.overrides)
            tune_flow(args.params, args.overrides)
            featurize_flow(args.params, args.overrides)
            train_flow(args.params, args.overrides, resume=args.resume)
        elif args.command == "evaluate":
            evaluate_flow(args.params, args.overrides)
        else:
            STAGE_FLOWS[args.name](args.params, args.overrides)
    except (ConfigError, DataValidationError, FileNotFoundError, ValueError, SearchIncomplete) as exc:
        print(f"spanflow: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
