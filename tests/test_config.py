"""spanflow.config: params.yaml -> typed Config, `dotted.key=value` overrides, validation errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spanflow.config import Config, ConfigError, load_config

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_load_and_match_the_file() -> None:
    cfg = load_config(REPO_PARAMS)
    assert isinstance(cfg, Config)
    loaded = cfg.to_dict()
    for section, values in yaml.safe_load(REPO_PARAMS.read_text()).items():
        for key, value in values.items():
            assert loaded[section][key] == value, f"{section}.{key}"
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.method.lora.target_modules == "auto"


def test_no_path_gives_the_dataclass_defaults() -> None:
    assert load_config(None) == Config()


def test_repo_params_equal_the_defaults() -> None:
    """The dataclass defaults document params.yaml; they should not drift apart."""
    assert load_config(REPO_PARAMS) == Config()


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("data.train_limit=200", "data", "train_limit", 200),
        ("data.train_limit=null", "data", "train_limit", None),
        ("data.train_limit=", "data", "train_limit", None),  # empty YAML is null
        ("train.learning_rate=5e-4", "train", "learning_rate", 5e-4),  # YAML 1.1: a string, coerced
        ("train.learning_rate=0.002", "train", "learning_rate", 0.002),
        ("train.learning_rate=1", "train", "learning_rate", 1.0),  # int accepted for a float
        ("train.max_steps=7", "train", "max_steps", 7),
        ("train.group_by_length=false", "train", "group_by_length", False),
        ("train.precision=bf16", "train", "precision", "bf16"),
        ("data.val_fraction=0", "data", "val_fraction", 0.0),
        ("model.name_or_path=/some/local/dir", "model", "name_or_path", "/some/local/dir"),
        ("model.name_or_path=org/model-id", "model", "name_or_path", "org/model-id"),
        ("model.revision=main", "model", "revision", "main"),
    ],
)
def test_scalar_overrides_are_yaml_parsed_and_typed(override: str, section: str, key: str, expected: object) -> None:
    cfg = load_config(REPO_PARAMS, [override])
    got = getattr(getattr(cfg, section), key)
    assert got == expected and type(got) is type(expected)


def test_list_and_nested_overrides() -> None:
    overrides = ["method.lora.target_modules=[query,value]", "method.lora.rank=4", "method.name=full"]
    cfg = load_config(REPO_PARAMS, overrides)
    assert cfg.method.lora.target_modules == ["query", "value"]
    assert cfg.method.lora.rank == 4 and cfg.method.name == "full"
    assert cfg.method.lora.alpha == 32  # untouched siblings keep the file's values


def test_later_override_wins_and_file_is_not_modified() -> None:
    before = REPO_PARAMS.read_text()
    cfg = load_config(REPO_PARAMS, ["train.epochs=3", "train.epochs=5"])
    assert cfg.train.epochs == 5
    assert REPO_PARAMS.read_text() == before


def test_overrides_without_a_file_start_from_defaults() -> None:
    cfg = load_config(None, ["train.batch_size=4"])
    assert cfg.train.batch_size == 4 and cfg.train.epochs == Config().train.epochs


def test_override_with_spaces_around_value() -> None:
    cfg = load_config(None, ["train.epochs= 3"])
    assert cfg.train.epochs == 3


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("nosuchsection.key=1", "nosuchsection"),
        ("train.nosuchkey=1", "train.nosuchkey"),
        ("method.lora.nosuchkey=1", "method.lora.nosuchkey"),
    ],
)
def test_unknown_keys_are_named(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key {named}"):
        load_config(REPO_PARAMS, [override])


def test_unknown_key_in_the_file_is_named(tmp_path: Path) -> None:
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["train"]["learning_rat"] = 0.1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"train\.learning_rat"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("train.epochs=abc", "train.epochs", "abc"),
        ("train.epochs=2.5", "train.epochs", "2.5"),
        ("train.epochs=true", "train.epochs", "True"),  # a bool is not an int
        ("train.epochs=null", "train.epochs", "None"),  # not optional
        ("train.learning_rate=fast", "train.learning_rate", "fast"),
        ("train.learning_rate=true", "train.learning_rate", "True"),
        ("train.group_by_length=1", "train.group_by_length", "1"),
        ("data.train_limit=all", "data.train_limit", "all"),
        ("model.name_or_path=123", "model.name_or_path", "123"),
        ("method.lora.target_modules=query", "method.lora.target_modules", "query"),
        ("method.lora.target_modules=[1,2]", "method.lora.target_modules", "1, 2"),
        ("train=5", "train", "5"),  # a section replaced by a scalar
    ],
)
def test_wrong_types_name_key_and_value(override: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO_PARAMS, [override])
    msg = str(info.value)
    assert msg.startswith(f"{key}:") and value in msg


def test_override_into_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs\.x.*epochs is not a section"):
        load_config(REPO_PARAMS, ["train.epochs.x=1"])


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(REPO_PARAMS, ["train.epochs"])


def test_override_with_invalid_yaml_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"override method\.lora\.target_modules.*not valid YAML"):
        load_config(REPO_PARAMS, ["method.lora.target_modules=[query,"])


@pytest.mark.parametrize(
    "overrides",
    [
        ["features.chunk_length=64", "features.max_query_length=16", "features.overlap=48"],  # == chunk - query
        ["features.chunk_length=64", "features.max_query_length=16", "features.overlap=60"],  # > chunk - query
        ["features.chunk_length=64", "features.max_query_length=16", "features.overlap=45"],  # no room for [CLS]/[SEP]
        ["features.overlap=-1"],
        ["features.chunk_length=8", "features.max_query_length=2", "features.overlap=0"],  # too small a chunk
    ],
)
def test_invalid_chunking_is_rejected(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"^features\.(overlap|chunk_length)"):
        load_config(REPO_PARAMS, overrides)


def test_largest_valid_overlap_is_accepted() -> None:
    cfg = load_config(REPO_PARAMS, ["features.chunk_length=64", "features.max_query_length=16", "features.overlap=44"])
    assert cfg.features.overlap == 44


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.precision=fp8", "train.precision"),
        ("train.precision=FP32", "train.precision"),
        ("method.name=prefix", "method.name"),
        ("data.val_fraction=1", "data.val_fraction"),
        ("data.val_fraction=-0.1", "data.val_fraction"),
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.grad_accum_steps=0", "train.grad_accum_steps"),
        ("eval.span_scoring=softmax", "eval.span_scoring"),
    ],
)
def test_invalid_values_are_rejected_by_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(REPO_PARAMS, [override])
    assert str(info.value).startswith(f"{key}:")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: [1, 2\n  batch_size: 4\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == Config()


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_flat_has_dotted_keys_for_every_leaf() -> None:
    cfg = load_config(REPO_PARAMS, ["method.lora.target_modules=[query,value]"])
    flat = cfg.flat()
    assert flat["train.learning_rate"] == cfg.train.learning_rate
    assert flat["method.lora.rank"] == cfg.method.lora.rank
    assert flat["method.lora.target_modules"] == ["query", "value"]
    assert flat["model.name_or_path"] == "default"
    assert flat["data.train_limit"] is None
    assert all("." in k for k in flat)
    assert not any(isinstance(v, dict) for v in flat.values())
    # round trip: the dotted keys are valid overrides that rebuild the same config
    rebuilt = load_config(None, [f"{k}={json.dumps(v)}" for k, v in flat.items()])
    assert rebuilt == cfg


def test_tracking_uri_env_var_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(REPO_PARAMS)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    local = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    assert cfg.tracking.tracking_uri == "sqlite:///mlflow.db" and cfg.tracking_uri == local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert cfg.tracking_uri == "http://mlflow.example:5000"
    assert cfg.tracking.tracking_uri == "sqlite:///mlflow.db"  # the configured value itself is untouched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert cfg.tracking_uri == local  # empty means unset


# --------------------------------------------------------------------------- search section


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("search.space.chunk_length=[128, x]", "search.space.chunk_length"),
        ("search.space.overlap=[]", "search.space.overlap"),
        ("search.space.lora_rank=[8, 8]", "search.space.lora_rank"),
        ("search.space.lora_rank=[0, 8]", "search.space.lora_rank"),
        ("search.space.chunk_length=128", "search.space.chunk_length"),
        ("search.pruner.name=asha", "search.pruner.name"),
        ("search.pruner.reduction_factor=1", "search.pruner.reduction_factor"),
        ("search.trial.val_questions=0", "search.trial.val_questions"),
        ("search.trial.train_questions=0", "search.trial.train_questions"),
        ("search.workers=0", "search.workers"),
        ("search.spaces.rank=[1]", "search.spaces"),
        ("features.train_contexts=first", "features.train_contexts"),
    ],
)
def test_bad_search_settings_name_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_ranks_are_searched_for_lora_and_qlora_only() -> None:
    from spanflow.search.grid import grid_points, grid_space

    lora = grid_points(load_config(None, ["search.space.lora_rank=[4, 8]"]))
    full = grid_points(load_config(None, ["search.space.lora_rank=[4, 8]", "method.name=full"]))
    assert len(lora) == 2 * len(full)
    assert grid_points(load_config(None, ["search.space.lora_rank=[4, 8]", "method.name=qlora"])) == lora
    assert {p.lora_rank for p in full} == {16}  # method.lora.rank, unused by full fine-tuning
    # the sampler's grid is the points' own: a rank-less method searches at the configured rank, not the listed ones
    freeze = load_config(None, ["search.space.lora_rank=[4, 8]", "method.name=freeze"])
    assert grid_space(freeze)["lora_rank"] == [16] and grid_space(freeze)["chunk_length"] == [256, 192]


def test_with_values_replaces_dotted_keys_and_validates() -> None:
    cfg = load_config(None)
    new = cfg.with_values({"features.chunk_length": 384, "method.lora.rank": 4})
    assert (new.features.chunk_length, new.method.lora.rank) == (384, 4)
    assert cfg.features.chunk_length == 256  # the original is untouched
    with pytest.raises(ConfigError, match="features.overlap"):
        cfg.with_values({"features.chunk_length": 128, "features.overlap": 64})


def test_optuna_storage_from_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTUNA_STORAGE", "postgresql+psycopg://u@db/optuna")
    assert load_config(None).search_storage == "postgresql+psycopg://u@db/optuna"


def test_relative_sqlite_urls_name_a_file_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert cfg.search_storage == f"sqlite:///{tmp_path.resolve() / 'optuna.db'}"
    other = load_config(None, ["tracking.tracking_uri=http://mlflow.internal:5000"])
    assert other.tracking_uri == "http://mlflow.internal:5000"


# --------------------------------------------------------------------------- profiles


def test_the_full_profile_is_overrides_that_a_later_set_still_beats() -> None:
    from spanflow.config import profile_overrides

    overrides = profile_overrides("full")
    assert "data.dev=data/squad/dev-v1.1.json.gz" in overrides and "data.train_articles=null" in overrides
    cfg = load_config("params.yaml", overrides)
    assert cfg.data.train_articles is None and cfg.search.space.chunk_length == [128, 192, 256, 384]
    assert cfg.search.space.overlap == [32, 64, 128] and cfg.search.space.lora_rank == [4, 8, 16]
    assert cfg.tracking == load_config("params.yaml").tracking  # what the profile does not name stays
    later = load_config("params.yaml", [*overrides, "search.trial.max_steps=60"])
    assert later.search.trial.max_steps == 60


def test_an_unknown_or_broken_profile_is_named(tmp_path: Path) -> None:
    from spanflow.config import profile_overrides

    with pytest.raises(ConfigError, match=r"profile 'nope'.*profiles/nope\.yaml not found.*full"):
        profile_overrides("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        profile_overrides(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("search:\n  trial:\n    max_stepz: 3\n")
    with pytest.raises(ConfigError, match="search.trial.max_stepz"):
        load_config("params.yaml", profile_overrides(str(typo)))
