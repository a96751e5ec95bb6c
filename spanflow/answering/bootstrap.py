"""Paired bootstrap over questions: is model A's mean score really above model B's?"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from spanflow.answering.squad_metrics import per_question_scores

_CHUNK = 256  # resamples drawn at once: bounds memory at 256 x n indices


@dataclass(frozen=True)
class BootstrapResult:
    mean_gain: float  # mean of (a - b) over the questions, in the scores' unit
    low: float  # the confidence interval of the mean gain
    high: float
    confidence: float
    resamples: int
    questions: int
    seed: int
    share_above_min_gain: float  # share of resampled means above the required gain

    def to_dict(self) -> dict:
        return asdict(self)


def question_f1(records: Sequence[dict], predictions: Mapping[str, str], version: str) -> np.ndarray:
    """Every question's F1 (0-100) by the official scoring, in the order of `records`: what the bootstrap resamples."""
    per_question = per_question_scores(records, predictions, version)
    return np.array([100 * per_question[r["id"]][1] for r in records])


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int, confidence: float, seed: int, min_gain: float = 0.0
) -> BootstrapResult:
    """Percentile interval of mean(a - b): questions are resampled with replacement, the same draw for
    both models (paired), `resamples` times with a seeded generator."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired bootstrap needs two equal-length score lists, got {a.shape} and {b.shape}")
    if resamples < 1:
        raise ValueError(f"resamples: {resamples} must be >= 1")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for lo in range(0, resamples, _CHUNK):
        k = min(_CHUNK, resamples - lo)
        means[lo : lo + k] = diff[rng.integers(0, diff.size, size=(k, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return BootstrapResult(
        mean_gain=float(diff.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
        questions=int(diff.size),
        seed=seed,
        share_above_min_gain=float((means > min_gain).mean()),
    )
