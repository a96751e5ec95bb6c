"""Method adapter (Houlsby bottleneck adapters) on a tiny BERT: what trains, the identity at the start, and a saved
model that answers with its adapters through torch and ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spanflow.answering.inference import load_qa_model
from spanflow.answering.onnx_runtime import OnnxQAModel, export_onnx
from spanflow.config import MethodConfig, ModelConfig
from spanflow.models.adapters import AdapterLinear
from spanflow.models.modeling import apply_method, export_merged, load_backbone, load_tokenizer
from tests.helpers import make_tiny_model_dir, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert")


def _inputs(model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    return dict(tokenizer(["Who built it?"], ["Brenna Holm built the lighthouse in 1843."], return_tensors="pt"))


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs)
    return torch.stack([out.start_logits, out.end_logits])


def _adapter_method(size: int) -> MethodConfig:
    method = MethodConfig(name="adapter")
    method.adapter.size = size
    return method


def test_adapters_start_as_the_identity_and_train_with_the_norms_and_head(model_dir: Path):
    inputs = _inputs(model_dir)
    backbone = load_backbone(ModelConfig(name_or_path=str(model_dir)))
    before = _logits(backbone, inputs)
    prepared = apply_method(backbone, _adapter_method(8))
    wrapped = [n for n, m in prepared.model.named_modules() if isinstance(m, AdapterLinear)]
    assert sorted(wrapped) == sorted(
        f"bert.encoder.layer.{i}.{place}" for i in (0, 1) for place in ("attention.output.dense", "output.dense")
    )
    torch.testing.assert_close(_logits(prepared.model, inputs), before)  # up starts at zero
    trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert all(".adapter." in n or "LayerNorm" in n or n.startswith("qa_outputs.") for n in trainable), trainable
    adapter = 32 * 8 + 8 + 8 * 32 + 32
    norms = 5 * (32 + 32)  # the embeddings' LayerNorm and two per layer
    assert prepared.trainable_params == 4 * adapter + norms + (32 * 2 + 2)
    assert prepared.total_params == sum(p.numel() for p in backbone.parameters())


def test_a_saved_adapter_model_answers_with_its_adapters(model_dir: Path, tmp_path: Path):
    """Adapters do not merge: the saved config names them, and torch and ONNX Runtime answer with them."""
    inputs = _inputs(model_dir)
    prepared = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), _adapter_method(4))
    with torch.no_grad():
        for name, p in prepared.model.named_parameters():
            if ".adapter.up." in name:
                p.normal_(std=0.5)
    trained = _logits(prepared.model, inputs)
    plain = _logits(load_backbone(ModelConfig(name_or_path=str(model_dir))), inputs)
    assert not torch.allclose(trained, plain, atol=1e-3)
    out = tmp_path / "hf"
    export_merged(prepared.model, load_tokenizer(ModelConfig(name_or_path=str(model_dir))), out)
    assert json.loads((out / "config.json").read_text())["spanflow_adapter"] == {"size": 4}
    torch.testing.assert_close(_logits(load_qa_model(out, "fp32", torch.device("cpu")), inputs), trained)

    session = OnnxQAModel(export_onnx(out, tmp_path / "model.onnx"))
    start, end = session.logits(inputs)
    np.testing.assert_allclose(np.stack([start, end]), trained.numpy(), atol=1e-4)


def test_adapter_settings_are_checked(model_dir: Path, tmp_path: Path):
    from spanflow.config import ConfigError

    with pytest.raises(ConfigError, match="method.adapter.size: 0 must be >= 1"):
        tiny_config(model_dir, ["method.name=adapter", "method.adapter.size=0"])
    from transformers import AlbertConfig, AlbertForQuestionAnswering

    albert = AlbertForQuestionAnswering(
        AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.raises(ValueError, match="method adapter: no adapter places known for model type 'albert'"):
        apply_method(albert, _adapter_method(8))
