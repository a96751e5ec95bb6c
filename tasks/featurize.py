"""Stage featurize: the training and validation splits as overlapping token chunks on disk."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.config import Config
from spanflow.data.features import chunk_counts, featurize, first_chunks, save_features
from spanflow.data.splits import check_prepared, features_meta, split_records
from spanflow.models.modeling import load_tokenizer
from spanflow.paths import FEATURES
from spanflow.search.best_params import final_config


def featurize_splits(cfg: Config, out_dir: Path = FEATURES) -> dict:
    check_prepared(cfg)
    cfg = final_config(cfg)
    tokenizer = load_tokenizer(cfg.model)
    meta = features_meta(cfg)
    summary = {}
    for split in ("train", "val"):
        records = split_records(split, cfg.train.include_validation)
        f = cfg.features
        feats = featurize(
            records,
            tokenizer,
            f.chunk_length,
            f.overlap,
            f.max_query_length,
            virtual_tokens=cfg.method.virtual_tokens,  # a soft prompt's: the tokenizer gets the rest of the chunk
        )
        if split == "train" and f.train_contexts == "truncate":  # validation answers as inference does: split
            feats = first_chunks(feats)
        save_features(feats, out_dir / f"{split}.pt", meta)
        counts = chunk_counts(feats, len(records))
        summary[split] = {
            "questions": len(records),
            "chunks": len(feats),
            "max_chunks_per_question": max(counts, default=0),
        }
        print(f"featurize {split}: {len(records)} questions -> {len(feats)} chunks")
    return summary


featurize_task = task(featurize_splits, name="featurize", cache_policy=NO_CACHE)
