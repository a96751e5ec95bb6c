"""Methods, precision, the training loop (loss, determinism, checkpoint/resume, early stopping) and the
merged export, on a tiny randomly initialised BERT with the real tokenizer and real context splitting (CPU)."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, BertForQuestionAnswering, set_seed

from spanflow.answering.inference import pad_batch, padded_width, resolve_precision, run_model
from spanflow.config import Config, ConfigError, MethodConfig, ModelConfig
from spanflow.data.features import Features, featurize
from spanflow.data.squad import validate
from spanflow.models.modeling import (
    PreparedModel,
    apply_method,
    count_params,
    export_merged,
    load_backbone,
    load_tokenizer,
    resolve_model_path,
    trainable_state,
)
from spanflow.training.loop import (
    EpochStats,
    TrainResult,
    accumulate_batch,
    latest_checkpoint,
    param_groups,
    train_model,
)
from spanflow.training.passes import attention_kernel, length_sorted_passes
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft x transformers 5

CPU = torch.device("cpu")
N_RECORDS = 16
# a learning rate at which LoRA on the tiny random model visibly learns in a few epochs
FAST = [
    "train.learning_rate=1e-2",
    "train.precision=fp32",
    "train.early_stopping_patience=100",
    "train.select_by=val_loss",
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matrices: one thread is fastest and immune to oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return load_tokenizer(ModelConfig(name_or_path=str(model_dir)))


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return tiny_records(N_RECORDS)


@pytest.fixture(scope="module")
def feats(model_dir: Path, tokenizer, records: list[dict]) -> Features:
    f = tiny_config(model_dir).features
    return featurize(records, tokenizer, f.chunk_length, f.overlap, f.max_query_length)


@dataclasses.dataclass
class Run:
    prepared: PreparedModel
    result: TrainResult
    weights: dict[int, dict[str, torch.Tensor]]  # epoch -> trainable weights right after that epoch's training
    cfg: Config


class Killed(Exception):
    """Stands in for a kill: raised from on_epoch, i.e. before that epoch's checkpoint is written."""


@pytest.fixture
def train(model_dir: Path, tokenizer, records: list[dict], feats: Features, tmp_path: Path) -> Callable[..., Run]:
    """Train a fresh tiny model; the memorised set is its own validation set."""

    def _train(
        overrides: list[str] | None = None,
        ckpt_dir: Path | None = None,
        resume: bool = False,
        kill_at: int | None = None,
        init_seed: int | None = None,
    ) -> Run:
        cfg = tiny_config(model_dir, overrides)
        # LoRA's init draws from the global RNG, which train_model only seeds afterwards: seed it here so that
        # a run does not depend on what ran before it in this process
        set_seed(cfg.train.seed if init_seed is None else init_seed)
        backbone = load_backbone(cfg.model, cfg.method, resolve_precision(cfg.train.precision, CPU))  # qlora: 4-bit
        prepared = apply_method(backbone, cfg.method)
        weights: dict[int, dict[str, torch.Tensor]] = {}

        def on_epoch(stats: EpochStats) -> None:
            if stats.epoch == kill_at:
                raise Killed(stats.epoch)
            weights[stats.epoch] = trainable_state(prepared.model)

        result = train_model(
            prepared,
            feats,
            feats,
            records,
            cfg,
            tokenizer.pad_token_id,
            ckpt_dir or tmp_path / "ckpt",
            resume=resume,
            on_epoch=on_epoch,
        )
        return Run(prepared, result, weights, cfg)

    return _train


def _without_time(history: list[EpochStats]) -> list[dict]:
    return [{k: v for k, v in dataclasses.asdict(h).items() if k != "seconds"} for h in history]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def _train_set_loss(model: torch.nn.Module, feats: Features, pad_id: int, precision: str = "fp32") -> float:
    return run_model(model, feats, 16, precision, pad_id, with_loss=True)[2]


# --------------------------------------------------------------------------- helpers themselves


def test_tiny_model_dir_loads_through_the_local_path(model_dir: Path, tokenizer) -> None:
    cfg = ModelConfig(name_or_path=str(model_dir))
    assert resolve_model_path(cfg.name_or_path) == str(model_dir)
    model = load_backbone(cfg)
    assert isinstance(model, BertForQuestionAnswering)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    packaged = load_tokenizer(ModelConfig())
    assert tokenizer.is_fast and tokenizer.get_vocab() == packaged.get_vocab()
    assert model.config.vocab_size == len(tokenizer)
    # same seed, same weights: the tiny model is reproducible
    again = load_backbone(ModelConfig(name_or_path=str(make_tiny_model_dir(model_dir.parent / "again"))))
    for (n, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_tiny_records_are_valid_and_chunked(records: list[dict], feats: Features) -> None:
    validate(records, "tiny")
    assert len({r["title"] for r in records}) > 1 and len({r["id"] for r in records}) == N_RECORDS
    for r in records:
        start, text = r["answers"]["answer_start"][0], r["answers"]["text"][0]
        assert r["context"][start : start + len(text)] == text
    assert max(feats.lengths()) <= 64 and len(feats) > N_RECORDS  # some contexts need two chunks
    assert sum(s > 0 for s in feats.start_positions) >= N_RECORDS  # every answer is labelled in some chunk
    assert tiny_records(3) == records[:3]


# --------------------------------------------------------------------------- methods


def test_lora_trains_adapters_and_head_only(model_dir: Path) -> None:
    method = MethodConfig(name="lora")
    prepared = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)
    assert (prepared.trainable_params, prepared.total_params) == count_params(prepared.model)
    assert 0 < prepared.trainable_params < prepared.total_params / 10
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert any("qa_outputs" in n for n in trainable)
    for name in trainable:
        assert "lora_" in name or "qa_outputs.modules_to_save" in name, name
    lora_targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if "lora_" in n}
    assert method.lora.target_modules == "auto" and lora_targets == {"query", "key", "value", "dense"}  # BERT's
    frozen = [n for n, p in prepared.model.named_parameters() if not p.requires_grad]
    assert any("word_embeddings" in n for n in frozen)
    assert any("attention.self.query.base_layer" in n for n in frozen)
    assert any("qa_outputs.original_module" in n for n in frozen)


def test_optimizer_groups_give_the_head_its_learning_rate(model_dir: Path) -> None:
    prepared = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), MethodConfig(name="lora"))
    tc = Config().train
    tc.learning_rate, tc.head_lr_ratio = 1e-3, 15.0
    groups = param_groups(prepared.model, tc)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)  # every trainable weight in exactly one group
    for name, p in trainable:
        expected = 15e-3 if "qa_outputs" in name else 1e-3
        assert lr_of[id(p)] == pytest.approx(expected), name
        assert decay_of[id(p)] == (tc.weight_decay if p.ndim >= 2 else 0.0), name


def test_head_learning_rate_ratio_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="train.head_lr_ratio"):
        Config().with_values({"train.head_lr_ratio": 0.0})


def test_lora_target_modules_are_honoured(model_dir: Path) -> None:
    method = MethodConfig(name="lora")
    method.lora.target_modules = ["query", "value"]
    method.lora.rank = 4
    prepared = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)
    names = [n for n, p in prepared.model.named_parameters() if p.requires_grad and "lora_" in n]
    assert names and all(".query." in n or ".value." in n for n in names)
    # rank 4 on query and value (32 x 32) in 2 layers: (32*4 + 4*32) * 2 * 2, plus the QA head (32*2 + 2)
    assert prepared.trainable_params == (32 * 4 + 4 * 32) * 2 * 2 + 32 * 2 + 2


def test_full_trains_everything(model_dir: Path) -> None:
    backbone = load_backbone(ModelConfig(name_or_path=str(model_dir)))
    for p in backbone.bert.embeddings.parameters():
        p.requires_grad_(False)
    prepared = apply_method(backbone, MethodConfig(name="full"))
    assert prepared.trainable_params == prepared.total_params == sum(p.numel() for p in backbone.parameters())
    assert all(p.requires_grad for p in prepared.model.parameters())


def test_freeze_trains_the_last_layers_every_layernorm_and_the_head(model_dir: Path) -> None:
    """method freeze, k = 1 of 2 layers: layer 1, all LayerNorms (layer 0's and the embeddings' too) and the QA head
    train; the embeddings and layer 0's matrices stay; k = 0 leaves the norms and the head."""
    method = MethodConfig(name="freeze")
    method.freeze.trainable_layers = 1
    prepared = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert all(".layer.1." in n or "LayerNorm" in n or n.startswith("qa_outputs.") for n in trainable), trainable
    assert "bert.encoder.layer.1.attention.self.query.weight" in trainable
    assert "bert.encoder.layer.0.output.LayerNorm.weight" in trainable
    assert "bert.embeddings.LayerNorm.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.query.weight" not in trainable
    assert "bert.embeddings.word_embeddings.weight" not in trainable
    layer = sum(p.numel() for p in prepared.model.bert.encoder.layer[1].parameters())
    norm = 32 + 32  # a LayerNorm's weight and bias
    head = 32 * 2 + 2
    assert prepared.trainable_params == layer + 2 * norm + norm + head  # + layer 0's two norms, the embeddings' one
    method.freeze.trainable_layers = 0
    none = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)
    assert none.trainable_params == 2 * 2 * norm + norm + head
    method.freeze.trainable_layers = 3
    with pytest.raises(ValueError, match=r"method.freeze.trainable_layers: 3 is not in 0..2"):
        apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)


def test_unknown_method_is_a_value_error(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="prefix"):
        apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), MethodConfig(name="prefix"))


# --------------------------------------------------------------------------- precision and batching


def test_explicit_precisions_stay() -> None:
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"


def test_auto_on_this_cpu() -> None:
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")


@pytest.mark.parametrize(
    ("amx", "avx512_bf16", "expected"),
    [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16")],
)
def test_auto_on_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, amx: bool, avx512_bf16: bool, expected: str):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda(monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", CPU)


def test_pad_batch_pads_to_the_longest_chunk_of_the_batch(feats: Features) -> None:
    idx = [0, 1, 2]
    lengths = [len(feats.input_ids[i]) for i in idx]
    batch = pad_batch(feats, idx, pad_id=0, with_labels=True)
    assert batch["input_ids"].shape == (3, max(lengths))
    for row, (i, n) in enumerate(zip(idx, lengths, strict=True)):
        assert batch["input_ids"][row, :n].tolist() == feats.input_ids[i]
        assert batch["token_type_ids"][row, :n].tolist() == feats.token_type_ids[i]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == 0).all()
    assert batch["start_positions"].tolist() == [feats.start_positions[i] for i in idx]
    assert batch["end_positions"].tolist() == [feats.end_positions[i] for i in idx]
    assert set(pad_batch(feats, idx, 0, with_labels=False)) == {"input_ids", "token_type_ids", "attention_mask"}


@pytest.mark.parametrize("multiple", [8, 16])
def test_pad_batch_rounds_the_width_up_to_a_multiple(feats: Features, multiple: int) -> None:
    idx = [0, 1, 2]
    longest = max(len(feats.input_ids[i]) for i in idx)
    batch = pad_batch(feats, idx, pad_id=0, with_labels=True, multiple_of=multiple)
    width = batch["input_ids"].shape[1]
    assert width % multiple == 0 and longest <= width < longest + multiple
    assert batch["attention_mask"].sum().item() == sum(len(feats.input_ids[i]) for i in idx)  # pads stay masked


def test_pad_to_multiple_of_below_one_is_refused() -> None:
    from spanflow.config import load_config

    with pytest.raises(ConfigError, match="train.pad_to_multiple_of: must be >= 1"):
        load_config(None, ["train.pad_to_multiple_of=0"])


def _brute_force_cost(idx: list[int], lengths: list[int], max_passes: int, multiple: int, overhead: int) -> float:
    """The cheapest split of the sorted batch into at most `max_passes` consecutive passes, by enumeration."""
    order = sorted(idx, key=lambda i: lengths[i])
    best = float("inf")
    for k in range(1, max_passes + 1):
        for cuts in itertools.combinations(range(1, len(order)), k - 1):
            bounds = [0, *cuts, len(order)]
            passes = [order[a:b] for a, b in itertools.pairwise(bounds)]
            best = min(best, sum(overhead + len(p) * padded_width(lengths[p[-1]], multiple) for p in passes))
    return best


def _cost(passes: list[list[int]], lengths: list[int], multiple: int, overhead: int) -> float:
    return sum(overhead + len(p) * padded_width(max(lengths[i] for i in p), multiple) for p in passes)


@pytest.mark.parametrize("overhead", [0, 40, 128, 10_000])
def test_length_sorted_passes_pick_the_cheapest_split(overhead: int) -> None:
    rng = random.Random(overhead)
    for _ in range(30):
        lengths = [rng.randint(20, 256) for _ in range(10)]
        idx = rng.sample(range(10), 10)
        passes = length_sorted_passes(idx, lengths, 4, 16, overhead)
        assert sorted(i for p in passes for i in p) == sorted(idx)  # the same chunks, each once
        assert 1 <= len(passes) <= 4 and all(passes)  # never an empty pass
        flat = [lengths[i] for p in passes for i in p]
        assert flat == sorted(flat)  # consecutive runs of the length-sorted batch
        assert _cost(passes, lengths, 16, overhead) == _brute_force_cost(idx, lengths, 4, 16, overhead)
    assert len(length_sorted_passes(list(range(10)), lengths, 4, 16, 10_000)) == 1  # costly passes: one


def test_length_sorted_passes_split_only_where_padding_outweighs_a_pass() -> None:
    short, long = [32] * 8, [256] * 8
    lengths = short + long
    idx = list(range(16))
    assert length_sorted_passes(idx, lengths, 4, 16, 128) == [idx[:8], idx[8:]]  # saves 8 x 224 tokens
    assert length_sorted_passes(idx, [120] * 8 + [128] * 8, 4, 16, 128) == [idx]  # saves 8 x 0 after rounding
    assert length_sorted_passes(idx, [120] * 8 + [128] * 8, 4, 1, 32) == [idx[:8], idx[8:]]  # 8 x 8 > 32
    assert length_sorted_passes(idx[::-1], lengths, 1, 16, 0) == [idx[::-1]]  # one pass: the batch as drawn


def test_a_token_cap_bounds_each_pass_and_may_add_passes() -> None:
    lengths = [128] * 16
    idx = list(range(16))
    assert length_sorted_passes(idx, lengths, 4, 16, 128) == [idx]  # no cap: one pass of 2048 tokens
    capped = length_sorted_passes(idx, lengths, 4, 16, 128, max_tokens=1024)
    assert [len(p) for p in capped] == [8, 8]
    many = length_sorted_passes(idx, lengths, 4, 16, 128, max_tokens=256)  # needs 8 passes: the cap wins
    assert [len(p) for p in many] == [2] * 8
    assert length_sorted_passes(idx[:3], [300, 300, 300], 4, 16, 0, max_tokens=100) == [[0], [1], [2]]
    rng = random.Random(7)
    for _ in range(20):
        lens = [rng.randint(20, 256) for _ in range(12)]
        passes = length_sorted_passes(list(range(12)), lens, 2, 16, 64, max_tokens=700)
        assert sorted(i for p in passes for i in p) == list(range(12))
        assert all(len(p) == 1 or len(p) * padded_width(max(lens[i] for i in p), 16) <= 700 for p in passes)


def _flash_attention_ran(model: torch.nn.Module, batch: dict, device: torch.device, max_width: int) -> bool:
    from torch.profiler import ProfilerActivity, profile

    with (
        profile(activities=[ProfilerActivity.CPU]) as prof,
        attention_kernel(device, batch["input_ids"].shape[1], max_width),
    ):
        model(**batch)
    return any("flash_attention" in event.key for event in prof.key_averages())


def test_narrow_cpu_passes_use_the_math_attention_kernel(model_dir: Path, feats: Features, tokenizer) -> None:
    model = load_backbone(ModelConfig(name_or_path=str(model_dir))).eval()
    batch = pad_batch(feats, [0, 1], tokenizer.pad_token_id, False)
    width = batch["input_ids"].shape[1]
    assert not _flash_attention_ran(model, batch, CPU, max_width=width)
    assert _flash_attention_ran(model, batch, CPU, max_width=width - 1)
    assert _flash_attention_ran(model, batch, CPU, max_width=0)


def test_the_attention_kernel_does_not_change_the_gradient(model_dir: Path, feats: Features, tokenizer) -> None:
    set_seed(0)
    model = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), MethodConfig()).model.eval()
    idx = list(range(min(len(feats), 6)))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    grads = []
    for max_width in (0, 10_000):  # the default kernel, then the math kernel for every pass
        tc = dataclasses.replace(Config().train, math_attention_max_width=max_width)
        model.zero_grad(set_to_none=True)
        accumulate_batch(model, feats, idx, tokenizer.pad_token_id, tc, CPU, "fp32", scaler)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("parts", [2, 3, 16])
def test_micro_batches_give_the_gradient_and_loss_of_one_pass(model_dir: Path, feats: Features, tokenizer, parts: int):
    """fp32, dropout off: the size-weighted passes reproduce the whole batch's mean loss and its gradient."""
    set_seed(0)
    model = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), MethodConfig()).model
    model.eval()  # dropout off; gradients still flow
    idx = list(range(min(len(feats), 10)))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    results = []
    for micro in (1, parts):
        tc = dataclasses.replace(
            Config().train, micro_batches=micro, pad_to_multiple_of=1, pass_overhead_tokens=0, loss="real_tokens"
        )
        model.zero_grad(set_to_none=True)
        loss_sum = accumulate_batch(model, feats, idx, tokenizer.pad_token_id, tc, CPU, "fp32", scaler)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss_sum, grads))
    (loss_one, grads_one), (loss_parts, grads_parts) = results
    assert loss_parts == pytest.approx(loss_one, rel=1e-5)
    assert any(g.abs().sum() > 0 for g in grads_one.values())
    for name, g in grads_one.items():
        torch.testing.assert_close(grads_parts[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_loss_takes_each_pass_width_into_its_softmax(model_dir: Path, feats: Features, tokenizer) -> None:
    """train.loss=padded is Hugging Face's QA loss: in passes, each chunk's loss depends on its pass's width."""
    set_seed(0)
    model = load_backbone(ModelConfig(name_or_path=str(model_dir))).eval()
    idx = list(range(min(len(feats), 10)))
    assert len({len(feats.input_ids[i]) for i in idx}) > 1  # chunks of several lengths: passes differ in width
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    base = dataclasses.replace(
        Config().train, micro_batches=1, pad_to_multiple_of=1, pass_overhead_tokens=0, loss="padded"
    )
    with torch.no_grad():
        hf = model(**pad_batch(feats, idx, tokenizer.pad_token_id, True)).loss.item() * len(idx)
    loss_one = accumulate_batch(model, feats, idx, tokenizer.pad_token_id, base, CPU, "fp32", scaler)
    assert loss_one == pytest.approx(hf, rel=1e-5)  # one pass: exactly the model's own loss
    in_parts = dataclasses.replace(base, micro_batches=3)
    loss_parts = accumulate_batch(model, feats, idx, tokenizer.pad_token_id, in_parts, CPU, "fp32", scaler)
    assert loss_parts < loss_one - 1e-3  # narrower passes: fewer pad positions in the softmax


def test_unknown_loss_is_refused() -> None:
    from spanflow.config import load_config

    with pytest.raises(ConfigError, match=r"train.loss: 'focal' is not real_tokens\|padded"):
        load_config(None, ["train.loss=focal"])


def test_micro_batches_below_one_are_refused() -> None:
    from spanflow.config import load_config

    with pytest.raises(ConfigError, match="train.micro_batches: must be >= 1"):
        load_config(None, ["train.micro_batches=0"])
    with pytest.raises(ConfigError, match="train.pass_overhead_tokens: -1 must be >= 0"):
        load_config(None, ["train.pass_overhead_tokens=-1"])
    with pytest.raises(ConfigError, match="train.math_attention_max_width: -2 must be >= 0"):
        load_config(None, ["train.math_attention_max_width=-2"])
    with pytest.raises(ConfigError, match="train.max_pass_tokens: 0 must be >= 1 or null"):
        load_config(None, ["train.max_pass_tokens=0"])


def test_run_model_is_independent_of_batching(model_dir: Path, feats: Features, tokenizer) -> None:
    model = load_backbone(ModelConfig(name_or_path=str(model_dir)))
    model.train()
    s1, e1, loss1 = run_model(model, feats, 1, "fp32", tokenizer.pad_token_id, with_loss=True)
    s8, e8, loss8 = run_model(model, feats, 8, "fp32", tokenizer.pad_token_id, with_loss=True)
    assert model.training  # mode restored
    assert [len(s) for s in s8] == feats.lengths()  # trimmed to each chunk, in feature order
    for a, b in zip(s1 + e1, s8 + e8, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)  # padding is masked out
    # the loss is the chunk-weighted mean of (start CE + end CE) / 2 over each chunk's own tokens
    # (spanflow.models.qa_loss), so it follows from the trimmed logits, and padding (batch 8) does not change it
    ce = [
        (-torch.log_softmax(torch.tensor(s), 0)[a] - torch.log_softmax(torch.tensor(e), 0)[b]).item() / 2
        for s, e, a, b in zip(s1, e1, feats.start_positions, feats.end_positions, strict=True)
    ]
    assert loss1 == pytest.approx(float(np.mean(ce)), abs=1e-5)
    assert loss8 == pytest.approx(loss1, abs=1e-5)
    assert run_model(model, feats, 8, "fp32", tokenizer.pad_token_id)[2] is None


def test_run_model_in_worker_threads_gives_the_same_logits_and_loss(
    model_dir: Path, feats: Features, tokenizer
) -> None:
    model = load_backbone(ModelConfig(name_or_path=str(model_dir)))
    threads = torch.get_num_threads()
    s1, e1, loss1 = run_model(model, feats, 2, "fp32", tokenizer.pad_token_id, with_loss=True, workers=1)
    s3, e3, loss3 = run_model(model, feats, 2, "fp32", tokenizer.pad_token_id, with_loss=True, workers=3)
    assert torch.get_num_threads() == threads  # the caller's thread setting is put back
    assert [len(s) for s in s3] == feats.lengths()
    for a, b in zip(s1 + e1, s3 + e3, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert loss3 == pytest.approx(loss1, abs=1e-6)


def test_eval_workers_below_one_are_refused() -> None:
    from spanflow.config import load_config

    with pytest.raises(ConfigError, match="eval.workers: 0 must be >= 1"):
        load_config(None, ["eval.workers=0"])


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "extra",
    [[], ["train.precision=bf16"], ["train.grad_accum_steps=2"]],
    ids=["fp32", "bf16", "fp32-accum2"],
)
def test_training_reduces_loss_on_a_memorised_set(train, feats: Features, tokenizer, extra: list[str]) -> None:
    epochs = 4
    run = train([*FAST, f"train.epochs={epochs}", *extra])
    cfg, result = run.cfg, run.result
    assert result.precision == cfg.train.precision
    # losses: every epoch lower than the first, the last clearly so
    hist = result.history
    assert [h.epoch for h in hist] == list(range(1, epochs + 1))
    assert hist[-1].train_loss < hist[0].train_loss - 0.2
    assert hist[-1].val_loss < hist[0].val_loss - 0.2
    assert all(h.train_loss < hist[0].train_loss for h in hist[1:])
    # validation metrics every epoch
    for h in hist:
        assert h.val_loss is not None and h.val_exact_match is not None and h.val_f1 is not None
        assert 0 <= h.val_exact_match <= h.val_f1 <= 100 and h.seconds >= 0
    assert hist[-1].val_f1 > 0
    # the final weights are the best epoch's (the last, as the loss keeps falling) and score that loss
    assert result.best_epoch == epochs and not result.stopped_early
    loss = _train_set_loss(run.prepared.model, feats, tokenizer.pad_token_id, result.precision)
    assert loss == pytest.approx(hist[-1].val_loss)
    # bookkeeping: optimizer steps with accumulation, chunks seen
    batches = -(-len(feats) // cfg.train.batch_size)
    per_epoch = -(-batches // cfg.train.grad_accum_steps)
    assert [h.step for h in hist] == [per_epoch * e for e in range(1, epochs + 1)]
    assert result.steps == per_epoch * epochs
    assert result.train_examples == len(feats) * epochs
    assert result.train_seconds > 0 and result.examples_per_second > 0


def test_bf16_tracks_fp32(train) -> None:
    fp32 = train([*FAST, "train.epochs=2"]).result.history
    bf16 = train([*FAST, "train.epochs=2", "train.precision=bf16"]).result.history
    for a, b in zip(fp32, bf16, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, abs=0.05)


def test_same_seed_same_run_other_seed_other_run(train, tmp_path: Path) -> None:
    a = train([*FAST, "train.epochs=2"], ckpt_dir=tmp_path / "a")
    b = train([*FAST, "train.epochs=2"], ckpt_dir=tmp_path / "b")
    assert _without_time(a.result.history) == _without_time(b.result.history)
    for epoch in (1, 2):
        for name, value in a.weights[epoch].items():
            assert torch.equal(value, b.weights[epoch][name]), name
    c = train([*FAST, "train.epochs=2", "train.seed=7"], ckpt_dir=tmp_path / "c")
    assert _without_time(a.result.history) != _without_time(c.result.history)


def test_max_steps_caps_the_run(train) -> None:
    result = train([*FAST, "train.epochs=3", "train.max_steps=3"]).result
    assert result.steps == 3
    assert len(result.history) == 1 and result.history[0].step == 3


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("method", ["lora", "freeze", "adapter", "layer_mix", "prompt", "qlora"])
def test_killed_run_resumes_from_its_checkpoint(train, tmp_path: Path, method: str) -> None:
    """qlora: the resumed run quantizes a fresh base and puts the LoRA weights and the head back onto it."""
    overrides = [*FAST, "train.epochs=3", f"method.name={method}", "method.freeze.trainable_layers=1"]
    overrides += ["method.adapter.size=8", "method.prompt.tokens=4"]
    full = train(overrides, ckpt_dir=tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["epoch-3.pt"]  # only the latest is kept

    ckpt_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        train(overrides, ckpt_dir=ckpt_dir, kill_at=2)  # dies after epoch 2's training, before its checkpoint
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "epoch-1.pt"
    saved = torch.load(ckpt_dir / "epoch-1.pt", weights_only=False)

    # a fresh model, as in a new process, initialised differently: everything that matters comes from the checkpoint
    resumed = train(overrides, ckpt_dir=ckpt_dir, resume=True, init_seed=123)
    hist = resumed.result.history
    assert [h.epoch for h in hist] == [1, 2, 3]
    assert dataclasses.asdict(hist[0]) == saved["history"][0]  # epoch 1 comes from the checkpoint
    assert sorted(resumed.weights) == [2, 3]  # only epochs 2 and 3 were trained again
    assert _without_time(hist) == _without_time(full.result.history)
    for epoch in (2, 3):
        _assert_same_weights(resumed.weights[epoch], full.weights[epoch])
    _assert_same_weights(trainable_state(resumed.prepared.model), trainable_state(full.prepared.model))
    assert resumed.result.steps == full.result.steps
    assert resumed.result.train_examples == full.result.train_examples
    assert resumed.result.best_epoch == full.result.best_epoch == 3
    assert latest_checkpoint(ckpt_dir) == ckpt_dir / "epoch-3.pt"


def test_resuming_a_finished_run_trains_nothing(train, tmp_path: Path) -> None:
    overrides = [*FAST, "train.epochs=2"]
    first = train(overrides, ckpt_dir=tmp_path / "c")
    again = train(overrides, ckpt_dir=tmp_path / "c", resume=True, init_seed=123)
    assert again.weights == {}
    assert _without_time(again.result.history) == _without_time(first.result.history)
    _assert_same_weights(trainable_state(again.prepared.model), trainable_state(first.prepared.model))


def test_resume_without_a_checkpoint_starts_from_scratch(train, tmp_path: Path) -> None:
    fresh = train([*FAST, "train.epochs=1"], ckpt_dir=tmp_path / "a")
    resumed = train([*FAST, "train.epochs=1"], ckpt_dir=tmp_path / "empty", resume=True)
    assert _without_time(resumed.result.history) == _without_time(fresh.result.history)


@pytest.mark.parametrize("changed", ["train.learning_rate=2e-2", "train.epochs=2", "method.lora.rank=8"])
def test_checkpoint_from_other_params_is_refused(train, tmp_path: Path, changed: str) -> None:
    train([*FAST, "train.epochs=1"], ckpt_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="other params"):
        train([*FAST, "train.epochs=1", changed], ckpt_dir=tmp_path / "c", resume=True)
    # without --resume the stale checkpoint is simply replaced, and then resuming works
    train([*FAST, "train.epochs=1", changed], ckpt_dir=tmp_path / "c")
    assert train([*FAST, "train.epochs=1", changed], ckpt_dir=tmp_path / "c", resume=True).weights == {}


# --------------------------------------------------------------------------- early stopping


DIVERGE = [
    "train.learning_rate=5.0",
    "train.precision=fp32",
    "train.early_stopping_patience=1",
    "train.epochs=6",
    "train.select_by=val_loss",
]


def _stop_epoch(val_losses: list[float], patience: int) -> int:
    """The rule, written out: stop once `patience` epochs in a row brought no lower validation loss."""
    best, bad = float("inf"), 0
    for epoch, loss in enumerate(val_losses, start=1):
        best, bad = (loss, 0) if loss < best - 1e-4 else (best, bad + 1)
        if bad >= patience:
            return epoch
    return len(val_losses)


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping_restores_the_best_epoch(train, feats: Features, tokenizer, patience: int) -> None:
    run = train([*DIVERGE, f"train.early_stopping_patience={patience}"])
    result, hist = run.result, run.result.history
    val = [h.val_loss for h in hist]
    assert len(hist) == _stop_epoch(val, patience)
    assert result.stopped_early == (len(hist) < 6)
    if patience == 1:
        assert result.stopped_early  # the absurd learning rate makes the validation loss rise
    best = int(np.argmin(val)) + 1
    assert result.best_epoch == best
    # Stopping counts an epoch as no better unless it lowers the loss by 1e-4; selection takes the lowest loss. A
    # diverged model can end on a loss lower than an earlier one by less (3.7749 twice on an AMD EPYC): then the
    # last epoch is the best and nothing is rolled back. With patience 1 the stop follows a rise here.
    if patience == 1:
        assert best < len(hist)
    final = trainable_state(run.prepared.model)
    _assert_same_weights(final, run.weights[best])
    if best < len(hist):
        assert any(not torch.equal(final[n], run.weights[len(hist)][n]) for n in final)  # really rolled back
    assert _train_set_loss(run.prepared.model, feats, tokenizer.pad_token_id) == pytest.approx(val[best - 1])


def test_more_patience_trains_longer(train) -> None:
    short = train(DIVERGE).result.history
    long = train([*DIVERGE, "train.early_stopping_patience=2"]).result.history
    assert len(long) > len(short)
    assert _without_time(long[: len(short)]) == _without_time(short)


def test_resuming_an_early_stopped_run_does_not_train_on(train, tmp_path: Path) -> None:
    """A train stage that stopped early and died afterwards (export, MLflow) is rerun with --resume."""
    first = train(DIVERGE, ckpt_dir=tmp_path / "c")
    assert first.result.stopped_early
    again = train(DIVERGE, ckpt_dir=tmp_path / "c", resume=True, init_seed=123)
    assert again.weights == {}
    assert _without_time(again.result.history) == _without_time(first.result.history)
    assert again.result.stopped_early and again.result.best_epoch == first.result.best_epoch
    _assert_same_weights(trainable_state(again.prepared.model), trainable_state(first.prepared.model))


# --------------------------------------------------------------------------- export


def test_export_merged_lora_gives_a_plain_model_with_the_same_logits(
    model_dir: Path, feats: Features, tokenizer, tmp_path: Path
) -> None:
    method = MethodConfig(name="lora")
    prepared = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero adapters and a changed QA head
        for p in prepared.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    prepared.model.eval()
    batch = pad_batch(feats, list(range(8)), tokenizer.pad_token_id, with_labels=False)
    with torch.no_grad():
        peft_out = prepared.model(**batch)
        base_out = load_backbone(ModelConfig(name_or_path=str(model_dir))).eval()(**batch)
    assert not torch.allclose(peft_out.start_logits, base_out.start_logits, atol=1e-3)  # the check means something

    out_dir = tmp_path / "hf"
    export_merged(prepared.model, tokenizer, out_dir)
    files = {p.name for p in out_dir.iterdir()}
    assert "config.json" in files and "tokenizer.json" in files
    assert not any(name.startswith("adapter_") for name in files)

    plain = AutoModelForQuestionAnswering.from_pretrained(out_dir).eval()
    assert isinstance(plain, BertForQuestionAnswering)
    assert not any("lora" in k or "modules_to_save" in k or "base_model" in k for k in plain.state_dict())
    with torch.no_grad():
        merged_out = plain(**batch)
    torch.testing.assert_close(merged_out.start_logits, peft_out.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged_out.end_logits, peft_out.end_logits, atol=1e-4, rtol=0)
    # the project's own loaders read it too
    assert AutoTokenizer.from_pretrained(out_dir).get_vocab() == tokenizer.get_vocab()
    again = load_backbone(ModelConfig(name_or_path=str(out_dir))).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).start_logits, peft_out.start_logits, atol=1e-4, rtol=0)


def test_export_of_a_full_model_saves_it_as_is(model_dir: Path, feats: Features, tokenizer, tmp_path: Path) -> None:
    model = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), MethodConfig(name="full")).model
    model.eval()
    batch = pad_batch(feats, list(range(4)), tokenizer.pad_token_id, with_labels=False)
    returned = export_merged(model, tokenizer, tmp_path / "hf")
    assert returned is model
    plain = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).start_logits, model(**batch).start_logits, atol=1e-5, rtol=0)


def test_select_by_val_f1_keeps_the_epoch_with_the_best_validation_f1(train) -> None:
    run = train([*FAST, "train.epochs=4", "train.select_by=val_f1"])
    f1s = [h.val_f1 for h in run.result.history]
    best = int(np.argmax(f1s)) + 1  # the first epoch reaching the maximum
    assert run.result.best_epoch == best
    _assert_same_weights(trainable_state(run.prepared.model), run.weights[best])


def test_select_by_last_keeps_the_last_epoch(train) -> None:
    run = train([*DIVERGE, "train.select_by=last"])
    last = len(run.result.history)
    assert run.result.best_epoch == last
    _assert_same_weights(trainable_state(run.prepared.model), run.weights[last])


def test_attention_dropout_setting_reaches_the_attention_probabilities_only(model_dir: Path) -> None:
    base = tiny_config(model_dir)
    assert base.model.attention_dropout == 0.0  # the default: the fused attention kernel can run
    model = load_backbone(base.model)
    assert model.config.attention_probs_dropout_prob == 0.0
    assert model.config.hidden_dropout_prob == 0.0  # model.hidden_dropout's own default
    kept = load_backbone(tiny_config(model_dir, ["model.attention_dropout=null"]).model)
    assert kept.config.attention_probs_dropout_prob == 0.1  # null: the checkpoint's own value


def test_hidden_dropout_setting_reaches_the_hidden_states_only(model_dir: Path) -> None:
    model = load_backbone(tiny_config(model_dir, ["model.hidden_dropout=0.05"]).model)
    assert model.config.hidden_dropout_prob == 0.05
    assert model.bert.embeddings.dropout.p == 0.05 and model.bert.encoder.layer[0].output.dropout.p == 0.05
    assert model.config.attention_probs_dropout_prob == 0.0  # model.attention_dropout's, unchanged
    kept = load_backbone(tiny_config(model_dir, ["model.hidden_dropout=null"]).model)
    assert kept.config.hidden_dropout_prob == 0.1  # null: the checkpoint's own value
    with pytest.raises(ConfigError, match=r"model\.hidden_dropout: 1\.5 must be in \[0, 1\) or null"):
        tiny_config(model_dir, ["model.hidden_dropout=1.5"])


def test_attention_dropout_on_a_model_without_that_setting_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config

    from spanflow.models.modeling import backbone_config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    refused = r"model\.attention_dropout: GPT2Config .* set model.attention_dropout to null"
    with pytest.raises(ValueError, match=refused):
        backbone_config(ModelConfig(name_or_path=str(tmp_path), attention_dropout=0.0))
    assert (
        backbone_config(ModelConfig(name_or_path=str(tmp_path), attention_dropout=None, hidden_dropout=None)).attn_pdrop
        == 0.1
    )
    refused = r"model\.hidden_dropout: GPT2Config .* set model.hidden_dropout to null"
    with pytest.raises(ValueError, match=refused):
        backbone_config(ModelConfig(name_or_path=str(tmp_path), attention_dropout=None, hidden_dropout=0.0))


def test_warm_start_loads_a_trials_weights_and_names_a_mismatch(model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from spanflow.models.warm_start import load_warm_start

    def lora(rank: int, seed: int) -> PreparedModel:
        method = MethodConfig(name="lora")
        method.lora.rank = rank
        set_seed(seed)
        return apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)

    trial, final = lora(4, seed=1), lora(4, seed=2)
    with torch.no_grad():  # as if trained: LoRA's B starts at zero
        for p in trial.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    path = tmp_path / "best_trial.safetensors"
    save_file({k: v.contiguous() for k, v in trainable_state(trial.model).items()}, str(path))
    assert load_warm_start(final.model, path) == len(trainable_state(trial.model))
    for name, value in trainable_state(trial.model).items():
        assert torch.equal(dict(final.model.named_parameters())[name], value), name

    with pytest.raises(ValueError, match="has shape .* rerun the tune stage"):
        load_warm_start(lora(8, seed=1).model, path)
    full = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), MethodConfig(name="full"))
    with pytest.raises(ValueError, match="do not match the final model's trainable weights"):
        load_warm_start(full.model, path)


def test_progress_in_a_log_prints_plain_lines_only_when_the_count_moved(capsys: pytest.CaptureFixture) -> None:
    from spanflow.training.progress import Progress

    bar = Progress(list(range(4)), "epoch 1/1", every_seconds=0.0, tty=False)
    for i in bar:
        bar.set_postfix(loss=f"{4 - i:.3f}")
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"epoch 1/1: batch {k} of 4 ({25 * k}%)" for k in (1, 2, 3, 4)]
    assert "loss 4.000" in lines[0] and "batches/s" in lines[0] and "left" in lines[0]
    assert "\r" not in capsys.readouterr().err  # no redraws
