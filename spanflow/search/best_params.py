"""`results/best_params.yaml`: the grid point the final featurize/train/evaluate/register stages use."""

from __future__ import annotations

from typing import Any

import yaml

from spanflow.config import Config, ConfigError
from spanflow.io_utils import atomic_write_text
from spanflow.paths import RESULTS
from spanflow.search.grid import SEARCHED_KEYS

BEST_PARAMS_FILE = RESULTS / "best_params.yaml"


def write_best_params(params: dict[str, int], info: dict[str, Any]) -> None:
    """`params` maps dotted params.yaml keys to the chosen values; `info` says where they came from."""
    text = "# written by the tune stage (`spanflow tune`); the final model is trained with `params`\n"
    text += yaml.safe_dump({"params": params, **info}, sort_keys=False)
    atomic_write_text(BEST_PARAMS_FILE, text)


def read_best_params() -> dict[str, Any]:
    """best_params.yaml as the tune stage wrote it: `params` (checked) and where they came from."""
    if not BEST_PARAMS_FILE.is_file():
        raise FileNotFoundError(f"{BEST_PARAMS_FILE}: no search result; run the tune stage first (spanflow tune)")
    data = yaml.safe_load(BEST_PARAMS_FILE.read_text()) or {}
    params = data.get("params")
    if not isinstance(params, dict) or not set(params) <= set(SEARCHED_KEYS.values()):
        raise ConfigError(f"{BEST_PARAMS_FILE}: `params` must map {sorted(SEARCHED_KEYS.values())} to values")
    return data


def final_config(cfg: Config) -> Config:
    """params.yaml, with the searched keys taken from the search's best point when search.enabled."""
    if not cfg.search.enabled:
        return cfg
    return cfg.with_values(read_best_params()["params"])
