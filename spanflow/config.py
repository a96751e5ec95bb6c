"""params.yaml parsed once into typed, validated objects; `--set dotted.key=value` overrides."""

from __future__ import annotations

import dataclasses
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from spanflow.answering.onnx_runtime import RUNTIMES
from spanflow.answering.spans import DEFAULT_SPAN_SCORING, SPAN_SCORINGS

DEFAULT_PARAMS = Path("params.yaml")
METHOD_NAMES = ("lora", "full", "freeze", "adapter", "layer_mix", "prompt", "qlora")  # modeling.py: METHODS
LORA_METHODS = ("lora", "qlora")  # the methods that train LoRA adapters (method.lora.*): the grid searches their rank
QLORA_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' 4-bit data types
TRAIN_CONTEXTS = ("split", "truncate")  # features.train_contexts: every chunk trains, or each question's first


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key."""


@dataclass
class DataConfig:
    train: str = "data/squad/train-v1.1.json.gz"  # local SQuAD .json / .json.gz or a Hugging Face dataset name
    train_split: str = "train"  # split name when `train` is a dataset name
    dev: str = "data/squad/dev-v1.1-head.json"
    dev_split: str = "validation"
    hub_config: str | None = None  # dataset config name for the Hub, if any
    val_fraction: float = 0.1  # share of training articles held out for validation
    train_articles: int | None = 44  # seeded sample of this many articles of `train`, before the split (None = all)
    train_limit: int | None = None  # first N training questions (None = all)
    dev_limit: int | None = None  # first N dev questions (None = all)
    seed: int = 42
    leaderboard_dir: str = "data/leaderboard"
    # SQuAD 2.0: a file whose unanswerable questions teach the model to abstain (no training file has any here)
    abstain_source: str | None = None
    abstain_skip_articles: int = 5  # its first N articles are never trained on (dev-v2.0: the head = the test set)
    abstain_articles: int | None = None  # seeded sample of the rest (None = all); split by article like `train`


TRAIN_LOSSES = ("real_tokens", "padded")  # spanflow.models.qa_loss.span_loss's `over`


@dataclass
class ModelConfig:
    name_or_path: str = "default"  # "default" = packaged all-MiniLM-L6-v2; else Hub id or local path
    revision: str | None = None
    attention_dropout: float | None = 0.0  # dropout on attention probabilities in training (None: the checkpoint's)
    hidden_dropout: float | None = 0.0  # dropout on hidden states in training (None: the checkpoint's)


@dataclass
class FeaturesConfig:
    chunk_length: int = 256  # tokens per chunk, question included
    overlap: int = 64  # context tokens shared by consecutive chunks
    max_query_length: int = 64
    train_contexts: str = "split"  # split: every chunk trains | truncate: each question's first chunk only


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "auto"  # Linear names, or auto: the attention and FFN Linears of the model type
    fused: bool = True  # spanflow's fused LoRA Linear (spanflow/models/lora_fused.py); false: PEFT's own forward


@dataclass
class FreezeConfig:
    trainable_layers: int = 3  # the last k transformer layers train (0 to the backbone's layer count)


@dataclass
class AdapterConfig:
    size: int = 64  # the bottleneck's features (Houlsby et al.: 8 to 256; 64 in the SQuAD 2.0 study)


LAYER_MIX_BACKBONES = ("frozen", "lora")


@dataclass
class LayerMixConfig:
    backbone: str = "frozen"  # frozen: only the mix and the QA head train | lora: method.lora's adapters train too
    embeddings: bool = True  # the embeddings' output is one of the mixed states (L + 1 of them), else the L layers'


PROMPT_INITS = ("vocab", "random")  # spanflow/models/soft_prompt.py


@dataclass
class PromptConfig:
    tokens: int = 20  # learned virtual tokens before each chunk (>= 1); they take that many of its chunk_length
    init: str = "vocab"  # vocab: copies of randomly drawn word embeddings | random: normal at their spread


@dataclass
class QloraConfig:
    quant_type: str = "nf4"  # nf4 (QLoRA's NormalFloat) | fp4: the frozen base's 4-bit data type
    double_quant: bool = True  # quantize the per-block scales too (QLoRA's double quantization: ~0.37 bit/weight less)


@dataclass
class MethodConfig:
    name: str = "lora"  # lora | full | freeze | adapter | layer_mix | prompt | qlora
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    layer_mix: LayerMixConfig = field(default_factory=LayerMixConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    qlora: QloraConfig = field(default_factory=QloraConfig)

    @property
    def uses_lora(self) -> bool:
        """Whether the method trains LoRA adapters (and method.lora.* and the searched ranks mean something)."""
        return self.name in LORA_METHODS or (self.name == "layer_mix" and self.layer_mix.backbone == "lora")

    @property
    def virtual_tokens(self) -> int:
        """Positions of a chunk the method fills before the tokenizer's: method.prompt.tokens for prompt, else 0."""
        return self.prompt.tokens if self.name == "prompt" else 0


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 16
    grad_accum_steps: int = 1
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    head_lr_ratio: float = 15.0  # the QA head (randomly initialised) learns at this multiple of learning_rate
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    early_stopping_patience: int = 2  # epochs without a lower validation loss before stopping
    select_by: str = "val_f1"  # weights kept at the end: best epoch by val_f1 or val_loss, or the last
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    log_every_steps: int = 10  # training loss and learning rate to MLflow and the learning curve every N steps
    eval_every_steps: int | None = None  # also validate every N optimizer steps inside an epoch (None: epoch ends)
    group_by_length: bool = False  # batches of similar-length features (less padding, but slower early learning)
    micro_batches: int = 4  # at most this many passes per batch, its chunks sorted by length: less padding
    pass_overhead_tokens: int = 320  # a pass's fixed cost in padded tokens: more passes only where they pay
    max_pass_tokens: int | None = None  # cap on a pass's padded tokens (rows x width): bounds activation memory
    math_attention_max_width: int = 256  # CPU passes up to this width use math attention (0: never)
    pad_to_multiple_of: int = 16  # batch width rounded up: fewer distinct shapes for oneDNN and the allocator
    loss: str = "padded"  # softmax over each pass's padded row (Hugging Face's) or real_tokens (padding-invariant)
    seed: int = 42
    num_threads: int | None = None  # torch intra-op threads (None = torch default)
    include_validation: bool = True  # final model on training + validation articles (no per-epoch validation)
    warm_start: bool = True  # final model starts from the search's best trial (LoRA + QA head), not the seed
    skip_trial_questions: bool = True  # warm-started: train on the questions the trials did not (one pass over all)


@dataclass
class EvalConfig:
    max_answer_length: int = 30  # tokens
    n_best: int = 20
    batch_size: int = 16
    workers: int = 2  # CPU: batches answered side by side by this many threads, torch's threads shared out
    no_answer_threshold: float = 0.0  # v2.0: predict "" when null score - best span score > this
    tune_no_answer_threshold: bool = False  # v2.0: the threshold that maximizes F1 on the validation split instead
    bertscore: bool = True  # BERTScore F1 of the dev answers beside EM/F1
    bertscore_model: str = "default"  # its encoder: "default" (the packaged all-MiniLM-L6-v2), a local path or Hub id
    bertscore_layer: int | None = None  # the encoder's hidden layer it compares (None: the last; 0: embeddings)
    span_scoring: str = DEFAULT_SPAN_SCORING  # chunk_softmax (the <= 5.2 QA pipeline's) | logit_sum (run_qa.py's)
    runtime: str = "torch"  # torch | onnx | onnx_int8 (ONNX Runtime on the CPU, fp32 or int8 Linears)
    int8_skip_modules: list[str] = field(default_factory=lambda: ["intermediate"])  # Linears kept fp32 in onnx_int8


@dataclass
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI wins when set
    artifact_root: str = "mlruns"
    experiment: str = "spanflow-qa"
    parent_run_id: str | None = None  # the training run is nested under this MLflow run (spanflow study sets it)


@dataclass
class RegistryConfig:
    model_name: str = "spanflow-qa"
    alias: str = "challenger"  # every newly evaluated version
    champion_alias: str = "champion"  # the version that serves; moves only through the gate or `spanflow promote`
    min_gain: float = 0.0  # dev F1 points the 95% interval's lower bound must exceed
    bootstrap_resamples: int = 2000  # paired bootstrap over dev questions (>= 1000)
    confidence: float = 0.95
    seed: int = 0


@dataclass
class ServingConfig:
    host: str = "127.0.0.1"  # `spanflow serve`; 0.0.0.0 exposes the model to the network
    port: int = 5001
    max_batch: int = 32  # rows per request; more is answered with HTTP 400
    precision: str = "fp32"  # fp32 | bf16: what the served model computes in
    workers: int = 1  # `spanflow serve` processes, each with the model and usable CPUs // workers torch threads
    runtime: str | None = None  # torch | onnx | onnx_int8; None: eval.runtime (the served model is the evaluated one)


@dataclass
class ScheduleConfig:
    deployment: str = "scheduled"  # `prefect deployment run qa-pipeline/<deployment>`
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    retries: int = 1  # a failed scheduled run is retried this many times
    retry_delay_seconds: int = 300


@dataclass
class SearchSpaceConfig:
    """The grid: every combination is one point (invalid ones are skipped with a reason)."""

    chunk_length: list[int] = field(default_factory=lambda: [256, 192])
    overlap: list[int] = field(default_factory=lambda: [64])
    lora_rank: list[int] = field(default_factory=lambda: [16])


@dataclass
class TrialConfig:
    """What one trial costs: a seeded sample of the training split, a step budget, a validation sample."""

    train_questions: int | None = 1500  # None = the whole training split
    val_questions: int | None = 300  # seeded sample of the validation split every trial is scored on (None = all)
    epochs: int = 1
    max_steps: int | None = 100  # optimizer steps per trial (None: epochs x the sample's batches)


PRUNERS = ("successive_halving", "hyperband", "median", "none")


@dataclass
class PrunerConfig:
    """Multi-fidelity pruning over training steps: trials are scored at rungs of min_steps x factor^k steps."""

    name: str = "successive_halving"  # successive_halving | hyperband | median | none
    min_steps: int = 75  # the first rung: steps every trial runs before it can be pruned
    reduction_factor: int = 2  # successive halving / hyperband: 1/factor of a rung's trials go on
    startup_trials: int = 2  # median: finished trials before any pruning


@dataclass
class SearchConfig:
    enabled: bool = True  # false: train with features.* and method.lora.rank as given
    storage: str = "sqlite:///optuna.db"  # any SQLAlchemy URL; OPTUNA_STORAGE, when set, wins
    study_name: str = "spanflow-grid"  # a hash of what trials depend on is appended
    workers: int = 1  # worker processes on this machine
    heartbeat_seconds: int = 10  # a trial without a heartbeat for 3x this is failed
    space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = obj

        walk("", self.to_dict())
        return out

    @property
    def tracking_uri(self) -> str:
        return absolute_sqlite(os.environ.get("MLFLOW_TRACKING_URI") or self.tracking.tracking_uri)

    @property
    def search_storage(self) -> str:
        return absolute_sqlite(os.environ.get("OPTUNA_STORAGE") or self.search.storage)

    def get(self, dotted: str) -> Any:
        """The value of a dotted key, e.g. "method.lora.rank"."""
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def with_values(self, values: dict[str, Any]) -> Config:
        """A validated copy with dotted keys replaced, e.g. {"features.overlap": 32}."""
        raw = self.to_dict()
        for key, value in values.items():
            _set_dotted(raw, key, value)
        cfg = _build(Config, raw)
        _validate(cfg)
        return cfg


def absolute_sqlite(url: str) -> str:
    """`sqlite:///mlflow.db` means the file in the current directory: say so with an absolute path, so
    that one URL names one file (MLflow caches its stores by URL for the life of the process)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check `value` against the annotated type; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(typ, value, key)
    if isinstance(typ, types.UnionType):  # X | None, or X | Y: the first that takes the value
        if value is None and type(None) in get_args(typ):
            return None
        options = [t for t in get_args(typ) if t is not type(None)]
        if len(options) > 1:
            for option in options:
                try:
                    return _coerce(value, option, key)
                except ConfigError:
                    pass
            names = " or ".join(getattr(t, "__name__", str(t)) for t in options)
            raise ConfigError(f"{key}: expected {names}, got {value!r}")
        typ = options[0]
    if get_origin(typ) is list:
        item = get_args(typ)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return list(value)
    if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected dotted.key=value")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML ({exc})") from exc
    _set_dotted(raw, key.strip(), value)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def _validate(cfg: Config) -> None:
    f = cfg.features
    if f.chunk_length < 16:
        raise ConfigError(f"features.chunk_length: {f.chunk_length} is too small (>= 16)")
    if f.train_contexts not in TRAIN_CONTEXTS:
        raise ConfigError(f"features.train_contexts: {f.train_contexts!r} is not one of {', '.join(TRAIN_CONTEXTS)}")
    _validate_prompt(cfg)
    virtual = cfg.method.virtual_tokens
    if not 0 <= f.overlap < f.chunk_length - virtual - f.max_query_length - 3:
        prompt = f" after method.prompt.tokens={virtual} virtual tokens" if virtual else ""
        raise ConfigError(
            f"features.overlap: {f.overlap} must be >= 0 and leave room for context in a chunk of "
            f"{f.chunk_length} tokens with a question of up to {f.max_query_length} tokens{prompt}"
        )
    for key in ("attention_dropout", "hidden_dropout"):
        value = getattr(cfg.model, key)
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"model.{key}: {value} must be in [0, 1) or null")
    if cfg.method.name not in METHOD_NAMES:
        raise ConfigError(f"method.name: unknown method {cfg.method.name!r} ({', '.join(METHOD_NAMES)})")
    if cfg.method.freeze.trainable_layers < 0:
        raise ConfigError(f"method.freeze.trainable_layers: {cfg.method.freeze.trainable_layers} must be >= 0")
    if cfg.method.adapter.size < 1:
        raise ConfigError(f"method.adapter.size: {cfg.method.adapter.size} must be >= 1")
    if cfg.method.layer_mix.backbone not in LAYER_MIX_BACKBONES:
        raise ConfigError(
            f"method.layer_mix.backbone: {cfg.method.layer_mix.backbone!r} is not {'|'.join(LAYER_MIX_BACKBONES)}"
        )
    targets = cfg.method.lora.target_modules
    if isinstance(targets, str) and targets != "auto" or isinstance(targets, list) and not targets:
        raise ConfigError(f"method.lora.target_modules: {targets!r} must be auto or a non-empty list of module names")
    if cfg.method.qlora.quant_type not in QLORA_QUANT_TYPES:
        quant_type = cfg.method.qlora.quant_type
        raise ConfigError(f"method.qlora.quant_type: {quant_type!r} is not {'|'.join(QLORA_QUANT_TYPES)}")
    if cfg.train.precision not in {"auto", "fp32", "bf16", "fp16"}:
        raise ConfigError(f"train.precision: {cfg.train.precision!r} is not auto|fp32|bf16|fp16")
    if cfg.train.select_by not in {"val_f1", "val_loss", "last"}:
        raise ConfigError(f"train.select_by: {cfg.train.select_by!r} is not val_f1|val_loss|last")
    if cfg.train.loss not in TRAIN_LOSSES:
        raise ConfigError(f"train.loss: {cfg.train.loss!r} is not {'|'.join(TRAIN_LOSSES)}")
    if cfg.train.early_stopping_patience < 1:
        raise ConfigError("train.early_stopping_patience: must be >= 1")
    if cfg.data.train_articles is not None and cfg.data.train_articles < 1:
        raise ConfigError(f"data.train_articles: {cfg.data.train_articles} must be >= 1 or null (all)")
    if cfg.eval.tune_no_answer_threshold and cfg.train.include_validation:
        raise ConfigError(
            "eval.tune_no_answer_threshold: the threshold is tuned on the validation split, which"
            " train.include_validation=true trains the final model on; set train.include_validation=false"
        )
    if cfg.data.abstain_skip_articles < 0:
        raise ConfigError(f"data.abstain_skip_articles: {cfg.data.abstain_skip_articles} must be >= 0")
    if cfg.data.abstain_articles is not None and cfg.data.abstain_articles < 1:
        raise ConfigError(f"data.abstain_articles: {cfg.data.abstain_articles} must be >= 1 or null (all)")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: {cfg.data.val_fraction} must be in [0, 1)")
    for key in ("epochs", "batch_size", "grad_accum_steps", "micro_batches", "pad_to_multiple_of"):
        if getattr(cfg.train, key) < 1:
            raise ConfigError(f"train.{key}: must be >= 1")
    if cfg.train.max_pass_tokens is not None and cfg.train.max_pass_tokens < 1:
        raise ConfigError(f"train.max_pass_tokens: {cfg.train.max_pass_tokens} must be >= 1 or null")
    if cfg.eval.workers < 1:
        raise ConfigError(f"eval.workers: {cfg.eval.workers} must be >= 1")
    if cfg.eval.runtime not in RUNTIMES:
        raise ConfigError(f"eval.runtime: {cfg.eval.runtime!r} is not {'|'.join(RUNTIMES)}")
    if not isinstance(cfg.eval.int8_skip_modules, list) or not all(
        isinstance(m, str) and m for m in cfg.eval.int8_skip_modules
    ):
        raise ConfigError(f"eval.int8_skip_modules: {cfg.eval.int8_skip_modules!r} must be a list of module names")
    if cfg.eval.span_scoring not in SPAN_SCORINGS:
        raise ConfigError(f"eval.span_scoring: {cfg.eval.span_scoring!r} is not {'|'.join(SPAN_SCORINGS)}")
    if cfg.train.head_lr_ratio <= 0:
        raise ConfigError(f"train.head_lr_ratio: {cfg.train.head_lr_ratio} must be > 0")
    for key in ("pass_overhead_tokens", "math_attention_max_width", "log_every_steps"):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"train.{key}: {getattr(cfg.train, key)} must be >= 0")
    _validate_search(cfg)
    _validate_registry_serving_schedule(cfg)


def _validate_prompt(cfg: Config) -> None:
    p, f = cfg.method.prompt, cfg.features
    if p.tokens < 1:
        raise ConfigError(f"method.prompt.tokens: {p.tokens} must be >= 1")
    if p.init not in PROMPT_INITS:
        raise ConfigError(f"method.prompt.init: {p.init!r} is not {'|'.join(PROMPT_INITS)}")
    if cfg.method.name == "prompt" and f.chunk_length - p.tokens < f.max_query_length + 4:
        raise ConfigError(
            f"features.chunk_length: {f.chunk_length} leaves no room for context after method.prompt.tokens="
            f"{p.tokens} virtual tokens and a question of up to {f.max_query_length} tokens "
            f"(needs >= {p.tokens + f.max_query_length + 4})"
        )


def _validate_registry_serving_schedule(cfg: Config) -> None:
    r, sv, sc = cfg.registry, cfg.serving, cfg.schedule
    if r.alias == r.champion_alias:
        raise ConfigError(f"registry.champion_alias: {r.champion_alias!r} must differ from registry.alias")
    if r.bootstrap_resamples < 1000:
        raise ConfigError(f"registry.bootstrap_resamples: {r.bootstrap_resamples} is below 1000")
    if not 0.5 < r.confidence < 1:
        raise ConfigError(f"registry.confidence: {r.confidence} must be in (0.5, 1)")
    if sv.max_batch < 1:
        raise ConfigError("serving.max_batch: must be >= 1")
    if sv.workers < 1:
        raise ConfigError(f"serving.workers: {sv.workers} must be >= 1")
    if not 0 < sv.port < 65536:
        raise ConfigError(f"serving.port: {sv.port} is not a TCP port")
    if sv.runtime is not None and sv.runtime not in RUNTIMES:
        raise ConfigError(f"serving.runtime: {sv.runtime!r} is not {'|'.join(RUNTIMES)} or null (eval.runtime)")
    if sv.precision not in {"fp32", "bf16"}:
        raise ConfigError(f"serving.precision: {sv.precision!r} is not fp32|bf16")
    try:
        ZoneInfo(sc.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError(f"schedule.timezone: {sc.timezone!r} is not an IANA time zone (e.g. Europe/Berlin)") from exc
    from prefect.client.schemas.schedules import CronSchedule  # Prefect's own cron check
    from pydantic import ValidationError

    try:
        CronSchedule(cron=sc.cron, timezone=sc.timezone)
    except ValidationError as exc:
        raise ConfigError(f"schedule.cron: {sc.cron!r} is not a cron expression (e.g. '0 3 * * *')") from exc
    if sc.retries < 0 or sc.retry_delay_seconds < 0:
        raise ConfigError("schedule.retries and schedule.retry_delay_seconds must be >= 0")


def _validate_search(cfg: Config) -> None:
    s = cfg.search
    minimum = {"chunk_length": 16, "overlap": 0, "lora_rank": 1}
    for name, low in minimum.items():
        values = getattr(s.space, name)
        if not values:
            raise ConfigError(f"search.space.{name}: needs at least one value")
        if len(set(values)) != len(values):
            raise ConfigError(f"search.space.{name}: {values} repeats a value")
        if min(values) < low:
            raise ConfigError(f"search.space.{name}: {min(values)} is below {low}")
    if s.workers < 1 or s.heartbeat_seconds < 1 or s.trial.epochs < 1:
        raise ConfigError("search.workers, search.heartbeat_seconds and search.trial.epochs must be >= 1")
    if s.trial.train_questions is not None and s.trial.train_questions < 1:
        raise ConfigError("search.trial.train_questions: must be >= 1 or null (all)")
    if s.trial.val_questions is not None and s.trial.val_questions < 1:
        raise ConfigError("search.trial.val_questions: must be >= 1 or null (all)")
    if s.trial.max_steps is not None and s.trial.max_steps < 1:
        raise ConfigError("search.trial.max_steps: must be >= 1 or null (epochs)")
    if s.pruner.name not in PRUNERS:
        raise ConfigError(f"search.pruner.name: {s.pruner.name!r} is not {'|'.join(PRUNERS)}")
    if s.pruner.min_steps < 1 or s.pruner.reduction_factor < 2:
        raise ConfigError("search.pruner.min_steps must be >= 1 and search.pruner.reduction_factor >= 2")
    if s.pruner.name == "hyperband" and s.trial.max_steps is None:
        raise ConfigError("search.pruner.name: hyperband needs search.trial.max_steps (its largest budget)")


PROFILES_DIR = Path("profiles")


def _read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {})."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def profile_overrides(profile: str) -> list[str]:
    """A profile (`profiles/NAME.yaml`, or a path to a YAML file) as `--set` overrides: its keys replace
    params.yaml's, and any `--set` given after it wins over both."""
    path = Path(profile) if profile.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"profile {profile!r}: {path} not found (profiles: {known})")
    raw = _read_mapping(path)
    out: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            text = yaml.safe_dump(node, default_flow_style=True, width=10**6).strip()
            out.append(f"{prefix[:-1]}={text.removesuffix('...').strip()}")

    walk("", raw)
    return out


def load_config(path: str | Path | None = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """Read params.yaml (or start from defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: params file not found")
        raw = _read_mapping(path)
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    cfg = _build(Config, raw)
    _validate(cfg)
    return cfg
