"""The results table: the trained model next to published SQuAD systems on the same dev questions."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.answering.squad_metrics import score
from spanflow.config import Config
from spanflow.data.squad import read_jsonl
from spanflow.paths import PREDICTIONS_FILE, PREPARED

# Published EM / F1 on the whole official SQuAD v1.1 dev set (10,570 questions).
PUBLISHED_V11_DEV = (
    ("DistilBERT (Sanh et al., 2019)", 77.7, 85.8),
    ("BERT-base (Devlin et al., 2019)", 80.8, 88.5),
    ("SplaXBERT: ALBERT-xlarge, context splitting (published)", 85.95, 92.97),
)
OFFICIAL_V11_DEV_QUESTIONS = 10570


def leaderboard_scores(
    leaderboard_dir: Path, records: list[dict], version: str, ours: dict[str, str], name: str
) -> tuple[list[dict], list[tuple[str, float, float]]]:
    """The official leaderboard predictions of this SQuAD version, and ours, scored on the questions both
    cover: the 705 / 1,407 head questions, or the dev slice when it lies inside them. ([], []) when the
    leaderboard covers neither."""
    rows, covered = [], []
    for path in sorted(leaderboard_dir.glob(f"v{version}--*.json")):
        predictions = json.loads(path.read_text())
        subset = [r for r in records if r["id"] in predictions]
        if len(subset) not in (len(records), len(predictions)):
            continue  # neither covers the other: not comparable
        s = score(subset, predictions, version)
        rows.append((path.stem.split("--", 1)[1].replace("_", " "), s["exact_match"], s["f1"]))
        covered = subset
    if covered:
        s = score(covered, ours, version)
        rows.append((name, s["exact_match"], s["f1"]))
    return covered, sorted(rows, key=lambda r: r[2])


def _table(rows: list[tuple[str, float, float]]) -> list[str]:
    return ["| system | EM | F1 |", "| --- | ---: | ---: |", *[f"| {n} | {em:.1f} | {f1:.1f} |" for n, em, f1 in rows]]


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
        *([f"**{search['lead']['verdict']}**"] if search.get("lead") else []),
        "",
    ]


def abstention_lines(metrics: dict, split: dict) -> list[str]:
    """SQuAD 2.0: the answerable / unanswerable figures, the threshold and where the abstaining was learned."""
    if metrics.get("squad_version") != "2.0":
        return []
    tuned = metrics.get("no_answer_threshold_tuned_on")
    how = f"tuned on {tuned} validation questions" if tuned else "eval.no_answer_threshold, as set"
    abstain = split.get("abstain")
    learned = (
        f"learned to abstain on {abstain['train']['unanswerable']:,} unanswerable questions of"
        f" {abstain['train']['articles']} dev-v2.0 articles outside the test articles (data.abstain_source): a"
        " protocol of this repo, not the leaderboard's, whose systems trained on SQuAD 2.0 train"
        if abstain
        else "no unanswerable training questions (data.abstain_source unset)"
    )
    lines = [
        f"- HasAns EM / F1 {metrics.get('HasAns_exact', 0):.2f} / {metrics.get('HasAns_f1', 0):.2f}"
        f" ({metrics.get('HasAns_total', 0)} questions); NoAns {metrics.get('NoAns_f1', 0):.2f}"
        f" ({metrics.get('NoAns_total', 0)})",
        f"- no-answer threshold {metrics.get('no_answer_threshold', 0):.3f} ({how}); at the best threshold for these"
        f" questions (an oracle, as the official script reports) F1 would be {metrics.get('best_f1', 0):.2f}",
        f"- {learned}",
        "",
    ]
    return lines


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
    ours = f"**spanflow** ({cfg.method.name}, {Path(cfg.model.name_or_path).name})"
    predictions = json.loads(PREDICTIONS_FILE.read_text())
    covered, rows = leaderboard_scores(Path(cfg.data.leaderboard_dir), records, version, predictions, ours)
    lines = []
    if len(covered) != len(records):  # the whole dev set (or another one): its own table first
        whole = [(ours, metrics["exact_match"], metrics["f1"])]
        if version == "1.1" and len(records) == OFFICIAL_V11_DEV_QUESTIONS:
            whole = sorted([*PUBLISHED_V11_DEV, *whole], key=lambda r: r[2])
        lines += [
            f"### Dev set: {len(records)} questions, official SQuAD v{version} scoring",
            "",
            *_table(whole),
            "",
        ]
    if covered:
        lines += [
            f"### The {len(covered)} head questions, official SQuAD v{version} scoring: published leaderboard systems",
            "",
            *_table(rows),
            "",
        ]
    lines += abstention_lines(metrics, json.loads((PREPARED / "version.json").read_text()).get("split", {}))
    if "bertscore_f1" in metrics:
        lines += [
            f"- BERTScore F1 of our answers: {metrics['bertscore_f1']:.2f} (encoder: {metrics['bertscore_model']},"
            " no rescaling; eval.bertscore)",
            "",
        ]
    lines += [
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
