"""The search's verdict on its best point: the lead over the runner-up against the noise of the scores."""

from __future__ import annotations

import numpy as np
import pytest

from spanflow.search.lead import best_lead


def _trial(point: str, scores_by_step: dict[int, np.ndarray]) -> dict:
    return {"point": point, "per_question": {str(k): list(v) for k, v in scores_by_step.items()}}


def test_a_clear_lead_is_separated_and_a_tie_is_not() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, 400)
    ahead = np.clip(base + 15, 0, 100)
    clear = best_lead([_trial("A", {100: ahead}), _trial("B", {100: base})])
    assert clear["runner_up"] == "B" and clear["at_step"] == 100 and clear["questions"] == 400
    assert clear["lead_f1"] == pytest.approx(ahead.mean() - base.mean())
    assert 0 < clear["lead_low"] < clear["lead_f1"] < clear["lead_high"] and clear["separated"]
    assert "the lead is real" in clear["verdict"]

    noisy = base + rng.normal(0, 30, 400)  # same mean, per-question noise: nothing to tell them apart
    tie = best_lead([_trial("A", {100: noisy}), _trial("B", {100: base})])
    assert tie["lead_low"] < 0 < tie["lead_high"] and not tie["separated"]
    assert "cannot separate" in tie["verdict"]
    assert tie["best_f1_bootstrap_sd"] == pytest.approx(noisy.std() / np.sqrt(400), rel=0.15)


def test_a_pruned_runner_up_is_compared_at_the_rung_where_it_stopped() -> None:
    good, poor = np.full(50, 60.0), np.full(50, 20.0)
    best = _trial("A", {50: good, 100: good + 10})
    pruned = _trial("B", {50: poor})  # stopped at its first rung
    lead = best_lead([best, pruned])
    assert lead["at_step"] == 50 and lead["lead_f1"] == pytest.approx(40.0) and lead["separated"]


def test_the_best_of_the_others_is_the_runner_up() -> None:
    s = {100: np.full(30, 50.0)}
    lead = best_lead([_trial("A", {100: np.full(30, 70.0)}), _trial("B", s), _trial("C", {100: np.full(30, 65.0)})])
    assert lead["runner_up"] == "C" and lead["lead_f1"] == pytest.approx(5.0)


def test_no_verdict_without_a_second_scored_trial() -> None:
    assert best_lead([_trial("A", {100: np.full(10, 50.0)})]) is None
    assert best_lead([_trial("A", {100: np.full(10, 50.0)}), _trial("B", {})]) is None
