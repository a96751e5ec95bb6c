"""Is the search's best point really ahead? Its lead over the runner-up, against the noise of the scores.

Every trial is scored on the same validation questions, so two trials' per-question F1 can be compared
pairwise: a paired bootstrap over the questions gives the interval of the lead, and the bootstrap spread
of the best point's own F1 says how much one point's score moves with the questions drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spanflow.answering.bootstrap import paired_bootstrap

RESAMPLES = 2000
CONFIDENCE = 0.95


def _scores_at(trial: dict[str, Any], step: int) -> list[float] | None:
    return trial["per_question"].get(str(step))


def best_lead(trials: list[dict[str, Any]], seed: int = 0) -> dict[str, Any] | None:
    """`trials`: dicts with point and per_question ({step: [F1 per question]}), best first by the
    search's ranking (complete trials, by final F1). The runner-up is the best other trial at the largest
    step it shares with the best one, so a pruned trial is compared at the rung where it stopped.
    None when fewer than two trials were scored."""
    if len(trials) < 2 or not trials[0]["per_question"]:
        return None
    best, others = trials[0], trials[1:]
    best_steps = {int(s) for s in best["per_question"]}
    shared = max((max(best_steps & {int(s) for s in o["per_question"]}, default=0) for o in others), default=0)
    if not shared:
        return None
    rivals = [o for o in others if _scores_at(o, shared) is not None]
    runner = max(rivals, key=lambda o: float(np.mean(_scores_at(o, shared))))
    a, b = np.asarray(_scores_at(best, shared)), np.asarray(_scores_at(runner, shared))
    boot = paired_bootstrap(a, b, RESAMPLES, CONFIDENCE, seed)
    rng = np.random.default_rng(seed)
    resampled = a[rng.integers(0, a.size, size=(RESAMPLES, a.size))].mean(axis=1)
    separated = boot.low > 0
    verdict = (
        f"{best['point']} leads {runner['point']} by {boot.mean_gain:+.2f} F1 at step {shared} "
        f"(95% paired-bootstrap interval {boot.low:+.2f} .. {boot.high:+.2f}; one point's F1 moves by "
        f"±{resampled.std():.2f} with the questions drawn): "
        + ("the lead is real" if separated else "the search cannot separate these points at this budget")
    )
    return {
        "runner_up": runner["point"],
        "at_step": shared,
        "questions": int(a.size),
        "best_f1": float(a.mean()),
        "runner_up_f1": float(b.mean()),
        "lead_f1": boot.mean_gain,
        "lead_low": boot.low,
        "lead_high": boot.high,
        "confidence": CONFIDENCE,
        "best_f1_bootstrap_sd": float(resampled.std()),
        "separated": bool(separated),
        "verdict": verdict,
    }
