"""Method qlora (a 4-bit bitsandbytes base, LoRA and the QA head on top) on a tiny BERT: what is quantized, what trains,
the merged fp32 export, and the errors where it cannot run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from spanflow.answering.inference import load_qa_model
from spanflow.config import ConfigError, MethodConfig, ModelConfig
from spanflow.data.features import featurize
from spanflow.models import qlora
from spanflow.models.modeling import apply_method, export_merged, load_backbone, load_tokenizer
from spanflow.training.loop import train_model
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft x transformers 5

ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
ENCODER_LINEARS += ("intermediate.dense", "output.dense")


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


def _method(quant_type: str = "nf4", rank: int = 4) -> MethodConfig:
    method = MethodConfig(name="qlora")
    method.qlora.quant_type = quant_type
    method.lora.rank = rank
    return method


def _qlora_model(model_dir: Path, method: MethodConfig | None = None):
    method = method or _method()
    return apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir)), method, "fp32"), method)


def _inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    return dict(tokenizer(["Who built it?"], ["Brenna Holm built the lighthouse in 1843."], return_tensors="pt"))


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs)
    return torch.stack([out.start_logits, out.end_logits])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_encoder_is_4bit_the_head_a_plain_fp32_linear(model_dir: Path, quant_type: str) -> None:
    backbone = load_backbone(ModelConfig(name_or_path=str(model_dir)), _method(quant_type), "fp32")
    quantized = qlora.linear4bit_modules(backbone)
    assert sorted(quantized) == sorted(f"bert.encoder.layer.{i}.{name}" for i in (0, 1) for name in ENCODER_LINEARS)
    assert {m.weight.quant_state.quant_type for m in quantized.values()} == {quant_type}
    assert type(backbone.qa_outputs) is torch.nn.Linear and backbone.qa_outputs.weight.dtype == torch.float32
    assert backbone.config.quantization_config.llm_int8_skip_modules == ["qa_outputs"]
    plain = load_backbone(ModelConfig(name_or_path=str(model_dir)))
    assert not qlora.is_quantized(plain)
    # a 4-bit weight is counted by the weights it holds, not by its bytes: the same total as the fp32 backbone
    from spanflow.models.modeling import count_params

    assert count_params(backbone)[1] == count_params(plain)[1]


def test_lora_and_the_head_train_on_a_frozen_4bit_base(model_dir: Path, tmp_path: Path) -> None:
    """The adapters and the head move, the 4-bit base's bytes do not; the loss goes down."""
    prepared = _qlora_model(model_dir)
    model = prepared.model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n or ".qa_outputs.modules_to_save." in n for n in trainable)
    lora = 2 * 2 * (4 * 32 + 32 * 4) + 2 * 2 * (4 * 64 + 64 * 4) + 2 * (4 * 32 + 32 * 4)  # q k v o, intermediate, out
    assert prepared.trainable_params == lora + 32 * 2 + 2
    base = {n: m.weight.detach().clone() for n, m in qlora.linear4bit_modules(model).items()}
    assert all(not m.weight.requires_grad for m in qlora.linear4bit_modules(model).values())
    before = {n: p.detach().clone() for n, p in trainable.items()}

    cfg = tiny_config(model_dir, ["method.name=qlora", "train.learning_rate=1e-2", "train.precision=fp32"])
    records = tiny_records(16)
    tokenizer = load_tokenizer(cfg.model)
    f = cfg.features
    feats = featurize(records, tokenizer, f.chunk_length, f.overlap, f.max_query_length)
    result = train_model(prepared, feats, feats, records, cfg, tokenizer.pad_token_id, tmp_path / "ckpt")
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.history[-1].val_loss < result.history[0].val_loss  # validated between epochs, trained on after
    moved = {n for n, p in trainable.items() if not torch.equal(p, before[n])}
    assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)
    assert any(".qa_outputs.modules_to_save." in n for n in moved)
    for name, layer in qlora.linear4bit_modules(model).items():
        assert torch.equal(layer.weight, base[name]), name


def test_the_merged_export_is_a_plain_fp32_model_with_the_same_logits(model_dir: Path, tmp_path: Path) -> None:
    prepared = _qlora_model(model_dir)
    with torch.no_grad():  # trained-looking adapters and head: the merge has something to add
        for name, p in prepared.model.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                p.normal_(std=0.3)
    inputs = _inputs(model_dir)
    quantized = _logits(prepared.model, inputs)
    out = tmp_path / "hf"
    export_merged(prepared.model, load_tokenizer(ModelConfig(name_or_path=str(model_dir))), out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = load_qa_model(out, "fp32", torch.device("cpu"))
    assert all(type(m) is torch.nn.Linear for m in merged.modules() if isinstance(m, torch.nn.Linear))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    torch.testing.assert_close(_logits(merged, inputs), quantized, atol=1e-4, rtol=1e-4)  # sums in another order
    assert not torch.allclose(_logits(load_backbone(ModelConfig(name_or_path=str(model_dir))), inputs), quantized)
    assert qlora.linear4bit_modules(prepared.model)  # the training model is left as it was


def test_qlora_settings_and_a_backbone_that_is_not_4bit_are_refused(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"method.qlora.quant_type: 'int4' is not nf4\|fp4"):
        tiny_config(model_dir, ["method.name=qlora", "method.qlora.quant_type=int4"])
    with pytest.raises(ValueError, match="method qlora: the backbone is not quantized"):
        apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), _method())


def test_where_bitsandbytes_cannot_run_the_error_names_the_method_and_what_to_do(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RuntimeError, match=r"qlora: bitsandbytes .* cannot run 4-bit nf4 on device meta .*name lora"):
        qlora.check_device(torch.device("meta"), "nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(RuntimeError, match=r"method.name qlora needs bitsandbytes \(pip install 'bitsandbytes>=0.50"):
        load_backbone(ModelConfig(name_or_path=str(model_dir)), _method(), "fp32")


def test_the_hub_kernel_notes_of_bitsandbytes_are_dropped_and_nothing_else() -> None:
    import logging

    for name, marker in qlora._HUB_KERNEL_NOTES:
        logger = logging.getLogger(name)
        note = logger.makeRecord(name, logging.WARNING, __file__, 1, "%s: %s", (marker, "why"), None)
        other = logger.makeRecord(name, logging.WARNING, __file__, 1, "something else", (), None)
        assert not logger.filter(note) and logger.filter(other)
