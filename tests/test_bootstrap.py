"""The paired bootstrap behind the promotion gate."""

from __future__ import annotations

import numpy as np
import pytest

from spanflow.answering.bootstrap import paired_bootstrap
from spanflow.config import ConfigError, load_config


def test_equal_models_give_an_interval_around_zero_that_does_not_clear_zero() -> None:
    scores = np.random.default_rng(1).uniform(0, 100, 300)
    result = paired_bootstrap(scores, scores, resamples=1000, confidence=0.95, seed=0)
    assert result.mean_gain == result.low == result.high == 0.0
    assert not result.low > 0.0 and result.share_above_min_gain == 0.0


def test_a_clearly_better_model_has_the_whole_interval_above_zero() -> None:
    rng = np.random.default_rng(2)
    b = rng.uniform(0, 100, 500)
    a = np.minimum(b + rng.normal(5, 10, 500), 100)
    result = paired_bootstrap(a, b, resamples=2000, confidence=0.95, seed=0)
    assert 0 < result.low < result.mean_gain < result.high
    assert result.questions == 500 and result.resamples == 2000


def test_noise_only_gain_straddles_zero_and_the_seed_makes_it_reproducible() -> None:
    rng = np.random.default_rng(3)
    b = rng.uniform(0, 100, 200)
    a = b + rng.normal(0, 20, 200)
    first = paired_bootstrap(a, b, resamples=1000, confidence=0.95, seed=7)
    assert first.low < 0 < first.high
    assert paired_bootstrap(a, b, resamples=1000, confidence=0.95, seed=7) == first
    assert paired_bootstrap(a, b, resamples=1000, confidence=0.95, seed=8) != first


def test_the_interval_matches_the_normal_approximation_for_many_questions() -> None:
    rng = np.random.default_rng(4)
    diff = rng.normal(2.0, 10.0, 2000)
    result = paired_bootstrap(diff, np.zeros_like(diff), resamples=4000, confidence=0.95, seed=0)
    half = 1.96 * diff.std() / np.sqrt(diff.size)
    assert result.low == pytest.approx(diff.mean() - half, abs=0.1)
    assert result.high == pytest.approx(diff.mean() + half, abs=0.1)


def test_unpaired_or_empty_scores_are_rejected() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(np.ones(3), np.ones(4), resamples=1000, confidence=0.95, seed=0)
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(np.ones(0), np.ones(0), resamples=1000, confidence=0.95, seed=0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("registry.bootstrap_resamples=999", "registry.bootstrap_resamples"),
        ("registry.confidence=1.5", "registry.confidence"),
        ("registry.champion_alias=challenger", "registry.champion_alias"),
        ("serving.max_batch=0", "serving.max_batch"),
        ("serving.precision=fp16", "serving.precision"),
        ("schedule.cron=every day", "schedule.cron"),
        ("schedule.timezone=Mars/Olympus", "schedule.timezone"),
        ("schedule.retries=-1", "schedule.retries"),
    ],
)
def test_bad_registry_serving_and_schedule_settings_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
