"""`make bench --only ...` keeps the other comparisons of the earlier results.json, marked with when they ran."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench import carried_sections, headline


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
