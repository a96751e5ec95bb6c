"""What a study's experiments say about its claims: one row per claim with the measured figures, a paired-bootstrap
interval over the dev questions, and a verdict; and the plots of F1 against cost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spanflow.answering.bootstrap import paired_bootstrap
from spanflow.config import RegistryConfig
from spanflow.study.spec import Claim, Study
from spanflow.tracking.plots import plt, save_figure


@dataclass
class Outcome:
    """One experiment's dev figures: metrics.json, and the F1 of every dev question (0-100) in dev order."""

    name: str
    metrics: dict
    question_f1: np.ndarray
    train_questions: int


@dataclass
class Finding:
    claim: Claim
    measured: str
    verdict: str  # holds | does not hold | inconclusive here


def judge(claim: Claim, a: Outcome, b: Outcome, gate: RegistryConfig) -> Finding:
    """The claim's verdict: F1 claims by the paired bootstrap of a - b over the dev questions; cost claims by the
    ratio of one run each (no interval: say so)."""
    if claim.expect == "lower":
        ratio = a.metrics[claim.metric] / b.metrics[claim.metric]
        measured = f"{claim.metric} {a.name} / {b.name} = {ratio:.2f} (want <= {claim.ratio:.2f}; one run each)"
        return Finding(claim, measured, "holds" if ratio <= claim.ratio else "does not hold")
    boot = paired_bootstrap(a.question_f1, b.question_f1, gate.bootstrap_resamples, gate.confidence, gate.seed)
    measured = (
        f"F1 {a.name} {a.metrics['f1']:.2f} vs {b.name} {b.metrics['f1']:.2f}: {boot.mean_gain:+.2f}"
        f" ({100 * gate.confidence:.0f}% interval {boot.low:+.2f} .. {boot.high:+.2f})"
    )
    if claim.expect == "better":
        verdict = "holds" if boot.low > 0 else "does not hold" if boot.high < 0 else "inconclusive here"
    else:  # equal within the margin
        m = claim.margin
        inside, outside = -m <= boot.low and boot.high <= m, boot.low > m or boot.high < -m
        verdict = "holds" if inside else "does not hold" if outside else "inconclusive here"
        measured += f", margin ±{m:g}"
    return Finding(claim, measured, verdict)


def experiments_table(study: Study, outcomes: dict[str, Outcome]) -> list[str]:
    lines = [
        "| experiment | overrides | trainable / total | train s | ms/step | peak RSS MB | dev EM | dev F1 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, o in outcomes.items():
        m = o.metrics
        share = 100 * m["trainable_params"] / m["total_params"]
        lines.append(
            f"| {name} | `{study.describe(name)}` | {m['trainable_params']:,} ({share:.1f}%)"
            f" | {m['train_seconds']:.0f} | {1000 * m['train_seconds'] / max(1, m['train_steps']):.0f}"
            f" | {m['train_peak_rss_mb']:.0f} | {m['exact_match']:.2f} | {m['f1']:.2f} |"
        )
    return lines


def findings_markdown(study: Study, outcomes: dict[str, Outcome], findings: list[Finding], command: str) -> str:
    lines = [
        f"# Study `{study.name}`: findings",
        "",
        f"Made by `{command}`: every experiment trains {study.steps} optimizer steps (unless its overrides set"
        f" `train.max_steps`) on the same data and seed (`{' '.join(study.base)}`), then answers the same"
        f" {len(next(iter(outcomes.values())).question_f1)} dev questions; an ensemble answers with the trained"
        " experiments it names. Intervals: paired bootstrap over those questions.",
        "",
        "| claim | source | what was run | measured | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in findings:
        c = f.claim
        lines.append(f"| {c.claim} | {c.source} | {c.a} vs {c.b} ({c.expect}) | {f.measured} | **{f.verdict}** |")
    return "\n".join([*lines, "", "## Experiments", "", *experiments_table(study, outcomes), ""])


def pareto_plot(outcomes: dict[str, Outcome], path: Path) -> Path:
    """F1 against trainable parameters and against training time, one point per experiment, the Pareto front
    (no other point both cheaper and better) joined."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, key, label in (
        (axes[0], "trainable_params", "trainable parameters (log)"),
        (axes[1], "train_seconds", "training time, s"),
    ):
        points = sorted((o.metrics[key], o.metrics["f1"], n) for n, o in outcomes.items())
        front, best = [], -1.0
        for x, y, _ in points:
            if y > best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*front, strict=True), "-", color="tab:green", alpha=0.6, label="Pareto front")
        for x, y, n in points:
            ax.scatter(x, y, color="tab:blue")
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "trainable_params":
            ax.set_xscale("log")
        ax.set(xlabel=label, ylabel="dev F1")
        ax.legend(loc="lower right")
    return save_figure(fig, path)


def data_curve_plot(outcomes: list[Outcome], path: Path) -> Path:
    """F1 against the number of training questions."""
    fig, ax = plt.subplots(figsize=(6, 4))
    points = sorted((o.train_questions, o.metrics["f1"], o.name) for o in outcomes)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    for x, y, n in points:
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set(xscale="log", xlabel="training questions (log)", ylabel="dev F1", title="F1 against training data")
    return save_figure(fig, path)
