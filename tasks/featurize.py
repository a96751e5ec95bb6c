"""Stage featurize: the training and validation splits as overlapping token chunks on disk."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.config import Config
from spanflow.paths import FEATURES, PREPARED
from tasks.best_params import final_config
from tasks.data import read_jsonl
from tasks.features import chunk_counts, featurize, load_features, save_features
from tasks.modeling import load_tokenizer


def features_meta(cfg: Config) -> dict:
    """What the chunks depend on; the train stage refuses chunks made otherwise."""
    version = json.loads((PREPARED / "version.json").read_text())
    return {
        "model": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "chunk_length": cfg.features.chunk_length,
        "overlap": cfg.features.overlap,
        "max_query_length": cfg.features.max_query_length,
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


def featurize_splits(cfg: Config, out_dir: Path = FEATURES) -> dict:
    cfg = final_config(cfg)
    tokenizer = load_tokenizer(cfg.model)
    meta = features_meta(cfg)
    summary = {}
    for split in ("train", "val"):
        records = split_records(split, cfg.train.include_validation)
        feats = featurize(
            records, tokenizer, cfg.features.chunk_length, cfg.features.overlap, cfg.features.max_query_length
        )
        save_features(feats, out_dir / f"{split}.pt", meta)
        counts = chunk_counts(feats, len(records))
        summary[split] = {
            "questions": len(records),
            "chunks": len(feats),
            "max_chunks_per_question": max(counts, default=0),
        }
        print(f"featurize {split}: {len(records)} questions -> {len(feats)} chunks")
    return summary


def load_split_features(cfg: Config, split: str):
    return load_features(FEATURES / f"{split}.pt", features_meta(cfg))


featurize_task = task(featurize_splits, name="featurize", cache_policy=NO_CACHE)
