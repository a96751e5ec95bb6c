"""The prepared splits and their chunks on disk, as the stages read them."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from typing import Any

from spanflow.config import Config, DataConfig
from spanflow.data.features import Features, Record, load_features
from spanflow.data.squad import read_jsonl
from spanflow.paths import FEATURES, PREPARED, VERSION_FILE

NOT_DATA = ("leaderboard_dir",)  # read by the report only: the prepared records do not depend on it


def prepared_params(data: DataConfig) -> dict[str, Any]:
    """The data.* values the prepared records are made from (kept in version.json)."""
    return {k: v for k, v in asdict(data).items() if k not in NOT_DATA}


def check_prepared(cfg: Config) -> dict:
    """version.json of data/prepared, once it is known to come from this config's data.* values; otherwise a
    ValueError naming the keys that differ and the stage that makes them agree. No stage may score or train
    on records other than the ones its params name."""
    if not VERSION_FILE.is_file():
        raise FileNotFoundError(
            f"{VERSION_FILE}: no prepared data; run the prepare stage first (spanflow stage prepare)"
        )
    version = json.loads(VERSION_FILE.read_text())
    made_with, wanted = version.get("params"), prepared_params(cfg.data)
    if made_with != wanted:
        if made_with is None:
            diff = "(made by an older spanflow, which did not record them)"
        else:
            keys = sorted(k for k in wanted if made_with.get(k) != wanted[k])
            diff = ", ".join(f"data.{k}={made_with.get(k)!r} there, {wanted[k]!r} here" for k in keys)
        raise ValueError(
            f"{PREPARED} was prepared with other data params: {diff}; run `spanflow stage prepare` with these "
            "params first (or `dvc repro`), or drop the overrides"
        )
    return version


def features_meta(cfg: Config) -> dict:
    """What the chunks depend on; the train stage refuses chunks made otherwise."""
    version = json.loads((PREPARED / "version.json").read_text())
    return {
        "model": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "chunk_length": cfg.features.chunk_length,
        "virtual_tokens": cfg.method.virtual_tokens,  # a soft prompt's share of chunk_length
        "overlap": cfg.features.overlap,
        "max_query_length": cfg.features.max_query_length,
        "train_contexts": cfg.features.train_contexts,
        "train_sha256": version["train"]["content_sha256"],
        "split": version["split"],
        "include_validation": cfg.train.include_validation,
    }


def split_records(split: str, include_validation: bool) -> list[dict]:
    """The records behind a split's chunks; the final model's "train" adds the validation articles."""
    records = read_jsonl(PREPARED / f"{split}.jsonl")
    if split == "train" and include_validation:
        records += read_jsonl(PREPARED / "val.jsonl")
    return records


def load_split_features(cfg: Config, split: str) -> Features:
    """A split's chunks as the featurize stage saved them; refused when made with other params."""
    return load_features(FEATURES / f"{split}.pt", features_meta(cfg))


def sample_questions(records: list[Record], n: int | None, seed: int) -> list[Record]:
    """A seeded sample of n questions, in their original order (all of them when n is None)."""
    if n is None or n >= len(records):
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]


def trial_train_records(cfg: Config) -> list[Record]:
    """The questions every search trial trains on: a seeded sample of the training split."""
    return sample_questions(read_jsonl(PREPARED / "train.jsonl"), cfg.search.trial.train_questions, cfg.data.seed)


def without_questions(feats: Features, records: list[Record], skip: set[str]) -> Features:
    """The chunks of `feats` whose question (`records[example_index]`) is not in `skip`."""
    keep = [k for k, ex in enumerate(feats.example_index) if records[ex]["id"] not in skip]
    return Features(**{name: [column[k] for k in keep] for name, column in feats.to_dict().items()})
