"""The training comparison's F1 check: each side is scored on the validation plus dev questions, and the gap comes
with a paired-bootstrap interval over those questions (benchmarks/train_compare.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import set_seed

from benchmarks.train_compare import _f1_gap_interval, evaluate, held_out_scores
from spanflow.config import RegistryConfig
from spanflow.models.modeling import apply_method, load_backbone, load_tokenizer
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft x transformers 5


def test_held_out_scores_cover_validation_and_dev_and_keep_the_validation_figure_apart(tmp_path: Path) -> None:
    cfg = tiny_config(make_tiny_model_dir(tmp_path / "tiny-bert"))
    set_seed(0)
    model = apply_method(load_backbone(cfg.model), cfg.method).model.eval()
    tokenizer = load_tokenizer(cfg.model)
    records = tiny_records(10)
    val, dev = records[:6], records[6:]
    scores = held_out_scores(model, tokenizer, val, dev, cfg, "fp32")
    alone = evaluate(model, tokenizer, val, cfg, "fp32")
    both = evaluate(model, tokenizer, val + dev, cfg, "fp32")
    assert len(scores["heldout_f1_per_question"]) == len(val) + len(dev)
    assert scores["heldout_f1_per_question"] == both["f1"]
    assert scores["val_f1"] == pytest.approx(sum(alone["f1"]) / len(val))
    assert scores["val_exact_match"] == pytest.approx(sum(alone["exact_match"]) / len(val))
    assert scores["heldout_f1"] == pytest.approx(sum(both["f1"]) / len(records))
    assert all(0 <= f <= 100 for f in both["f1"])
    assert held_out_scores(model, tokenizer, val, [], cfg, "fp32")["heldout_f1"] == pytest.approx(scores["val_f1"])


def _runs(spanflow: list[list[float]], trainer: list[list[float]]) -> dict:
    return {
        "spanflow": [{"heldout_f1_per_question": q} for q in spanflow],
        "trainer": [{"heldout_f1_per_question": q} for q in trainer],
    }


def test_the_gap_interval_is_over_questions_of_the_reps_mean() -> None:
    gate = RegistryConfig(bootstrap_resamples=2000)
    same = [[100.0, 0.0, 50.0, 100.0]] * 2
    equal = _f1_gap_interval(_runs(same, same), gate)
    assert (equal.low, equal.high, equal.mean_gain) == (0.0, 0.0, 0.0)

    # spanflow ahead by 10 points on every question in rep 1 and by 30 in rep 2: mean gap 20, no spread
    trainer = [[40.0, 50.0, 60.0, 70.0]] * 2
    spanflow = [[50.0, 60.0, 70.0, 80.0], [70.0, 80.0, 90.0, 100.0]]
    shifted = _f1_gap_interval(_runs(spanflow, trainer), gate)
    assert shifted.mean_gain == pytest.approx(20.0)
    assert shifted.low == pytest.approx(20.0) and shifted.high == pytest.approx(20.0)

    # a gap carried by one question of four: the interval reaches 0 on one side and the full gap on the other
    lone = _f1_gap_interval(_runs([[100.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]), gate)
    assert lone.mean_gain == pytest.approx(25.0)
    assert lone.low == 0.0 and lone.high >= 50.0
    assert gate.bootstrap_resamples == lone.resamples and lone.questions == 4
