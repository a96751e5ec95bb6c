"""`make bench --only ...` keeps the other comparisons of the earlier results.json, marked with when they ran; the
inference headline compares spanflow and the pipeline in the same dtype."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks.bench import carried_sections, check_targets, headline
from benchmarks.infer_compare import print_table, summarize


def _earlier(path: Path, profile: str = "full") -> None:
    sections = {
        "train": {"train_speedup_vs_trainer": 1.2, "f1_gap_vs_trainer": -5.0},
        "lora": {
            "lora_step_time_ratio": 0.6,
            "lora_peak_memory_ratio": 0.5,
            "measured": {"date": "d0", "commit": "c0"},
        },
    }
    machine = {"date": "d1", "git_commit": "c1"}
    path.write_text(json.dumps({"profile": profile, "machine": machine, "sections": sections}))


def test_sections_not_rerun_are_kept_with_when_they_were_measured(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    _earlier(path)
    kept = carried_sections(path, "full", ["train"])
    assert list(kept) == ["lora"]  # the rerun section is not carried
    assert kept["lora"]["measured"] == {"date": "d0", "commit": "c0"}  # its own date survives a second carry
    assert headline(kept)["lora_peak_memory_ratio"] == 0.5
    assert carried_sections(path, "full", ["lora"])["train"]["measured"] == {"date": "d1", "commit": "c1"}


def test_nothing_is_kept_from_another_profile_or_no_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    assert carried_sections(path, "full", ["train"]) == {}
    _earlier(path, profile="quick")
    assert carried_sections(path, "full", ["train"]) == {}


# --------------------------------------------------------------------------- inference at equal precision

RECORDS = [
    {"id": str(i), "question": f"q{i}?", "context": "c", "answers": {"text": [gold], "answer_start": [0]}}
    for i, gold in enumerate(["Ada Lovelace", "1843", "the harbour", "grain"])
]
GATE = SimpleNamespace(confidence=0.95, bootstrap_resamples=1000, seed=0)


def _child(qps: list[float], answers: list[str], **extra) -> list[dict]:
    """A side's reps as its child process reports them."""
    preds = {r["id"]: a for r, a in zip(RECORDS, answers, strict=True)}
    return [
        {
            "predictions": preds,
            "questions_per_second": q,
            "seconds": len(RECORDS) / q,
            "questions": len(RECORDS),
            "load_average_1min": [0.5, 0.5],
            "peak_rss_mb": 500.0,
            "transformers": "5.2.0",
            "torch": "2.x",
            "threads": 2,
            **extra,
        }
        for q in qps
    ]


def _equal_precision_section() -> dict:
    right = ["Ada Lovelace", "1843", "the harbour", "grain"]
    ours = {
        "bf16": _child([90.0, 100.0, 110.0], right, precision="bf16"),
        "fp32": _child([40.0, 42.0, 44.0], right, precision="fp32"),
    }
    theirs = {
        "bf16": _child([30.0, 32.0, 34.0], ["Ada Lovelace", "1843", "northern harbour", "grain"], dtype="bf16"),
        "fp32": _child([20.0, 21.0, 22.0], right, dtype="fp32"),
    }
    meta = {"questions": 4, "squad_version": "1.1", "reps": 3, "threads": 2, "cpu_count": 2}
    meta |= {"settings": {"chunk_length": 128, "overlap": 32}, "load_average_1min": [0.5, 0.5]}
    return summarize(RECORDS, "1.1", GATE, ours, theirs, meta)


def test_the_inference_headline_compares_both_sides_in_the_same_dtype() -> None:
    infer = _equal_precision_section()
    # bf16 against the pipeline in bf16, not in fp32 (100 / 21 = 4.76 would be the unequal figure)
    assert infer["precision"] == "bf16"
    assert infer["inference_speedup_vs_pipeline_equal_precision"] == pytest.approx(100 / 32)
    assert infer["inference_speedup_vs_pipeline_equal_precision_fp32"] == pytest.approx(42 / 21)
    assert infer["f1_gap_vs_pipeline"] == pytest.approx(100 / 12) and infer["f1_gap_vs_pipeline_fp32"] == 0
    assert infer["em_gap_vs_pipeline"] == pytest.approx(25.0) and infer["em_gap_vs_pipeline_fp32"] == 0
    assert infer["pipeline"]["bf16"]["dtype"] == "bf16" and infer["pipeline"]["fp32"]["dtype"] == "fp32"
    # the mixed-precision gain is a row of its own, each side against itself
    assert infer["mixed_precision_speedup"] == pytest.approx(100 / 42)
    assert infer["pipeline_mixed_precision_speedup"] == pytest.approx(32 / 21)
    assert infer["mixed_precision_f1_change"] == 0 and infer["pipeline_mixed_precision_em_change"] == -25.0
    assert infer["inference_speedup_vs_pipeline_fp32_default"] == pytest.approx(100 / 21)

    figures = headline({"infer": infer})
    assert figures["inference_speedup_vs_pipeline_equal_precision"] == pytest.approx(100 / 32)
    assert figures["em_gap_vs_pipeline"] == pytest.approx(25.0)
    assert figures["mixed_precision_speedup"] == pytest.approx(100 / 42)
    assert "inference_speedup_vs_pipeline" not in figures  # the unequal figure is no headline
    rows = {t["figure"]: t for t in check_targets(figures)}
    assert rows["inference_speedup_vs_pipeline_equal_precision"]["met"] is True  # 3.125 >= 3
    assert rows["em_gap_vs_pipeline"]["met"] is False

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_table(infer)
    assert "spanflow bf16 vs pipeline bf16 (equal precision): speed-up x3.12" in out.getvalue()
    assert "mixed precision, spanflow bf16 vs spanflow fp32: x2.38" in out.getvalue()


def test_one_precision_only_has_no_mixed_precision_row() -> None:
    right = ["Ada Lovelace", "1843", "the harbour", "grain"]
    infer = summarize(
        RECORDS, "1.1", GATE, {"fp32": _child([40.0], right)}, {"fp32": _child([20.0], right, dtype="fp32")}
    )
    assert infer["inference_speedup_vs_pipeline_equal_precision"] == pytest.approx(2.0)
    assert "mixed_precision_speedup" not in infer and headline({"infer": infer})["mixed_precision_speedup"] is None


def test_an_inference_section_of_the_rounds_before_gives_no_equal_precision_figure() -> None:
    old = {"inference_speedup_vs_pipeline": 4.68, "f1_gap_vs_pipeline": 0.21, "em_gap_vs_pipeline": 0.14}
    figures = headline({"infer": old})
    assert figures["inference_speedup_vs_pipeline_equal_precision"] is None  # bf16 vs fp32 is not relabelled
    assert figures["f1_gap_vs_pipeline"] is None and figures["em_gap_vs_pipeline"] is None


def test_onnx_runtime_rows_compare_against_torch_fp32_and_the_pipeline_fp32() -> None:
    """Each ONNX Runtime path gets its speed-up and F1 change against spanflow's torch fp32 and the pipeline's fp32,
    and the int8 F1 change is a target (within 0.5)."""
    right = ["Ada Lovelace", "1843", "the harbour", "grain"]
    one_wrong = ["Ada Lovelace", "1843", "the harbour", "salt"]
    ours = {"fp32": _child([40.0, 42.0], right)}
    theirs = {"fp32": _child([20.0, 20.0], right, dtype="fp32")}
    onnx = {"onnx": _child([41.0, 41.0], right), "onnx_int8": _child([60.0, 66.0], one_wrong)}
    infer = summarize(RECORDS, "1.1", GATE, ours, theirs, None, onnx)
    assert infer["onnx_int8_speedup_vs_torch_fp32"] == pytest.approx(63 / 41)
    assert infer["onnx_int8_speedup_vs_pipeline_fp32"] == pytest.approx(63 / 20)
    assert infer["onnx_int8_f1_change_vs_torch_fp32"] == pytest.approx(-25.0)
    assert infer["onnx_f1_change_vs_pipeline_fp32"] == 0
    figures = headline({"infer": infer | {"equal_precision": True}})
    rows = {t["figure"]: t for t in check_targets(figures)}
    assert rows["onnx_f1_change_vs_torch_fp32"]["met"] is True
    assert rows["onnx_int8_f1_change_vs_torch_fp32"]["met"] is False
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_table(
            infer
            | {"questions": 4, "squad_version": "1.1", "reps": 2, "threads": 2, "cpu_count": 2}
            | {"settings": {"chunk_length": 128, "overlap": 32}, "load_average_1min": [0.5, 0.5]}
        )
    assert "spanflow onnx_int8 (ONNX Runtime): 63.00 q/s" in out.getvalue()
    assert "x1.54 F1 -25.00 vs torch fp32" in out.getvalue()
