"""Stage promote: the new version becomes `challenger`, and `champion` only if it beats the champion.

The gate is a paired bootstrap over the dev questions of the per-question F1 difference (challenger
minus champion); the challenger is promoted when the lower end of the interval is above
`registry.min_gain`. Both models are scored on the challenger's dev questions: the champion's own
dev predictions when they cover them, else the champion is re-scored on them here.

Every check runs, and the decision is logged, before any alias moves; `champion` moves last.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from spanflow.answering.bootstrap import paired_bootstrap
from spanflow.answering.spans import answer_texts
from spanflow.answering.squad_metrics import per_question_scores
from spanflow.config import Config
from spanflow.data.splits import check_prepared
from spanflow.data.squad import read_jsonl
from spanflow.io_utils import atomic_write_json
from spanflow.paths import PREDICTIONS_FILE, PREPARED, PROMOTION_FILE, REGISTERED_FILE, VERSION_FILE
from spanflow.tracking.registered_versions import version_answerer
from spanflow.tracking.runs import setup_mlflow

CHAMPION_PREDICTIONS_ARTIFACT = "promotion/champion_predictions.json"


def champion_version(client: MlflowClient, name: str, alias: str) -> int | None:
    aliases = client.get_registered_model(name).aliases
    return int(aliases[alias]) if alias in aliases else None


def rescore(cfg: Config, mv: ModelVersion, records: list[dict], squad_version: str) -> dict[str, str]:
    """The champion's answers to `records`, with the chunking and abstaining it was registered with."""
    with tempfile.TemporaryDirectory() as tmp:
        answer, own = version_answerer(cfg, mv.name, mv.version, tmp)
        texts = answer_texts(answer(records), squad_version, own.eval.no_answer_threshold)
    return {r["id"]: t for r, t in zip(records, texts, strict=True)}


def champion_predictions(
    cfg: Config, mv: ModelVersion, records: list[dict], squad_version: str
) -> tuple[dict[str, str], str]:
    """The champion's answers to the challenger's questions, and where they came from."""
    ids = {r["id"] for r in records}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id, artifact_path=PREDICTIONS_FILE.name, dst_path=tmp
            )
            own = json.loads(Path(path).read_text())
        except (mlflow.exceptions.MlflowException, OSError, json.JSONDecodeError):
            own = {}
    if ids <= set(own):
        return {i: own[i] for i in ids}, "its own dev evaluation"
    print(f"champion v{mv.version} was not evaluated on these {len(ids)} dev questions: re-scoring it on them")
    return rescore(cfg, mv, records, squad_version), "re-scored on the challenger's dev questions"


def gate(cfg: Config, records: list[dict], squad_version: str, challenger: dict[str, str], champion: dict[str, str]):
    """Per-question EM/F1 of both on the same questions, and the bootstrap interval of the F1 gain."""
    ids = [r["id"] for r in records]
    ours = per_question_scores(records, challenger, squad_version)
    theirs = per_question_scores(records, champion, squad_version)
    f1_a = 100 * np.array([ours[i][1] for i in ids])
    f1_b = 100 * np.array([theirs[i][1] for i in ids])
    r = cfg.registry
    boot = paired_bootstrap(f1_a, f1_b, r.bootstrap_resamples, r.confidence, r.seed, r.min_gain)
    means = {
        "challenger_f1": float(f1_a.mean()),
        "champion_f1": float(f1_b.mean()),
        "challenger_exact_match": 100 * float(np.mean([ours[i][0] for i in ids])),
        "champion_exact_match": 100 * float(np.mean([theirs[i][0] for i in ids])),
    }
    return boot, means


def decide(cfg: Config, client: MlflowClient, registered: dict) -> tuple[dict[str, Any], dict[str, str]]:
    """Everything the decision rests on, computed before any alias moves; also the champion's answers
    it was compared on (empty when there was nothing to compare)."""
    name, version = registered["model_name"], int(registered["version"])
    champion = champion_version(client, name, cfg.registry.champion_alias)
    result: dict[str, Any] = {
        "model_name": name,
        "challenger_version": version,
        "champion_version": champion,
        "min_gain": cfg.registry.min_gain,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if champion is None:
        return {**result, "promoted": True, "reason": "first model: there was no champion"}, {}
    if champion == version:
        return {**result, "promoted": False, "reason": f"v{version} is already the champion"}, {}
    records = read_jsonl(PREPARED / "dev.jsonl")
    squad_version = json.loads(VERSION_FILE.read_text())["dev"]["squad_version"]
    challenger = json.loads(PREDICTIONS_FILE.read_text())
    mv = client.get_model_version(name, str(champion))
    champion_preds, source = champion_predictions(cfg, mv, records, squad_version)
    boot, means = gate(cfg, records, squad_version, challenger, champion_preds)
    promoted = boot.low > cfg.registry.min_gain
    pct = round(100 * boot.confidence)
    interval = f"{pct}% interval of the F1 gain [{boot.low:+.2f}, {boot.high:+.2f}]"
    reason = f"{interval} {'is above' if promoted else 'does not clear'} min_gain {cfg.registry.min_gain:+.2f}"
    result.update(promoted=promoted, reason=reason, champion_scores_from=source, **means, bootstrap=boot.to_dict())
    return result, champion_preds


def record(client: MlflowClient, registered: dict, result: dict, champion_preds: dict[str, str]) -> None:
    """The decision in results/promotion.json, on the challenger's MLflow run (with the champion's answers
    it was compared on) and on its model version."""
    atomic_write_json(PROMOTION_FILE, result)
    with mlflow.start_run(run_id=registered["run_id"]):
        if champion_preds:
            mlflow.log_dict(champion_preds, CHAMPION_PREDICTIONS_ARTIFACT)
        mlflow.set_tags(
            {
                "promotion.decision": "promoted" if result["promoted"] else "not promoted",
                "promotion.reason": result["reason"],
                "promotion.challenger_version": str(result["challenger_version"]),
                "promotion.champion_version": str(result["champion_version"]),
            }
        )
        boot = result.get("bootstrap")
        if boot:
            mlflow.log_metrics(
                {
                    "promotion_f1_gain": boot["mean_gain"],
                    "promotion_f1_gain_low": boot["low"],
                    "promotion_f1_gain_high": boot["high"],
                    "promotion_champion_f1": result["champion_f1"],
                }
            )
        mlflow.log_artifact(str(PROMOTION_FILE))
    name, version = result["model_name"], str(result["challenger_version"])
    client.set_model_version_tag(name, version, "promotion.decision", "promoted" if result["promoted"] else "kept")
    client.set_model_version_tag(name, version, "promotion.reason", result["reason"])
    if result["promoted"]:
        client.set_model_version_tag(name, version, "promoted_by", "promotion gate")
        client.set_model_version_tag(name, version, "promoted_at", result["decided_at"])


def promotion_markdown(result: dict) -> str:
    ch, v = result["champion_version"], result["challenger_version"]
    verdict = f"**v{v} promoted to champion**" if result["promoted"] else f"**champion stays v{ch}**"
    lines = [f"## Promotion: {result['model_name']}", "", verdict, "", f"{result['reason']}.", ""]
    if "bootstrap" in result:
        b = result["bootstrap"]
        lines += [
            f"| | challenger v{v} | champion v{ch} |",
            "|---|---:|---:|",
            f"| dev F1 | {result['challenger_f1']:.2f} | {result['champion_f1']:.2f} |",
            f"| dev EM | {result['challenger_exact_match']:.2f} | {result['champion_exact_match']:.2f} |",
            "",
            f"Paired bootstrap over {b['questions']} dev questions, {b['resamples']} resamples (seed {b['seed']}): "
            f"mean F1 gain {b['mean_gain']:+.2f}, {round(100 * b['confidence'])}% interval "
            f"[{b['low']:+.2f}, {b['high']:+.2f}]; champion's answers from {result['champion_scores_from']}.",
        ]
    return "\n".join(lines) + "\n"


def move_aliases(cfg: Config, client: MlflowClient, result: dict) -> None:
    """The last step: `challenger` to the new version, then `champion` if it won."""
    name, version = result["model_name"], str(result["challenger_version"])
    client.set_registered_model_alias(name, cfg.registry.alias, version)
    if result["promoted"]:
        client.set_registered_model_alias(name, cfg.registry.champion_alias, version)


def promote_stage(cfg: Config) -> dict:
    check_prepared(cfg)
    setup_mlflow(cfg)
    if not REGISTERED_FILE.is_file():
        raise FileNotFoundError(f"{REGISTERED_FILE}: no registered model; run the register stage first")
    registered = json.loads(REGISTERED_FILE.read_text())
    client = MlflowClient()
    result, champion_preds = decide(cfg, client, registered)
    record(client, registered, result, champion_preds)
    move_aliases(cfg, client, result)
    print(promotion_markdown(result))
    return result


def promote_and_report(cfg: Config) -> dict:
    result = promote_stage(cfg)
    create_markdown_artifact(
        markdown=promotion_markdown(result), key="promotion", description="spanflow promotion decision"
    )
    return result


promote_task = task(promote_and_report, name="promote", cache_policy=NO_CACHE)
