"""spanflow: the qa-pipeline and its stages, the model registry, serving and schedules.

Every command takes --params FILE and repeatable --set key=value.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from spanflow import __version__
from spanflow.config import Config, ConfigError, load_config, profile_overrides
from spanflow.data.squad import names_a_file

STAGES = ("prepare", "tune", "featurize", "train", "evaluate", "register", "promote")


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
    p.add_argument(
        "--profile",
        default=None,
        metavar="NAME",
        help="a set of overrides from profiles/NAME.yaml, applied before --set (e.g. full: the whole of SQuAD)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spanflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"spanflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _common(
        sub.add_parser(
            "run", help="the whole qa-pipeline flow: prepare, tune, featurize, train, evaluate, register, promote"
        )
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

    p = sub.add_parser("promote", help="move the champion alias to a model version by hand, recording who and why")
    p.add_argument("--version", type=int, required=True, help="registered model version")
    p.add_argument("--reason", required=True, help="why, kept as a model-version tag")
    _common(p)
    _common(sub.add_parser("registry", help="list the registered model's versions, aliases and dev EM/F1"))
    p = sub.add_parser("predict", help="answer one question over a context file of any length")
    p.add_argument("--question", required=True)
    p.add_argument("--context-file", required=True, help="UTF-8 text file holding the context")
    p.add_argument("--model-uri", default=None, help="default: models:/<registry.model_name>@<champion alias>")
    _common(p)
    p = sub.add_parser("serve", help="serve a registered model over HTTP (mlflow models serve)")
    p.add_argument("--model-uri", default=None, help="default: models:/<registry.model_name>@<champion alias>")
    p.add_argument("--host", default=None, help="default: serving.host (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: serving.port")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes, each with the model and cores // N torch threads (SPANFLOW_TORCH_THREADS overrides);"
        " default: serving.workers",
    )
    _common(p)
    p = sub.add_parser(
        "ensemble",
        help="registered versions answering together (max or mean of their probabilities), scored on the dev set",
    )
    p.add_argument("versions", type=int, nargs="+", metavar="VERSION", help="two or more registered versions")
    p.add_argument("--rule", choices=("max", "mean"), default="max", help="the rule --register registers (max)")
    p.add_argument("--register", action="store_true", help="register the ensemble as a new servable version")
    _common(p)
    p = sub.add_parser("study", help="the experiments of a study file on one pipeline, and findings on its claims")
    p.add_argument("--file", default="studies/default.yaml", help="the study (default: studies/default.yaml)")
    p.add_argument("--quick", action="store_true", help="the study file's quick: budget (a smoke test)")
    _common(p)
    _common(sub.add_parser("deploy", help="serve qa-pipeline as a Prefect deployment on schedule.cron"))
    return parser


def _registry_command(args: argparse.Namespace) -> None:
    from spanflow.tracking import registry_cli

    cfg = load_config(args.params, args.overrides)
    if args.command == "promote":
        registry_cli.promote_by_hand(cfg, args.version, args.reason)
    elif args.command == "registry":
        print(registry_cli.versions_table(cfg))
    elif args.command == "predict":
        print(registry_cli.predict_file(cfg, args.question, args.context_file, args.model_uri))
    elif args.command == "ensemble":
        from tasks.ensemble import ensemble_stage

        ensemble_stage(cfg, args.versions, args.rule, args.register)
    else:
        registry_cli.serve(cfg, args.model_uri, args.host, args.port, args.workers or cfg.serving.workers)


def preflight(args: argparse.Namespace, cfg: Config) -> str | None:
    """What is wrong with the command's own inputs, found in milliseconds, before Prefect, MLflow or torch are
    imported; None when nothing is."""
    reads_data = args.command in ("run", "tune", "train") or (args.command == "stage" and args.name == "prepare")
    if reads_data:
        for key in ("train", "dev"):
            source = getattr(cfg.data, key)
            if names_a_file(source) and not Path(source).exists():
                return f"data.{key}: {source}: file not found (a local SQuAD .json/.json.gz, or a Hub dataset name)"
    if args.command == "predict" and not Path(args.context_file).is_file():
        return f"--context-file {args.context_file}: file not found"
    if args.command == "serve" and args.workers is not None and args.workers < 1:
        return f"--workers {args.workers}: must be >= 1"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "profile", None):
            args.overrides = profile_overrides(args.profile) + args.overrides
        cfg = load_config(args.params, args.overrides)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(f"spanflow: error: {exc}", file=sys.stderr)
        return 2
    problem = preflight(args, cfg)
    if problem:
        print(f"spanflow: error: {problem}", file=sys.stderr)
        return 1
    if args.command in ("promote", "registry", "predict", "serve", "ensemble"):  # MLflow only: no Prefect flow
        from mlflow.exceptions import MlflowException

        try:
            _registry_command(args)
        except (FileNotFoundError, ValueError, MlflowException) as exc:
            print(f"spanflow: error: {exc}", file=sys.stderr)
            return 1
        return 0

    # the temporary server's telemetry only logs an error on machines without internet
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from mlflow.exceptions import MlflowException

    from flows.pipeline import qa_pipeline
    from flows.stages import STAGE_FLOWS, evaluate_flow, featurize_flow, prepare_flow, study_flow, train_flow, tune_flow
    from spanflow.data.squad import DataValidationError
    from spanflow.search.study import SearchIncomplete

    try:
        if args.command == "deploy":
            from flows.deploy import serve_pipeline

            serve_pipeline(args.params, args.overrides)
        elif args.command == "run":
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
        elif args.command == "study":
            study_flow(args.params, args.overrides, args.file, args.quick)
        else:
            STAGE_FLOWS[args.name](args.params, args.overrides)
    except (ConfigError, DataValidationError, FileNotFoundError, ValueError, SearchIncomplete, MlflowException) as exc:
        print(f"spanflow: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
