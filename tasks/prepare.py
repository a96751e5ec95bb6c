"""Stages ingest -> validate -> version -> split: raw SQuAD in, versioned train/val/dev records out.

Nothing is written until both the training and the dev data passed validation.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.config import DataConfig
from spanflow.data.splits import prepared_params
from spanflow.data.squad import (
    DataValidationError,
    Record,
    atomic_write_json,
    content_hash,
    file_md5,
    ingest,
    limit_records,
    sample_articles,
    split_by_article,
    validate,
    write_jsonl_atomic,
)
from spanflow.paths import PREPARED


class Dataset:
    """Loaded records and where they came from. A plain class, not a dataclass: Prefect walks a task's
    dataclass arguments element by element, which took a minute for the 87,599 training questions."""

    def __init__(self, source: str, records: list[Record], version: str) -> None:
        self.source = source
        self.records = records
        self.version = version  # SQuAD "1.1" or "2.0"

    def __repr__(self) -> str:
        return f"Dataset({self.source!r}, {len(self.records)} questions, v{self.version})"


def load(source: str, split: str, hub_config: str | None, limit: int | None) -> Dataset:
    records, version = ingest(source, split=split, config=hub_config)
    return Dataset(source, limit_records(records, limit), version)


def check(dataset: Dataset) -> Dataset:
    if not dataset.records:
        raise DataValidationError(dataset.source, "no questions")
    validate(dataset.records, dataset.source)
    return dataset


def _articles(records: list[Record]) -> int:
    return len({r["title"] for r in records})


def version_info(train: Dataset, dev: Dataset) -> dict:
    """Content hashes of the normalized data, and the file md5 DVC records for a local file."""
    info = {}
    for name, ds in (("train", train), ("dev", dev)):
        path = Path(ds.source)
        info[name] = {
            "source": ds.source,
            "squad_version": ds.version,
            "questions": len(ds.records),
            "articles": _articles(ds.records),
            "content_sha256": content_hash(ds.records),
            "dvc_md5": file_md5(path) if path.is_file() else None,
        }
    return info


def split_and_write(train: Dataset, dev: Dataset, cfg: DataConfig, info: dict, out_dir: Path = PREPARED) -> dict:
    """Sample training articles, split them by article (both seeded) and write train/val/dev records and
    version.json."""
    pool = sample_articles(train.records, cfg.train_articles, cfg.seed)
    train_part, val_part = split_by_article(pool, cfg.val_fraction, cfg.seed)
    if not train_part:
        raise DataValidationError(train.source, f"data.val_fraction={cfg.val_fraction} leaves no training article")
    info = {
        **info,
        "params": prepared_params(cfg),
        "split": {
            "train": len(train_part),
            "val": len(val_part),
            "articles": {"train": _articles(train_part), "val": _articles(val_part)},
            "sampled_articles": cfg.train_articles,
            "seed": cfg.seed,
        },
    }
    write_jsonl_atomic(out_dir / "train.jsonl", train_part)
    write_jsonl_atomic(out_dir / "val.jsonl", val_part)
    write_jsonl_atomic(out_dir / "dev.jsonl", dev.records)
    atomic_write_json(out_dir / "version.json", info)
    return info


def _retry_io(task, task_run, state) -> bool:
    """Retry I/O hiccups, never bad data."""
    try:
        state.result()
    except (DataValidationError, FileNotFoundError):
        return False
    except Exception:
        return True
    return False


ingest_task = task(
    load, name="ingest", retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_io, cache_policy=NO_CACHE
)
validate_task = task(check, name="validate", cache_policy=NO_CACHE)
version_task = task(version_info, name="version", cache_policy=NO_CACHE)
split_task = task(split_and_write, name="split", cache_policy=NO_CACHE)
