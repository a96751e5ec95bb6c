"""The search grid: chunk_length x overlap x lora_rank points, and the ones that cannot work."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from spanflow.config import Config

SPECIAL_TOKENS = 3  # [CLS] question [SEP] context [SEP]

# grid dimension -> the params.yaml key it sets
SEARCHED_KEYS = {
    "chunk_length": "features.chunk_length",
    "overlap": "features.overlap",
    "lora_rank": "method.lora.rank",
}


@dataclass(frozen=True, order=True)
class GridPoint:
    chunk_length: int
    overlap: int
    lora_rank: int

    @property
    def key(self) -> str:
        return f"c{self.chunk_length}-o{self.overlap}-r{self.lora_rank}"

    def params(self) -> dict[str, int]:
        return {"chunk_length": self.chunk_length, "overlap": self.overlap, "lora_rank": self.lora_rank}

    def config_values(self) -> dict[str, int]:
        """The dotted params.yaml keys this point sets."""
        return {SEARCHED_KEYS[k]: v for k, v in self.params().items()}


def grid_space(cfg: Config) -> dict[str, list[int]]:
    """The values searched per dimension, in params.yaml order. Ranks only mean something to LoRA (lora, qlora, or
    layer_mix over a LoRA backbone): other methods search chunk length x overlap at the configured method.lora.rank."""
    s = cfg.search.space
    ranks = s.lora_rank if cfg.method.uses_lora else [cfg.method.lora.rank]
    return {"chunk_length": list(s.chunk_length), "overlap": list(s.overlap), "lora_rank": list(ranks)}


def grid_points(cfg: Config) -> list[GridPoint]:
    """Every combination of the space, in params.yaml order."""
    space = grid_space(cfg)
    return [GridPoint(*p) for p in itertools.product(space["chunk_length"], space["overlap"], space["lora_rank"])]


def skip_reason(point: GridPoint, max_query_length: int, virtual_tokens: int = 0) -> str | None:
    """Why this point cannot be trained, or None: the overlap must leave room for new context (after a soft
    prompt's `virtual_tokens`, which take their share of the chunk)."""
    room = point.chunk_length - virtual_tokens - max_query_length - SPECIAL_TOKENS
    if point.overlap >= room:
        prompt = f"{virtual_tokens} virtual tokens and " if virtual_tokens else ""
        return (
            f"overlap {point.overlap} >= the {room} context tokens a {point.chunk_length}-token chunk keeps "
            f"after {prompt}a question of up to {max_query_length} tokens"
        )
    return None


def split_grid(cfg: Config) -> tuple[list[GridPoint], dict[GridPoint, str]]:
    """(points to train, {skipped point: reason})."""
    valid: list[GridPoint] = []
    skipped: dict[GridPoint, str] = {}
    for point in grid_points(cfg):
        reason = skip_reason(point, cfg.features.max_query_length, cfg.method.virtual_tokens)
        if reason:
            skipped[point] = reason
        else:
            valid.append(point)
    return valid, skipped
