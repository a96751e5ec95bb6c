"""ALBERT and a LLaMA-style decoder as backbones (`model.name_or_path`), on tiny random models with local tokenizers:
the decoder's traps (left padding, no pad token, no token types, byte-level offsets with the space before a word,
no [CLS]), LoRA targets per architecture, dropout settings, what freeze and adapter refuse, the math attention kernel
and the ONNX export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from spanflow.answering.inference import pad_batch, run_model
from spanflow.answering.onnx_runtime import OnnxQAModel, export_onnx
from spanflow.answering.spans import best_spans
from spanflow.config import Config, MethodConfig, ModelConfig
from spanflow.data.features import Features, featurize
from spanflow.models.modeling import (
    apply_method,
    backbone_config,
    export_merged,
    load_backbone,
    load_tokenizer,
    lora_target_modules,
    takes_token_type_ids,
)
from spanflow.training.loop import accumulate_batch
from tests.helpers import make_tiny_albert_dir, make_tiny_llama_dir, make_tiny_model_dir, tiny_config, tiny_records

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft x transformers 5

CPU = torch.device("cpu")
BUILDERS = {"bert": make_tiny_model_dir, "albert": make_tiny_albert_dir, "llama": make_tiny_llama_dir}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matrices: one thread is fastest and immune to oversubscription on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {name: build(root / f"tiny-{name}") for name, build in BUILDERS.items()}


def _model(path: Path) -> ModelConfig:
    return ModelConfig(name_or_path=str(path))


def _feats(path: Path, n: int = 12) -> tuple[list[dict], Features]:
    records = tiny_records(n)
    f = tiny_config(path).features
    return records, featurize(records, load_tokenizer(_model(path)), f.chunk_length, f.overlap, f.max_query_length)


def test_a_decoder_tokenizer_pads_on_the_right_with_its_eos_token(model_dirs: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(model_dirs["llama"])
    assert raw.padding_side == "left" and raw.pad_token is None  # as LLaMA's comes
    tokenizer = load_tokenizer(_model(model_dirs["llama"]))
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert "token_type_ids" not in tokenizer.model_input_names
    padded = tokenizer(["Who?", "Who built the harbour of Vester?"], padding=True)
    assert padded["input_ids"][0][-1] == tokenizer.pad_token_id and padded["attention_mask"][0][-1] == 0
    bert = load_tokenizer(_model(model_dirs["bert"]))  # an encoder's is left as it was
    assert (bert.padding_side, bert.pad_token) == ("right", "[PAD]")


def test_a_decoder_puts_the_question_first_and_its_bos_token_at_the_no_answer_index(
    model_dirs: dict[str, Path],
) -> None:
    tokenizer = load_tokenizer(_model(model_dirs["llama"]))
    records, feats = _feats(model_dirs["llama"])
    assert len(feats) > len(records)  # some contexts were split into chunks
    for k, ids in enumerate(feats.input_ids):
        record = records[feats.example_index[k]]
        assert ids[0] == tokenizer.bos_token_id and feats.offsets[k][0] is None  # index 0: no answer, no text
        question = tokenizer.decode(ids[1 : ids.index(tokenizer.bos_token_id, 1)])
        assert question and record["question"].startswith(question)  # the question first (cut at 16 tokens)
        assert all(o is None for o in feats.offsets[k][: len(ids) - sum(o is not None for o in feats.offsets[k])])
    assert any(s == 0 for s in feats.start_positions) and any(s > 0 for s in feats.start_positions)


@pytest.mark.parametrize("backbone", ["llama", "albert"])
def test_labelled_spans_map_back_to_the_exact_answer_characters(model_dirs: dict[str, Path], backbone: str) -> None:
    """The byte-level BPE gives a word's token the space before it (" Norland"): the answer keeps to the word."""
    records, feats = _feats(model_dirs[backbone], 40)
    starts, ends = [], []
    for k in range(len(feats)):
        s, e = np.full(len(feats.input_ids[k]), -10.0), np.full(len(feats.input_ids[k]), -10.0)
        s[feats.start_positions[k]], e[feats.end_positions[k]] = 10.0, 10.0
        starts.append(s)
        ends.append(e)
    answers = best_spans(records, feats, starts, ends, whole_words=False)
    for record, answer in zip(records, answers, strict=True):
        assert answer.text == record["answers"]["text"][0]
        assert record["context"][answer.start : answer.end] == answer.text
        assert answer.start == record["answers"]["answer_start"][0]


def test_span_decoding_never_answers_with_a_question_or_special_token(model_dirs: dict[str, Path]) -> None:
    records, feats = _feats(model_dirs["llama"])
    starts, ends = [], []
    for offsets in feats.offsets:
        question = np.array([o is None for o in offsets])
        starts.append(np.where(question, 50.0, 0.0))  # every question and special token scores far above the context
        ends.append(np.where(question, 50.0, 0.0))
    for record, answer in zip(records, best_spans(records, feats, starts, ends), strict=True):
        assert answer.text and answer.text.strip() == answer.text
        assert record["context"][answer.start : answer.end] == answer.text


def test_no_token_type_ids_reach_a_model_that_has_none(model_dirs: dict[str, Path]) -> None:
    seen: list[set[str]] = []
    records, feats = _feats(model_dirs["llama"])
    cfg = tiny_config(model_dirs["llama"], ["train.precision=fp32"])
    model = apply_method(load_backbone(cfg.model), cfg.method).model
    model.get_base_model().register_forward_pre_hook(lambda m, a, kw: seen.append(set(kw)), with_kwargs=True)
    assert not takes_token_type_ids(model)
    pad_id = load_tokenizer(cfg.model).pad_token_id
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    accumulate_batch(model, feats, [0, 1, 2], pad_id, cfg.train, CPU, "fp32", scaler)
    run_model(model, feats, 4, "fp32", pad_id, with_loss=True)
    assert seen and all("token_type_ids" not in kw and "input_ids" in kw for kw in seen)
    for name in ("bert", "albert"):  # encoders get theirs
        assert takes_token_type_ids(load_backbone(_model(model_dirs[name])))
    assert "token_type_ids" not in pad_batch(feats, [0, 1], pad_id, False, token_types=False)


@pytest.mark.parametrize(
    ("backbone", "targets"),
    [
        ("bert", {"query", "key", "value", "dense"}),
        ("albert", {"query", "key", "value", "dense", "ffn", "ffn_output"}),
        ("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_lora_targets_auto_follow_the_architecture(model_dirs: dict[str, Path], backbone: str, targets: set) -> None:
    method = MethodConfig(name="lora")
    assert method.lora.target_modules == "auto"
    backbone_model = load_backbone(_model(model_dirs[backbone]))
    linears = {n.rsplit(".", 1)[-1] for n, m in backbone_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears - {"qa_outputs", "embedding_hidden_mapping_in"} == targets  # every Linear of every layer
    prepared = apply_method(backbone_model, method)
    adapted = {n.rsplit(".", 1)[-1] for n, m in prepared.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == targets
    method.lora.target_modules = ["query"] if backbone != "llama" else ["q_proj"]  # an explicit list wins
    prepared = apply_method(load_backbone(_model(model_dirs[backbone])), method)
    assert {n.rsplit(".", 1)[-1] for n, m in prepared.model.named_modules() if hasattr(m, "lora_A")} == set(
        method.lora.target_modules
    )


def test_lora_targets_auto_on_an_unmapped_architecture_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"target_modules: auto knows no Linear names for model type 'gpt2'"):
        lora_target_modules("gpt2", "auto")
    assert lora_target_modules("gpt2", ["c_attn"]) == ["c_attn"]


def test_dropout_settings_on_albert_and_a_decoder(model_dirs: dict[str, Path]) -> None:
    albert = backbone_config(ModelConfig(name_or_path=str(model_dirs["albert"]), hidden_dropout=0.05))
    assert (albert.attention_probs_dropout_prob, albert.hidden_dropout_prob) == (0.0, 0.05)
    llama = backbone_config(_model(model_dirs["llama"]))  # the defaults: no dropout, which LLaMA has none of between
    assert llama.attention_dropout == 0.0  # layers anyway
    with pytest.raises(ValueError, match=r"model.hidden_dropout: LlamaConfig has no such dropout; set it to 0 or null"):
        backbone_config(ModelConfig(name_or_path=str(model_dirs["llama"]), hidden_dropout=0.1))


def test_freeze_and_adapter_on_albert_are_refused_and_freeze_on_a_decoder_trains_its_last_layers(
    model_dirs: dict[str, Path],
) -> None:
    method = MethodConfig(name="freeze")
    method.freeze.trainable_layers = 1
    with pytest.raises(ValueError, match="method freeze: ALBERT shares one set of layer weights across its 2 layers"):
        apply_method(load_backbone(_model(model_dirs["albert"])), method)
    with pytest.raises(ValueError, match="method adapter: no adapter places known for model type 'albert'"):
        apply_method(load_backbone(_model(model_dirs["albert"])), MethodConfig(name="adapter"))
    prepared = apply_method(load_backbone(_model(model_dirs["llama"])), method)
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert "transformer.layers.1.self_attn.q_proj.weight" in trainable
    assert "transformer.layers.0.mlp.up_proj.weight" not in trainable
    assert "transformer.layers.0.input_layernorm.weight" in trainable and "transformer.norm.weight" in trainable


@pytest.mark.parametrize("backbone", ["albert", "llama"])
def test_the_math_attention_kernel_gives_the_gradient_of_pytorchs(model_dirs: dict[str, Path], backbone: str) -> None:
    """ALBERT's bidirectional and the decoder's causal, grouped-query attention with right padding."""
    _, feats = _feats(model_dirs[backbone])
    pad_id = load_tokenizer(_model(model_dirs[backbone])).pad_token_id
    torch.manual_seed(0)
    model = apply_method(load_backbone(_model(model_dirs[backbone])), MethodConfig()).model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)  # a gradient into lora_A too
    idx = sorted(range(len(feats)), key=lambda i: len(feats.input_ids[i]))[:: max(1, len(feats) // 6)]
    assert len({len(feats.input_ids[i]) for i in idx}) > 1  # padded rows
    grads = []
    for max_width in (0, 10_000):  # PyTorch's kernel, then the math kernel for every pass
        tc = dataclasses.replace(Config().train, math_attention_max_width=max_width, micro_batches=1)
        model.zero_grad(set_to_none=True)
        accumulate_batch(model, feats, idx, pad_id, tc, CPU, "fp32", torch.amp.GradScaler("cpu", enabled=False))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backbone", ["albert", "llama"])
def test_a_trained_model_answers_alike_through_torch_and_onnx_runtime(
    model_dirs: dict[str, Path], backbone: str, tmp_path: Path
) -> None:
    records, feats = _feats(model_dirs[backbone])
    tokenizer = load_tokenizer(_model(model_dirs[backbone]))
    torch.manual_seed(0)
    prepared = apply_method(load_backbone(_model(model_dirs[backbone])), MethodConfig())
    with torch.no_grad():
        for name, p in prepared.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    merged = export_merged(prepared.model, tokenizer, tmp_path / "hf")
    starts, ends, _ = run_model(merged, feats, 8, "fp32", tokenizer.pad_token_id)
    session = OnnxQAModel(export_onnx(tmp_path / "hf", tmp_path / "model.onnx"))
    assert ("token_type_ids" in session.input_names) == (backbone == "albert")
    o_starts, o_ends, _ = run_model(session, feats, 8, "fp32", tokenizer.pad_token_id)
    for a, b in zip(starts + ends, o_starts + o_ends, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert [a.text for a in best_spans(records, feats, starts, ends)] == [
        a.text for a in best_spans(records, feats, o_starts, o_ends)
    ]
