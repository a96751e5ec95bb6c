"""Method layer_mix (BERTVision's learned layer pooling) on a tiny BERT: the mix itself, what trains over a frozen or a
LoRA backbone, a saved model that answers with its mix through torch and ONNX Runtime, and `spanflow run` with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spanflow.answering.inference import load_qa_model
from spanflow.answering.onnx_runtime import OnnxQAModel, export_onnx
from spanflow.config import ConfigError, MethodConfig, ModelConfig
from spanflow.data.features import featurize
from spanflow.models.layer_mix import ScalarMix, add_layer_mix, find_layer_mix
from spanflow.models.lora_fused import FusedLoraLinear
from spanflow.models.modeling import apply_method, export_merged, load_backbone, load_tokenizer
from spanflow.training.loop import accumulate_batch, param_groups
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records
from tests.test_pipeline_integration import project  # noqa: F401  (the tiny project fixture)

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft x transformers 5


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


def _method(backbone: str = "frozen", embeddings: bool = True) -> MethodConfig:
    method = MethodConfig(name="layer_mix")
    method.layer_mix.backbone = backbone
    method.layer_mix.embeddings = embeddings
    method.lora.rank = 4
    return method


def _prepared(model_dir: Path, method: MethodConfig, scalars: list[float] | None = None, gamma: float = 1.0):
    prepared = apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method)
    mix = find_layer_mix(prepared.model)
    if scalars is not None:
        with torch.no_grad():
            mix.scalars.copy_(torch.tensor(scalars))
            mix.gamma.fill_(gamma)
    return prepared, mix


@pytest.mark.parametrize("embeddings", [True, False])
def test_mix_weights_sum_to_one_and_weigh_every_hidden_state(model_dir: Path, embeddings: bool):
    """The QA head reads gamma * sum_i softmax(s)_i * h_i over the L + 1 hidden states (embeddings first), or over the
    L layers' alone: the same logits as the plain model's head applied to that sum computed by hand."""
    inputs = _inputs(model_dir)
    scalars = [0.3, -1.2, 2.0] if embeddings else [-0.7, 1.1]
    prepared, mix = _prepared(model_dir, _method(embeddings=embeddings), scalars, gamma=1.7)
    weights = mix.weights()
    assert weights.shape == (len(scalars),) and bool((weights > 0).all())
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(weights, torch.softmax(torch.tensor(scalars), 0))

    plain = load_backbone(ModelConfig(name_or_path=str(model_dir))).eval()
    with torch.no_grad():
        hidden = plain(**inputs, output_hidden_states=True).hidden_states
        assert len(hidden) == plain.config.num_hidden_layers + 1  # embeddings' output first
        mixed_states = hidden if embeddings else hidden[1:]
        by_hand = 1.7 * sum(w * h for w, h in zip(weights, mixed_states, strict=True))
        torch.testing.assert_close(mix(hidden), by_hand)
        start, end = plain.qa_outputs(by_hand).split(1, dim=-1)
    expected = torch.stack([start.squeeze(-1), end.squeeze(-1)])
    torch.testing.assert_close(_logits(prepared.model, inputs), expected)
    assert not torch.allclose(expected, _logits(plain, inputs), atol=1e-3)  # not the last layer's alone


@pytest.mark.parametrize("backbone", ["frozen", "lora"])
def test_a_training_step_moves_only_what_the_method_trains(model_dir: Path, backbone: str):
    """Frozen: the mix and the QA head train and nothing else even gets a gradient; LoRA: LoRA (fused), the mix and the
    head train. The base weights stay as they were, and the mix learns at the head's rate."""
    overrides = ["method.name=layer_mix", f"method.layer_mix.backbone={backbone}", "train.precision=fp32"]
    cfg = tiny_config(model_dir, overrides)
    torch.manual_seed(0)
    prepared = apply_method(load_backbone(cfg.model), cfg.method)
    model = prepared.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    mix_names = {n for n in trainable if ".layer_mix." in f".{n}"}
    head_names = {n for n in trainable if "qa_outputs." in n}
    assert len(mix_names) == 2 and len(head_names) == 2
    if backbone == "frozen":
        assert trainable == mix_names | head_names
        assert prepared.trainable_params == 3 + 1 + (32 * 2 + 2)  # 3 scalars, gamma, the QA head
    else:
        lora = trainable - mix_names - head_names
        assert lora and all(".lora_" in n for n in lora), sorted(lora)[:5]
        assert all("modules_to_save" in n for n in head_names)  # PEFT's trained copy of the head
        assert any(isinstance(m, FusedLoraLinear) for m in model.modules())  # method.lora.fused: the same LoRA path
    groups = param_groups(model, cfg.train)
    mix_param = find_layer_mix(model).scalars
    group = next(g for g in groups if any(p is mix_param for p in g["params"]))
    assert group["lr"] == pytest.approx(cfg.train.learning_rate * cfg.train.head_lr_ratio)

    tokenizer = load_tokenizer(cfg.model)
    f = cfg.features
    feats = featurize(tiny_records(8), tokenizer, f.chunk_length, f.overlap, f.max_query_length)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    everything = list(range(len(feats)))
    accumulate_batch(model, feats, everything, tokenizer.pad_token_id, cfg.train, torch.device("cpu"), "fp32", scaler)
    if backbone == "frozen":  # really frozen: autograd records nothing in the backbone
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    optimizer.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert mix_names | head_names <= changed
    assert changed <= trainable  # every frozen weight unchanged
    if backbone == "lora":
        assert any("lora_B" in n for n in changed)


@pytest.mark.parametrize(("backbone", "embeddings"), [("frozen", False), ("lora", True)])
def test_a_saved_layer_mix_model_answers_with_its_mix(model_dir: Path, tmp_path: Path, backbone: str, embeddings: bool):
    """The mix does not merge: the saved config names it, and `load_trained` (torch) and the ONNX export answer with
    it, as trained; a loader that ignored it would answer with the last layer alone."""
    inputs = _inputs(model_dir)
    scalars = [1.5, -2.0, 0.5] if embeddings else [2.5, -1.0]
    prepared, _ = _prepared(model_dir, _method(backbone, embeddings), scalars, gamma=0.8)
    with torch.no_grad():
        for name, p in prepared.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    trained = _logits(prepared.model, inputs)
    out = tmp_path / "hf"
    export_merged(prepared.model, load_tokenizer(ModelConfig(name_or_path=str(model_dir))), out)
    assert json.loads((out / "config.json").read_text())["spanflow_layer_mix"] == {"embeddings": embeddings}

    loaded = load_qa_model(out, "fp32", torch.device("cpu"))
    torch.testing.assert_close(find_layer_mix(loaded).weights(), torch.softmax(torch.tensor(scalars), 0))
    torch.testing.assert_close(_logits(loaded, inputs), trained)
    from transformers import AutoModelForQuestionAnswering

    without_mix = AutoModelForQuestionAnswering.from_pretrained(out)
    assert not torch.allclose(_logits(without_mix, inputs), trained, atol=1e-3)

    session = OnnxQAModel(export_onnx(out, tmp_path / "model.onnx"))
    start, end = session.logits(inputs)
    np.testing.assert_allclose(np.stack([start, end]), trained.numpy(), atol=1e-4)


def test_layer_mix_settings_are_checked(model_dir: Path):
    from spanflow.search.grid import grid_space

    with pytest.raises(ConfigError, match="method.layer_mix.backbone: 'full' is not frozen|lora"):
        tiny_config(model_dir, ["method.name=layer_mix", "method.layer_mix.backbone=full"])
    with pytest.raises(ConfigError, match="method.layer_mix.embeddings: expected bool"):
        tiny_config(model_dir, ["method.name=layer_mix", "method.layer_mix.embeddings=3"])
    # the ranks are searched where LoRA trains: over a LoRA backbone, not over a frozen one
    ranks = ["method.name=layer_mix", "search.space.lora_rank=[4, 8]"]
    assert grid_space(tiny_config(model_dir, [*ranks, "method.layer_mix.backbone=lora"]))["lora_rank"] == [4, 8]
    assert grid_space(tiny_config(model_dir, ranks))["lora_rank"] == [16]

    prepared, mix = _prepared(model_dir, _method())
    assert isinstance(mix, ScalarMix)
    with pytest.raises(ValueError, match="method layer_mix: BertForQuestionAnswering has a layer_mix already"):
        add_layer_mix(prepared.model, embeddings=True)


def test_spanflow_run_trains_evaluates_and_registers_a_layer_mix(project: Path, prefect_server: str):  # noqa: F811
    """`spanflow run --set method.name=layer_mix` on the tiny project (search and warm start included): the learned
    layer weights as MLflow metrics, a JSON artifact and the plot; the registered pyfunc answers with the mix."""
    import mlflow
    import pandas as pd

    from spanflow.cli import main

    # one search point (a trial, so the final model starts from its weights) and 20 dev questions: a short run
    overrides = ["method.name=layer_mix", "search.space.chunk_length=[96]", "search.space.overlap=[32]"]
    overrides.append("data.dev_limit=20")
    assert main(["run", *(arg for o in overrides for arg in ("--set", o))]) == 0

    summary = json.loads((project / "models/final/train.json").read_text())
    assert summary["method"] == "layer_mix" and summary["warm_start"]
    report = summary["layer_mix"]
    assert report["state"] == ["embeddings", "layer 1", "layer 2"] and report["learned"]
    assert sum(report["weight"]) == pytest.approx(1.0, abs=1e-6)
    assert max(abs(w - 1 / 3) for w in report["weight"]) > 1e-4  # the mix trained: it left the uniform start
    assert (project / "results/layer_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert 0 <= metrics["f1"] <= 100 and metrics["trainable_params"] == 3 + 1 + (32 * 2 + 2)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    weights = [run.data.metrics[f"layer_weight_{i}"] for i in range(3)]
    assert weights == pytest.approx(report["weight"]) and run.data.metrics["layer_mix_gamma"] == report["gamma"]
    assert run.info.run_name.endswith("-frozen")
    assert {"plots/layer_weights.png"} <= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "layer_mix/weights.json")).read_text())
    assert logged["weight"] == report["weight"]

    version = json.loads((project / "results/registered.json").read_text())["version"]
    assert client.get_model_version("spanflow-qa-test", str(version)).run_id == run.info.run_id
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(f"models:/spanflow-qa-test/{version}")
    assert find_layer_mix(served.unwrap_python_model().model) is not None  # the pyfunc rebuilt the mix
    context = "The harbour of Calder was founded by Brenna in 1843. It can hold 300 ships."
    answer = served.predict(pd.DataFrame({"question": ["Who founded the harbour of Calder?"], "context": [context]}))
    row = answer.iloc[0]
    assert context[row["start"] : row["end"]] == row["answer"]
