"""Tests for spanflow.data.squad and spanflow.io_utils: load, validate, hash, split, store."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from spanflow.data.squad import (
    DataValidationError,
    Record,
    content_hash,
    file_md5,
    ingest,
    limit_records,
    load_hub_dataset,
    load_squad_json,
    read_jsonl,
    sample_articles,
    split_by_article,
    validate,
    write_jsonl_atomic,
)
from spanflow.io_utils import atomic_write_json, atomic_write_text

SQUAD_DIR = Path(__file__).resolve().parents[1] / "data" / "squad"

CONTEXT = "Normandy is a region in France. The Normans were Norse raiders."
TINY: dict[str, Any] = {
    "version": "1.1",
    "data": [
        {
            "title": "Normans",
            "paragraphs": [
                {
                    "context": CONTEXT,
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Where is Normandy?",
                            "answers": [{"text": "France", "answer_start": 24}],
                        },
                        {
                            "id": "q2",
                            "question": "Who were the Normans?",
                            "answers": [{"text": "Norse raiders", "answer_start": 49}],
                        },
                    ],
                }
            ],
        }
    ],
}


def tiny() -> dict[str, Any]:
    return copy.deepcopy(TINY)


def write_doc(tmp_path: Path, doc: Any, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def qa(doc: dict[str, Any], n: int = 0) -> dict[str, Any]:
    return doc["data"][0]["paragraphs"][0]["qas"][n]


def load_and_validate(path: Path) -> list[Record]:
    records, _ = load_squad_json(path)
    validate(records, str(path))
    return records


def record(qid: str, title: str, context: str = CONTEXT) -> Record:
    return {
        "id": qid,
        "title": title,
        "context": context,
        "question": f"question {qid}?",
        "answers": {"text": ["France"], "answer_start": [24]},
        "is_impossible": False,
    }


# ----------------------------------------------------------------- valid inputs


def test_tiny_doc_is_valid(tmp_path: Path) -> None:
    records, version = load_squad_json(write_doc(tmp_path, tiny(), "ok.json"))
    validate(records, "ok.json")
    assert version == "1.1"
    assert records[0] == {
        "id": "q1",
        "title": "Normans",
        "context": CONTEXT,
        "question": "Where is Normandy?",
        "answers": {"text": ["France"], "answer_start": [24]},
        "is_impossible": False,
    }


@pytest.mark.parametrize(
    ("name", "version", "n_questions", "n_impossible", "n_articles"),
    [
        ("train-v1.1-head.json", "1.1", 3807, 0, 11),
        ("dev-v1.1-head.json", "1.1", 705, 0, 5),
        ("dev-v2.0-head.json", "2.0", 1407, 702, 5),
        ("train-v1.1.json.gz", "1.1", 87599, 0, 442),
        ("dev-v1.1.json.gz", "1.1", 10570, 0, 48),
        ("dev-v2.0.json.gz", "2.0", 11873, 5945, 35),
    ],
)
def test_real_squad_files(name: str, version: str, n_questions: int, n_impossible: int, n_articles: int) -> None:
    path = SQUAD_DIR / name
    records, got_version = load_squad_json(path)
    validate(records, str(path))
    assert got_version == version
    assert len(records) == n_questions
    assert sum(r["is_impossible"] for r in records) == n_impossible
    assert len({r["title"] for r in records}) == n_articles
    for r in records:
        # unanswerable: no answers (plausible_answers ignored); answerable: at least one
        assert bool(r["answers"]["text"]) != r["is_impossible"]
    assert ingest(str(path))[1] == version


# ----------------------------------------------------------------- bad inputs


def test_whole_train_set_loads_and_validates_in_seconds() -> None:
    path = SQUAD_DIR / "train-v1.1.json.gz"
    t0 = time.perf_counter()
    records, _ = ingest(str(path))
    validate(records, str(path))
    assert len(records) == 87599
    assert time.perf_counter() - t0 < 30  # 2 s on the 2-core development CPU; minutes would be a regression


def test_gzipped_file_reads_like_the_plain_one(tmp_path: Path) -> None:
    path = tmp_path / "ok.json.gz"
    path.write_bytes(gzip.compress(json.dumps(tiny()).encode()))
    assert ingest(str(path)) == load_squad_json(write_doc(tmp_path, tiny(), "ok.json"))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (gzip.compress(json.dumps(TINY).encode())[:-20], "not a readable gzip file"),  # cut short in transit
        (b"{not gzip at all}", "not a readable gzip file"),
        (gzip.compress(b"version,data\n1.1,none\n"), "malformed JSON at line 1"),  # a gzip of a CSV
        (gzip.compress(b"\xff\xfe{}"), "not valid UTF-8"),
    ],
)
def test_bad_gzip_names_the_file_and_the_problem(tmp_path: Path, payload: bytes, reason: str) -> None:
    path = tmp_path / "train.json.gz"
    path.write_bytes(payload)
    with pytest.raises(DataValidationError, match=reason) as exc:
        ingest(str(path))
    assert str(path) in str(exc.value)


def test_bad_gzip_stops_prepare_before_anything_is_written(tmp_path: Path) -> None:
    from spanflow.config import DataConfig
    from tasks.prepare import check, load, split_and_write, version_info

    good = write_doc(tmp_path, tiny(), "dev.json")
    bad = tmp_path / "train.json.gz"
    bad.write_bytes(gzip.compress(json.dumps(TINY).encode())[:-20])
    out = tmp_path / "prepared"
    with pytest.raises(DataValidationError, match="train.json.gz"):
        train, dev = check(load(str(bad), "train", None, None)), check(load(str(good), "train", None, None))
        split_and_write(train, dev, DataConfig(), version_info(train, dev), out_dir=out)
    assert not out.exists()


def test_sample_articles_takes_whole_articles_seeded() -> None:
    records = [record(f"{t}-{i}", t) for t in "abcdefghij" for i in range(3)]
    sample = sample_articles(records, 4, seed=1)
    titles = {r["title"] for r in sample}
    assert len(titles) == 4 and len(sample) == 12  # every question of each sampled article
    assert sample == [r for r in records if r["title"] in titles]  # input order kept
    assert sample_articles(records, 4, seed=1) == sample
    assert {r["title"] for r in sample_articles(records, 4, seed=2)} != titles
    assert sample_articles(records, None, seed=1) == records == sample_articles(records, 99, seed=1)
    with pytest.raises(ValueError, match=">= 1"):
        sample_articles(records, 0, seed=1)


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "version": "1.1",\n  "data": [\n    {"title": oops}\n  ]\n}\n')
    with pytest.raises(DataValidationError) as exc:
        load_squad_json(path)
    msg = str(exc.value)
    assert "broken.json" in msg
    assert "malformed JSON" in msg and "line 4" in msg


def test_missing_data(tmp_path: Path) -> None:
    path = write_doc(tmp_path, {"version": "1.1", "articles": []}, "nodata.json")
    with pytest.raises(DataValidationError, match="'data'") as exc:
        load_squad_json(path)
    assert "nodata.json" in str(exc.value)


def test_missing_question_id(tmp_path: Path) -> None:
    doc = tiny()
    del qa(doc, 1)["id"]
    path = write_doc(tmp_path, doc, "noid.json")
    with pytest.raises(DataValidationError) as exc:
        load_squad_json(path)
    msg = str(exc.value)
    assert "noid.json" in msg and "missing field 'id'" in msg
    assert "qas[1]" in msg  # position instead of the (absent) id


def test_missing_question_field(tmp_path: Path) -> None:
    doc = tiny()
    del qa(doc, 1)["question"]
    path = write_doc(tmp_path, doc, "noquestion.json")
    with pytest.raises(DataValidationError) as exc:
        load_squad_json(path)
    msg = str(exc.value)
    assert "noquestion.json" in msg and "q2" in msg and "missing field 'question'" in msg
    assert exc.value.qid == "q2"


def test_empty_question(tmp_path: Path) -> None:
    doc = tiny()
    qa(doc, 1)["question"] = "   "
    path = write_doc(tmp_path, doc, "emptyq.json")
    with pytest.raises(DataValidationError) as exc:
        load_and_validate(path)
    msg = str(exc.value)
    assert "emptyq.json" in msg and "question q2" in msg and "empty question" in msg


def test_empty_context(tmp_path: Path) -> None:
    doc = tiny()
    doc["data"][0]["paragraphs"][0]["context"] = ""
    path = write_doc(tmp_path, doc, "emptyctx.json")
    with pytest.raises(DataValidationError) as exc:
        load_and_validate(path)
    msg = str(exc.value)
    assert "emptyctx.json" in msg and "q1" in msg and "empty context" in msg


def test_duplicate_ids(tmp_path: Path) -> None:
    doc = tiny()
    doc["data"].append(copy.deepcopy(doc["data"][0]))
    doc["data"][1]["title"] = "Normans_2"
    qa(doc)["id"] = "only-once"
    path = write_doc(tmp_path, doc, "dups.json")
    with pytest.raises(DataValidationError) as exc:
        load_and_validate(path)
    msg = str(exc.value)
    assert "dups.json" in msg and "duplicate id" in msg and "q2" in msg
    # both occurrences are named
    assert "records 1" in msg and "and 3" in msg
    assert "'Normans'" in msg and "'Normans_2'" in msg


def test_answer_start_not_pointing_at_text(tmp_path: Path) -> None:
    doc = tiny()
    qa(doc)["answers"][0]["answer_start"] = 23
    path = write_doc(tmp_path, doc, "misaligned.json")
    with pytest.raises(DataValidationError) as exc:
        load_and_validate(path)
    msg = str(exc.value)
    assert "misaligned.json" in msg and "q1" in msg
    assert "answer_start 23 does not point at answer text 'France'" in msg
    assert "' Franc'" in msg  # what the context has there


def test_answer_start_out_of_range(tmp_path: Path) -> None:
    doc = tiny()
    qa(doc, 1)["answers"][0]["answer_start"] = len(CONTEXT) - 3
    path = write_doc(tmp_path, doc, "range.json")
    with pytest.raises(DataValidationError) as exc:
        load_and_validate(path)
    msg = str(exc.value)
    assert "range.json" in msg and "q2" in msg and "out of range" in msg


def test_negative_answer_start(tmp_path: Path) -> None:
    doc = tiny()
    qa(doc)["answers"][0]["answer_start"] = -1
    with pytest.raises(DataValidationError, match="out of range"):
        load_and_validate(write_doc(tmp_path, doc))


@pytest.mark.parametrize("field", ["text", "answer_start"])
def test_missing_answer_field(tmp_path: Path, field: str) -> None:
    doc = tiny()
    del qa(doc, 1)["answers"][0][field]
    path = write_doc(tmp_path, doc, "noanswerfield.json")
    with pytest.raises(DataValidationError) as exc:
        load_squad_json(path)
    msg = str(exc.value)
    assert "noanswerfield.json" in msg and "q2" in msg
    assert f"missing field '{field}'" in msg


def test_missing_answers_and_wrong_types(tmp_path: Path) -> None:
    doc = tiny()
    del qa(doc)["answers"]
    with pytest.raises(DataValidationError, match="q1: missing field 'answers'"):
        load_squad_json(write_doc(tmp_path, doc))
    doc = tiny()
    qa(doc)["answers"][0]["answer_start"] = "24"
    with pytest.raises(DataValidationError, match="'answer_start' must be int, got str"):
        load_squad_json(write_doc(tmp_path, doc))
    doc = tiny()
    del doc["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(DataValidationError, match=r"paragraphs\[0\]: missing field 'context'"):
        load_squad_json(write_doc(tmp_path, doc))


def test_validate_other_record_problems() -> None:
    good = record("a", "T")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"id": ""}, "empty or missing id"),
        ({"answers": {"text": [""], "answer_start": [0]}}, "empty answer text"),
        ({"answers": {"text": ["France"], "answer_start": [24, 24]}}, "1 texts but 2"),
        (
            {"answers": {"text": [], "answer_start": []}},
            r"answerable question \(is_impossible false\)",
        ),
        ({"is_impossible": True}, "unanswerable question"),
    ]
    for change, fragment in cases:
        with pytest.raises(DataValidationError, match=fragment) as exc:
            validate([{**good, **change}], "src-name")
        assert str(exc.value).startswith("src-name: ")
    validate(
        [
            good,
            {
                **good,
                "id": "b",
                "answers": {"text": [], "answer_start": []},
                "is_impossible": True,
            },
        ],
        "ok",
    )


def test_v2_without_flag_and_missing_version(tmp_path: Path) -> None:
    doc = tiny()
    doc["version"] = "v2.0"
    qa(doc, 1)["answers"] = []
    qa(doc, 1)["plausible_answers"] = [{"text": "Norse raiders", "answer_start": 49}]
    records, version = load_squad_json(write_doc(tmp_path, doc))
    assert version == "2.0" and records[1]["is_impossible"] is True
    del doc["version"]
    qa(doc, 1)["is_impossible"] = True
    records, version = load_squad_json(write_doc(tmp_path, doc))
    assert version == "2.0"
    validate(records, "x")


# ----------------------------------------------------------------- hashing


def test_content_hash() -> None:
    records = [record("a", "T1"), record("b", "T1"), record("c", "T2")]
    h = content_hash(records)
    assert len(h) == 64 and h == content_hash(copy.deepcopy(records))
    assert h == content_hash(list(reversed(records)))
    # key order inside a record does not matter either
    assert h == content_hash([dict(reversed(list(r.items()))) for r in records])
    changed = copy.deepcopy(records)
    changed[1]["question"] += " "
    assert content_hash(changed) != h
    assert content_hash(records[:2]) != h


def test_file_md5(tmp_path: Path) -> None:
    path = SQUAD_DIR / "dev-v1.1-head.json"
    assert file_md5(path) == hashlib.md5(path.read_bytes()).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_md5(empty) == "d41d8cd98f00b204e9800998ecf8427e"


# ----------------------------------------------------------------- splitting


@pytest.fixture(scope="module")
def train_records() -> list[Record]:
    return load_squad_json(SQUAD_DIR / "train-v1.1-head.json")[0]


def test_split_by_article(train_records: list[Record]) -> None:
    train, val = split_by_article(train_records, 0.2, seed=13)
    train_titles = {r["title"] for r in train}
    val_titles = {r["title"] for r in val}
    assert not train_titles & val_titles
    assert len(val_titles) == round(0.2 * 11)
    # union equals input; original order is kept within each split
    assert sorted(r["id"] for r in train + val) == sorted(r["id"] for r in train_records)
    position = {r["id"]: i for i, r in enumerate(train_records)}
    for part in (train, val):
        assert [position[r["id"]] for r in part] == sorted(position[r["id"]] for r in part)
    # deterministic for a seed; some other seed picks different articles
    assert split_by_article(train_records, 0.2, seed=13) == (train, val)
    other = [{r["title"] for r in split_by_article(train_records, 0.2, seed=s)[1]} for s in range(20)]
    assert any(titles != val_titles for titles in other)


def test_split_by_article_edges() -> None:
    recs = [record("a", "T1"), record("b", "T1"), record("c", "T2")]
    assert split_by_article(recs, 0.0, seed=1) == (recs, [])
    train, val = split_by_article(recs, 0.01, seed=1)  # rounds to 0 -> still one article
    assert len({r["title"] for r in val}) == 1 and train
    train, val = split_by_article(recs, 0.99, seed=1)  # rounds to 2 -> one left to train
    assert len({r["title"] for r in val}) == 1 and train
    assert split_by_article([], 0.5, seed=1) == ([], [])
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="val_fraction"):
            split_by_article(recs, bad, seed=1)


def test_limit_records() -> None:
    recs = [record(str(i), "T") for i in range(5)]
    assert limit_records(recs, None) == recs
    assert limit_records(recs, 0) == recs
    assert limit_records(recs, 2) == recs[:2]
    assert limit_records(recs, 50) == recs
    with pytest.raises(ValueError):
        limit_records(recs, -1)


# ----------------------------------------------------------------- datasets (offline)


HF_ROWS = [
    {
        "id": "h1",
        "title": "Normans",
        "context": CONTEXT,
        "question": "Where is Normandy?",
        "answers": {"text": ["France"], "answer_start": [24]},
    },
    {
        "id": "h2",
        "title": "Normans",
        "context": CONTEXT,
        "question": "Who rules the moon?",
        "answers": {"text": [], "answer_start": []},
    },
]


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network, and every cache under tmp_path."""
    import datasets.config
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    # datasets/huggingface_hub read these at import time
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_hub_dataset_from_local_json_file(tmp_path: Path, hf_offline: Path) -> None:
    path = write_rows(tmp_path / "rows.jsonl", HF_ROWS)
    records = load_hub_dataset("json", split="train", data_files=str(path), cache_dir=str(hf_offline))
    assert [r["id"] for r in records] == ["h1", "h2"]
    assert records[0]["answers"] == {"text": ["France"], "answer_start": [24]}
    assert [r["is_impossible"] for r in records] == [False, True]
    validate(records, "rows.jsonl")


def test_load_hub_dataset_from_local_directory(tmp_path: Path, hf_offline: Path) -> None:
    directory = tmp_path / "my_squad"
    write_rows(directory / "train.jsonl", HF_ROWS[:1])
    records = load_hub_dataset(str(directory), split="train", cache_dir=str(hf_offline))
    assert [r["id"] for r in records] == ["h1"]
    # ingest dispatches a local directory to the datasets loader
    records, version = ingest(str(directory), split="train")
    assert [r["id"] for r in records] == ["h1"] and version == "1.1"


def test_load_hub_dataset_missing_column(tmp_path: Path, hf_offline: Path) -> None:
    rows = [{k: v for k, v in HF_ROWS[0].items() if k != "question"}]
    path = write_rows(tmp_path / "noq.jsonl", rows)
    with pytest.raises(DataValidationError, match="h1: missing column 'question'") as exc:
        load_hub_dataset("json", split="train", data_files=str(path))
    assert "noq.jsonl" in str(exc.value)


def test_ingest_dispatch(tmp_path: Path, hf_offline: Path) -> None:
    # SQuAD JSON file
    records, version = ingest(str(write_doc(tmp_path, tiny(), "tiny.json")))
    assert version == "1.1" and [r["id"] for r in records] == ["q1", "q2"]
    # JSON-lines file in HF schema -> datasets "json" builder; impossible rows -> 2.0
    records, version = ingest(str(write_rows(tmp_path / "rows.jsonl", HF_ROWS)), split="dev")
    assert version == "2.0" and [r["id"] for r in records] == ["h1", "h2"]
    # paths that do not exist
    for missing in (
        tmp_path / "nope.json",
        tmp_path / "nope" / "dir",
        "data/nope.json",
    ):
        with pytest.raises(DataValidationError, match="file not found") as exc:
            ingest(str(missing))
        assert str(missing) in str(exc.value)


# ----------------------------------------------------------------- storage


def test_jsonl_roundtrip(tmp_path: Path) -> None:
    recs = [record("a", "Ünïcode ✓"), record("b", "T")]
    path = tmp_path / "sub" / "dir" / "records.jsonl"
    write_jsonl_atomic(path, recs)
    assert read_jsonl(path) == recs
    assert "Ünïcode ✓" in path.read_text(encoding="utf-8")  # not \u-escaped
    assert sorted(p.name for p in path.parent.iterdir()) == ["records.jsonl"]


def test_read_jsonl_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\n\n{"id": \n')
    with pytest.raises(DataValidationError, match="line 3") as exc:
        read_jsonl(path)
    assert "bad.jsonl" in str(exc.value)


def test_atomic_writes_leave_no_temp_file(tmp_path: Path) -> None:
    text_path = tmp_path / "a" / "b.txt"
    atomic_write_text(text_path, "hello\n")
    atomic_write_text(text_path, "world\n")
    assert text_path.read_text() == "world\n"
    json_path = tmp_path / "a" / "c.json"
    atomic_write_json(json_path, {"k": "é", "n": [1, 2]})
    assert json.loads(json_path.read_text(encoding="utf-8")) == {"k": "é", "n": [1, 2]}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.txt", "c.json"]
    assert oct(text_path.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's 0600


def test_atomic_write_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    write_jsonl_atomic(path, [record("a", "T")])
    before = path.read_bytes()
    # the second record is not JSON-serializable: fails after the first line is written
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [record("b", "T"), {"id": "c", "bad": object()}])
    assert path.read_bytes() == before
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": {1, 2}})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]


def test_a_stage_refuses_records_prepared_with_other_data_params(tmp_path: Path, monkeypatch) -> None:
    """`spanflow evaluate --set data.dev=OTHER` must not score the dev set prepared earlier under OTHER's name."""
    from spanflow.config import Config
    from spanflow.data.splits import check_prepared
    from tasks.prepare import check, load, split_and_write, version_info

    monkeypatch.chdir(tmp_path)
    train_file, dev_file = write_doc(tmp_path, tiny(), "train.json"), write_doc(tmp_path, tiny(), "dev.json")
    cfg = Config().with_values({"data.train": str(train_file), "data.dev": str(dev_file), "data.val_fraction": 0.0})
    train, dev = check(load(str(train_file), "train", None, None)), check(load(str(dev_file), "train", None, None))
    split_and_write(train, dev, cfg.data, version_info(train, dev))
    assert check_prepared(cfg)["params"]["dev"] == str(dev_file)
    assert check_prepared(cfg.with_values({"data.leaderboard_dir": "elsewhere"}))  # not a data param

    other = cfg.with_values({"data.dev": "OTHER.json", "data.dev_limit": 1500})
    with pytest.raises(ValueError) as exc:
        check_prepared(other)
    message = str(exc.value)
    assert f"data.dev={str(dev_file)!r} there, 'OTHER.json' here" in message
    assert "data.dev_limit=None there, 1500 here" in message and "spanflow stage prepare" in message


def test_only_file_suffixes_name_a_file_a_hub_id_with_a_slash_does_not() -> None:
    from spanflow.data.squad import names_a_file

    assert names_a_file("data/squad/train-v1.1.json.gz") and names_a_file("dev.json") and names_a_file("x/y.parquet")
    assert not names_a_file("rajpurkar/squad") and not names_a_file("squad")  # Hub names: the CLI lets them pass
