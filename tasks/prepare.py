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


def version_info(train: Dataset, dev: Dataset, abstain: Dataset | None = None) -> dict:
    """Content hashes of the normalized data, and the file md5 DVC records for a local file."""
    info = {}
    for name, ds in (("train", train), ("dev", dev), ("abstain", abstain)):
        if ds is None:
            continue
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


def abstain_pool(abstain: Dataset, dev: Dataset, cfg: DataConfig) -> list[Record]:
    """The articles of `data.abstain_source` that may be trained on: all after its first
    `abstain_skip_articles` (file order), a seeded sample of `abstain_articles` of them; refused when one is
    also a dev article, since no model may train on an article it is then scored on."""
    titles = list(dict.fromkeys(r["title"] for r in abstain.records))
    skip = cfg.abstain_skip_articles
    if skip >= len(titles):
        raise DataValidationError(
            abstain.source, f"data.abstain_skip_articles={skip} skips all {len(titles)} of its articles"
        )
    kept = set(titles[skip:])
    pool = sample_articles([r for r in abstain.records if r["title"] in kept], cfg.abstain_articles, cfg.seed)
    shared = sorted({r["title"] for r in pool} & {r["title"] for r in dev.records})
    if shared:
        raise DataValidationError(
            abstain.source,
            f"{len(shared)} of its articles to train on are dev articles ({', '.join(shared[:3])}): raise"
            " data.abstain_skip_articles past them or choose another dev set",
        )
    return pool


def split_and_write(
    train: Dataset, dev: Dataset, cfg: DataConfig, info: dict, abstain: Dataset | None = None, out_dir: Path = PREPARED
) -> dict:
    """Sample training articles, split them by article (both seeded) and write train/val/dev records and
    version.json. The abstain articles, when given, are split by article the same way and join both sides, so
    validation has unanswerable questions to tune the no-answer threshold on."""
    pool = sample_articles(train.records, cfg.train_articles, cfg.seed)
    train_part, val_part = split_by_article(pool, cfg.val_fraction, cfg.seed)
    if not train_part:
        raise DataValidationError(train.source, f"data.val_fraction={cfg.val_fraction} leaves no training article")
    split = {
        "train": len(train_part),
        "val": len(val_part),
        "articles": {"train": _articles(train_part), "val": _articles(val_part)},
        "sampled_articles": cfg.train_articles,
        "seed": cfg.seed,
    }
    if abstain is not None:
        abstain_train, abstain_val = split_by_article(abstain_pool(abstain, dev, cfg), cfg.val_fraction, cfg.seed)
        train_part, val_part = train_part + abstain_train, val_part + abstain_val
        split["abstain"] = {
            name: {
                "questions": len(part),
                "unanswerable": sum(r["is_impossible"] for r in part),
                "articles": _articles(part),
            }
            for name, part in (("train", abstain_train), ("val", abstain_val))
        }
        split["train"], split["val"] = len(train_part), len(val_part)
    info = {**info, "params": prepared_params(cfg), "split": split}
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
