"""The results table: the trained model next to published SQuAD systems on the same dev questions."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.config import Config
from spanflow.paths import PREPARED
from tasks.data import read_jsonl
from tasks.squad_metrics import score


def leaderboard_scores(leaderboard_dir: Path, records: list[dict], version: str) -> list[tuple[str, float, float]]:
    """Score the official leaderboard predictions of this SQuAD version on exactly these questions."""
    ids = {r["id"] for r in records}
    rows = []
    for path in sorted(leaderboard_dir.glob(f"v{version}--*.json")):
        predictions = json.loads(path.read_text())
        if not ids <= set(predictions):
            continue  # predictions for other questions (another dev slice): not comparable
        s = score(records, predictions, version)
        rows.append((path.stem.split("--", 1)[1].replace("_", " "), s["exact_match"], s["f1"]))
    return sorted(rows, key=lambda r: r[2])


def search_lines(search: dict) -> list[str]:
    """The grid search's outcome, for the results table."""
    if not search.get("study"):
        return ["### Search", "", "disabled (search.enabled: false): params.yaml values used", ""]
    params = ", ".join(f"`{k}={v}`" for k, v in search["best_params"].items())
    return [
        "### Search",
        "",
        f"best point {search['best_point']} (validation F1 {search['best_val_f1']:.1f}): {params}",
        f"{search['trials_complete']} trials complete, {search['trials_pruned']} pruned, "
        f"{search['points_skipped']} points skipped; {search['wall_seconds_total']:.0f} s wall, "
        f"~{search['pruning_saved_seconds']:.0f} s saved by pruning",
        "",
    ]


def results_table(
    cfg: Config,
    metrics: dict,
    registered: dict,
    links: dict[str, str],
    search: dict | None = None,
    promotion: dict | None = None,
) -> str:
    records = read_jsonl(PREPARED / "dev.jsonl")
    version = metrics["squad_version"]
    rows = leaderboard_scores(Path(cfg.data.leaderboard_dir), records, version)
    ours = f"**spanflow** ({cfg.method.name}, {Path(cfg.model.name_or_path).name})"
    rows.append((ours, metrics["exact_match"], metrics["f1"]))
    rows.sort(key=lambda r: r[2])
    lines = [
        f"### Dev set: {metrics['dev_questions']} questions, official SQuAD v{version} scoring",
        "",
        "| system | EM | F1 |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {em:.1f} | {f1:.1f} |" for name, em, f1 in rows],
        "",
        *search_lines(search or {}),
        "### Efficiency",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| trainable / total parameters | {metrics['trainable_params']:,} / {metrics['total_params']:,} "
        f"({100 * metrics['trainable_params'] / metrics['total_params']:.2f}%) |",
        f"| train time | {metrics['train_seconds']:.0f} s "
        f"({metrics['train_examples_per_second']:.1f} chunks/s, {metrics['precision']}) |",
        f"| inference | {metrics['inference_ms_per_question']:.1f} ms per question |",
        f"| peak RSS (train / eval) | {metrics['train_peak_rss_mb']:.0f} / {metrics['eval_peak_rss_mb']:.0f} MiB |",
        "",
        "### Where to look",
        "",
        *[f"- {k}: {v}" for k, v in links.items()],
        f"- registered model: `{registered['model_name']}` version {registered['version']}",
    ]
    if promotion:
        verdict = "promoted to" if promotion["promoted"] else "not promoted to"
        lines.append(
            f"- promotion: v{promotion['challenger_version']} {verdict} `@{cfg.registry.champion_alias}`: "
            f"{promotion['reason']} (`spanflow registry`)"
        )
    return "\n".join(lines)


report_task = task(results_table, name="report", cache_policy=NO_CACHE)
