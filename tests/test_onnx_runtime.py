"""ONNX Runtime answering on a tiny BERT: export, int8 quantization, the cache, and run_model through a session."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoTokenizer

from spanflow.answering.inference import load_answering_model, load_qa_model, run_model
from spanflow.answering.onnx_runtime import OnnxQAModel, ensure_onnx, export_onnx, linear_modules, quantize_int8
from spanflow.config import ConfigError
from spanflow.data.features import featurize
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny BERT QA model and its fp32 ONNX export."""
    tmp = tmp_path_factory.mktemp("onnx")
    model_dir = make_tiny_model_dir(tmp / "tiny")
    return model_dir, export_onnx(model_dir, tmp / "model.onnx")


def _features(model_dir: Path, n: int = 12):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return featurize(tiny_records(n), tokenizer, 48, 16, 16), tokenizer.pad_token_id


def test_onnx_runtime_gives_the_torch_logits_at_any_batch_and_length(tiny: tuple[Path, Path]):
    """Exported with a batch of 2, the graph answers batches of other sizes and widths (dynamic axes), padded
    rows included, with torch's logits; two workers sharing one session give the same."""
    model_dir, onnx_file = tiny
    feats, pad_id = _features(model_dir)
    assert len(feats) > 12 and len({len(ids) for ids in feats.input_ids}) > 1  # long contexts split, ragged
    torch_model = load_qa_model(model_dir, "fp32", torch.device("cpu"))
    want_s, want_e, _ = run_model(torch_model, feats, 5, "fp32", pad_id)
    for workers in (1, 2):
        got_s, got_e, _ = run_model(OnnxQAModel(onnx_file), feats, 5, "fp32", pad_id, workers=workers)
        for a, b in zip(got_s + got_e, want_s + want_e, strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_the_loss_needs_the_torch_model(tiny: tuple[Path, Path]):
    model_dir, onnx_file = tiny
    feats, pad_id = _features(model_dir, 2)
    with pytest.raises(ValueError, match="loss needs the torch model"):
        run_model(OnnxQAModel(onnx_file), feats, 4, "fp32", pad_id, with_loss=True)


def test_int8_quantizes_every_linear_but_the_skipped_ones(tiny: tuple[Path, Path], tmp_path: Path):
    """Each MatMul with a weight is named after its torch module; the skipped modules keep their fp32 MatMul,
    every other Linear becomes an int8 one, and the int8 logits stay close to the fp32 ones."""
    model_dir, onnx_file = tiny
    modules = linear_modules(onnx_file)
    names = set(modules.values())
    assert "bert.encoder.layer.0.intermediate.dense" in names and "qa_outputs" in names
    assert len(modules) == 2 * 6 + 1  # q, k, v, attention output, FFN in, FFN out per layer; the QA head
    kept = quantize_int8(onnx_file, tmp_path / "int8.onnx", ["intermediate"])
    assert kept == ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == len(modules) - 2
    assert ops.count("MatMul") >= 2  # the kept Linears (and the attention's own products)
    feats, pad_id = _features(model_dir, 6)
    fp32 = run_model(OnnxQAModel(onnx_file), feats, 8, "fp32", pad_id)
    int8 = run_model(OnnxQAModel(tmp_path / "int8.onnx"), feats, 8, "fp32", pad_id)
    for a, b in zip(int8[0] + int8[1], fp32[0] + fp32[1], strict=True):
        assert np.corrcoef(a, b)[0, 1] > 0.9 and not np.array_equal(a, b)


def test_a_skip_pattern_that_names_no_linear_is_refused(tiny: tuple[Path, Path], tmp_path: Path):
    _, onnx_file = tiny
    with pytest.raises(ValueError, match=r"int8_skip_modules: 'mlp\.up_proj' names no Linear layer of model\.onnx"):
        quantize_int8(onnx_file, tmp_path / "int8.onnx", ["mlp.up_proj"])
    assert not (tmp_path / "int8.onnx").exists()


def test_exports_are_cached_by_weights_and_int8_settings(tiny: tuple[Path, Path], tmp_path: Path):
    """The same weights and settings reuse the file; other int8 settings or other weights export anew."""
    model_dir, _ = tiny
    cache = tmp_path / "cache"
    first = ensure_onnx(model_dir, "onnx_int8", ["intermediate"], cache)
    stamp = first.stat().st_mtime_ns
    assert ensure_onnx(model_dir, "onnx_int8", ["intermediate"], cache) == first
    assert first.stat().st_mtime_ns == stamp
    manifest = json.loads((first.parent / "export.json").read_text())[first.name]
    assert manifest["int8_skip_modules"] == ["intermediate"] and len(manifest["kept_fp32"]) == 2
    again = ensure_onnx(model_dir, "onnx_int8", ["qa_outputs"], cache)
    assert again == first and again.stat().st_mtime_ns != stamp
    assert json.loads((first.parent / "export.json").read_text())[first.name]["kept_fp32"] == ["qa_outputs"]
    fp32 = ensure_onnx(model_dir, "onnx", [], cache)
    assert fp32.parent == first.parent and fp32.name == "model.onnx" and first.is_file()

    other = make_tiny_model_dir(tmp_path / "other")
    torch_model = load_qa_model(other, "fp32", torch.device("cpu"))
    with torch.no_grad():
        torch_model.qa_outputs.bias.add_(1.0)
    torch_model.save_pretrained(other)
    assert ensure_onnx(other, "onnx", [], cache).parent != first.parent
    with pytest.raises(ValueError, match="runtime 'torch' has no ONNX file"):
        ensure_onnx(model_dir, "torch", [], cache)


def test_answering_model_by_runtime(tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """torch keeps its precision; ONNX Runtime computes in fp32 from an export cached under models/onnx."""
    model_dir, onnx_file = tiny
    cpu = torch.device("cpu")
    model, precision = load_answering_model(model_dir, "torch", "bf16", cpu)
    assert isinstance(model, torch.nn.Module) and precision == "bf16"
    model, precision = load_answering_model(model_dir, "onnx", "bf16", cpu, onnx_file=onnx_file)
    assert isinstance(model, OnnxQAModel) and model.path == onnx_file and precision == "fp32"
    monkeypatch.chdir(tmp_path)
    model, _ = load_answering_model(model_dir, "onnx_int8", "fp32", cpu, int8_skip_modules=["intermediate"])
    assert model.path.name == "model.int8.onnx" and model.path.is_relative_to(Path("models/onnx"))


def test_config_names_a_bad_runtime(tiny: tuple[Path, Path]):
    model_dir, _ = tiny
    assert tiny_config(model_dir).eval.runtime == "torch"
    assert tiny_config(model_dir).serving.runtime is None
    with pytest.raises(ConfigError, match=r"eval.runtime: 'tensorrt' is not torch\|onnx\|onnx_int8"):
        tiny_config(model_dir, ["eval.runtime=tensorrt"])
    with pytest.raises(ConfigError, match="serving.runtime: 'int8' is not"):
        tiny_config(model_dir, ["serving.runtime=int8"])
    with pytest.raises(ConfigError, match="eval.int8_skip_modules"):
        tiny_config(model_dir, ["eval.int8_skip_modules=intermediate"])


def test_served_model_answers_through_onnx_runtime_as_through_torch(tiny: tuple[Path, Path], tmp_path: Path):
    """The pyfunc with settings runtime=onnx and the `onnx_model` artifact gives torch's answers and scores; the
    ONNX requirements name onnxruntime."""
    import pandas as pd
    from mlflow.pyfunc import PythonModelContext

    from spanflow.serving.qa_pyfunc import SpanQAModel
    from spanflow.serving.registration import serving_requirements, serving_settings

    model_dir, onnx_file = tiny
    filler = " ".join(f"Entry {i} records a cargo of salt bound for the southern port." for i in range(30))
    rows = pd.DataFrame(
        {
            "question": ["Who built the lighthouse at Calder?", "When did the Vester bridge open?"],
            "context": [filler + " The lighthouse at Calder was built by Brenna Holm in 1843.", "It opened in 1911."],
        }
    )
    answers = {}
    for runtime in ("torch", "onnx"):
        cfg = tiny_config(model_dir, [f"serving.runtime={runtime}"])
        settings = tmp_path / f"{runtime}.json"
        settings.write_text(json.dumps(serving_settings(cfg)))
        assert json.loads(settings.read_text())["runtime"] == runtime
        artifacts = {"settings": str(settings), "model_dir": str(model_dir)}
        if runtime == "onnx":
            artifacts["onnx_model"] = str(onnx_file)
        model = SpanQAModel()
        model.load_context(PythonModelContext(artifacts, None))
        assert isinstance(model.model, OnnxQAModel) == (runtime == "onnx")
        answers[runtime] = model.predict(None, rows)
    pd.testing.assert_frame_equal(answers["onnx"], answers["torch"], atol=1e-4)
    assert any(pin.startswith("onnxruntime==") for pin in serving_requirements("onnx_int8"))
    assert not any(pin.startswith("onnxruntime==") for pin in serving_requirements("torch"))
