"""Method prompt (soft prompt tuning) on a tiny BERT: logits and labels on the real positions only, the chunk budget
shrunk by the virtual tokens, what trains, answers that map back to their characters, and a saved prompt model
answering alike through torch and ONNX Runtime and through the whole flow."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import set_seed

from spanflow.answering.inference import answer_questions, load_qa_model, predict_records, run_model
from spanflow.answering.onnx_runtime import OnnxQAModel
from spanflow.config import Config, ConfigError, MethodConfig, ModelConfig
from spanflow.data.features import Features, featurize
from spanflow.models.modeling import apply_method, export_merged, load_backbone, load_tokenizer
from spanflow.models.soft_prompt import MODULE_NAME, SoftPromptQA
from spanflow.search.grid import GridPoint, skip_reason
from spanflow.training.loop import accumulate_batch, param_groups, train_model
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records
from tests.test_pipeline_integration import project, spanflow_run  # noqa: F401 - the flow's tiny project fixture

HIDDEN = 32  # the tiny BERT's
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return load_tokenizer(ModelConfig(name_or_path=str(model_dir)))


def _prompt_model(model_dir: Path, tokens: int, init: str = "vocab") -> SoftPromptQA:
    method = MethodConfig(name="prompt")
    method.prompt.tokens, method.prompt.init = tokens, init
    set_seed(0)
    return apply_method(load_backbone(ModelConfig(name_or_path=str(model_dir))), method).model


def _short_records(n: int) -> list[dict]:
    """Records whose context has no filler: one chunk each at the tiny config's chunk length."""
    return [r for i, r in enumerate(tiny_records(3 * n)) if i % 3 == 0][:n]


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(**inputs)
    return torch.stack([out.start_logits, out.end_logits])


def test_logits_and_loss_are_on_the_real_positions_only(model_dir: Path, tokenizer):
    """A QA head that makes the first virtual token win over every real one (its final hidden state, scaled: by
    Cauchy-Schwarz over LayerNorm outputs of one norm, no other position scores as high): the wrapper's logits
    are the real positions' ones, [batch, seq], and its loss is the loss of labels among them."""
    n = 4
    model = _prompt_model(model_dir, n)
    records = _short_records(2)
    feats = featurize(records, tokenizer, 64, 16, 16, virtual_tokens=n)
    batch = {
        "input_ids": torch.tensor([feats.input_ids[0]]),
        "token_type_ids": torch.tensor([feats.token_type_ids[0]]),
        "attention_mask": torch.ones(1, len(feats.input_ids[0]), dtype=torch.long),
    }
    inner = model.model
    captured = {}
    hook = inner.bert.register_forward_hook(lambda _m, _a, out: captured.update(hidden=out.last_hidden_state))
    _logits(model, batch)
    hook.remove()
    assert captured["hidden"].shape[1] == n + batch["input_ids"].shape[1]  # the encoder saw the virtual tokens
    with torch.no_grad():
        inner.qa_outputs.weight.copy_(10 * captured["hidden"][0, 0].expand(2, -1))
        inner.qa_outputs.bias.zero_()
        full = inner.qa_outputs(captured["hidden"])[..., 0]
    assert int(full.argmax()) == 0  # unstripped, the virtual token would be the answer

    start, end = _logits(model, batch)
    assert start.shape == end.shape == batch["input_ids"].shape
    torch.testing.assert_close(start, full[:, n:])  # exactly the real positions, in order
    assert float(start.max()) < float(full.max())

    labels = {"start_positions": torch.tensor(feats.start_positions[:1]), "end_positions": torch.tensor([2])}
    with torch.no_grad():
        loss = model(**batch, **labels).loss
    want = (
        torch.nn.functional.cross_entropy(start, labels["start_positions"])
        + torch.nn.functional.cross_entropy(end, labels["end_positions"])
    ) / 2
    torch.testing.assert_close(loss, want)


def test_featurization_leaves_labels_alone_and_shrinks_the_chunks_by_the_virtual_tokens(tokenizer):
    """Chunks that fit are the same with or without a prompt (labels and offsets unshifted); a long context is split
    into chunks of at most chunk_length - N tokens, so that N + chunk fits the model's chunk_length positions."""
    short = _short_records(3)
    assert featurize(short, tokenizer, 64, 16, 16, virtual_tokens=8) == featurize(short, tokenizer, 64, 16, 16)
    long = [r for r in tiny_records(12) if len(r["context"]) > 150]
    plain = featurize(long, tokenizer, 48, 8, 16)
    prompted = featurize(long, tokenizer, 48, 8, 16, virtual_tokens=8)
    assert max(plain.lengths()) == 48 and max(prompted.lengths()) == 40 and len(prompted) > len(plain)
    for feats in (plain, prompted):  # every label still points at its answer's tokens
        for k in range(len(feats)):
            if feats.start_positions[k]:
                record = long[feats.example_index[k]]
                begin, end = feats.offsets[k][feats.start_positions[k]][0], feats.offsets[k][feats.end_positions[k]][1]
                assert record["context"][begin:end] == record["answers"]["text"][0]
    with pytest.raises(ValueError, match="chunk_length: 40 leaves no room for context after 20 virtual tokens"):
        featurize(long, tokenizer, 40, 8, 16, virtual_tokens=20)


def test_prompt_settings_are_checked(model_dir: Path):
    base = ["method.name=prompt"]
    with pytest.raises(ConfigError, match="method.prompt.tokens: 0 must be >= 1"):
        tiny_config(model_dir, [*base, "method.prompt.tokens=0"])
    with pytest.raises(ConfigError, match=r"method.prompt.init: 'zeros' is not vocab\|random"):
        tiny_config(model_dir, [*base, "method.prompt.init=zeros"])
    with pytest.raises(ConfigError, match="features.chunk_length: 64 leaves no room for context after method.prompt"):
        tiny_config(model_dir, [*base, "method.prompt.tokens=45"])  # 64 - 45 < a 16-token question + 4
    with pytest.raises(ConfigError, match="features.overlap: 16 .* after method.prompt.tokens=30 virtual tokens"):
        tiny_config(model_dir, [*base, "method.prompt.tokens=30"])  # 64 - 30 - 16 - 3 = 15 context tokens
    assert tiny_config(model_dir, ["method.prompt.tokens=30"]).method.virtual_tokens == 0  # lora ignores it
    # the search skips a point whose chunk keeps no more context than the overlap, after the virtual tokens
    point = GridPoint(64, 16, 4)
    assert skip_reason(point, 16) is None
    assert "after 30 virtual tokens and a question" in skip_reason(point, 16, 30)


def test_only_the_prompt_and_the_head_train_and_the_backbone_stays(model_dir: Path, tokenizer, tmp_path: Path):
    n = 5
    model = _prompt_model(model_dir, n)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.{MODULE_NAME}.weight", "model.qa_outputs.weight", "model.qa_outputs.bias"}
    cfg = tiny_config(model_dir, ["method.name=prompt", f"method.prompt.tokens={n}", "train.max_steps=2"])
    prepared = apply_method(load_backbone(cfg.model), cfg.method)
    assert prepared.trainable_params == n * HIDDEN + (HIDDEN * 2 + 2)
    assert prepared.total_params == sum(p.numel() for p in load_backbone(cfg.model).parameters()) + n * HIDDEN
    before = {k: v.clone() for k, v in prepared.model.state_dict().items()}
    f = cfg.features
    feats = featurize(_short_records(8), tokenizer, f.chunk_length, f.overlap, f.max_query_length, virtual_tokens=n)
    train_model(prepared, feats, Features(), [], cfg, tokenizer.pad_token_id, tmp_path / "ckpt")
    after = prepared.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.{MODULE_NAME}.weight", "model.qa_outputs.weight", "model.qa_outputs.bias"}


def test_the_cpu_training_paths_take_the_wrapper(model_dir: Path, tokenizer):
    """Math attention (which must see the virtual tokens' mask columns) and micro-batches give the gradient of one
    default-kernel pass; the kernel choice counts the virtual tokens in the width; the prompt learns at the
    learning rate without weight decay, the head at head_lr_ratio times it."""
    n = 6
    model = _prompt_model(model_dir, n).eval()  # dropout off; gradients still flow
    feats = featurize(tiny_records(10), tokenizer, 48, 8, 16, virtual_tokens=n)
    idx = list(range(8))
    assert len({len(feats.input_ids[i]) for i in idx}) > 1  # passes of several widths
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    base = dataclasses.replace(Config().train, pad_to_multiple_of=1, pass_overhead_tokens=0, loss="real_tokens")
    results = []
    for math_width, micro in ((0, 1), (10_000, 1), (10_000, 3)):  # default kernel; math attention; in passes
        tc = dataclasses.replace(base, math_attention_max_width=math_width, micro_batches=micro)
        model.zero_grad(set_to_none=True)
        loss = accumulate_batch(model, feats, idx, tokenizer.pad_token_id, tc, CPU, "fp32", scaler)
        results.append((loss, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    (loss, grads), others = results[0], results[1:]
    assert grads[f"model.{MODULE_NAME}.weight"].abs().sum() > 0
    for other_loss, other in others:
        assert other_loss == pytest.approx(loss, rel=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(other[name], g, rtol=1e-4, atol=1e-6, msg=name)

    # a pass of width w runs w + n positions: math attention only where w + n is within the limit
    from torch.profiler import ProfilerActivity, profile

    width = max(len(feats.input_ids[i]) for i in idx[:2])
    flash = []
    for limit in (width, width + n):
        tc = dataclasses.replace(base, math_attention_max_width=limit, micro_batches=1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            accumulate_batch(model, feats, idx[:2], tokenizer.pad_token_id, tc, CPU, "fp32", scaler)
        flash.append(any("flash_attention" in e.key for e in prof.key_averages()))
    assert flash == [True, False]

    tc = dataclasses.replace(base, learning_rate=1e-2, head_lr_ratio=3.0)
    groups = {id(p): (g["lr"], g["weight_decay"]) for g in param_groups(model, tc) for p in g["params"]}
    assert groups[id(model.prompt.weight)] == (1e-2, 0.0)
    assert groups[id(model.model.qa_outputs.weight)] == (pytest.approx(3e-2), tc.weight_decay)


def test_a_few_steps_learn_answers_that_map_back_to_their_characters(model_dir: Path, tokenizer, tmp_path: Path):
    """Trained by the loop (math attention, passes, the padded-row loss) on four one-chunk records, the prompt and
    head answer each with its gold text, cut from the context at the characters the spans map back to: labels or
    logits one position off (the virtual tokens left in, or the labels shifted) would miss them."""
    records = _short_records(4)
    overrides = ["method.name=prompt", "method.prompt.tokens=4", "train.precision=fp32", "train.learning_rate=1e-2"]
    overrides += ["train.epochs=40", "train.select_by=last", "train.early_stopping_patience=1000"]
    overrides += ["train.warmup_ratio=0", "train.micro_batches=2", "train.pass_overhead_tokens=0"]
    cfg = tiny_config(model_dir, overrides)
    f = cfg.features
    feats = featurize(records, tokenizer, f.chunk_length, f.overlap, f.max_query_length, virtual_tokens=4)
    set_seed(0)
    prepared = apply_method(load_backbone(cfg.model), cfg.method)
    torch.set_num_threads(1)
    train_model(prepared, feats, Features(), [], cfg, tokenizer.pad_token_id, tmp_path / "ckpt")
    answers = answer_questions(prepared.model, tokenizer, records, f.chunk_length, f.overlap, 16, 30, 20, 16, "fp32")
    for answer, record in zip(answers, records, strict=True):
        assert answer.text == record["answers"]["text"][0]
        assert record["context"][answer.start : answer.end] == answer.text
        assert answer.start == record["answers"]["answer_start"][0]


def test_a_saved_prompt_model_answers_with_its_prompt_in_torch_and_onnx_runtime(
    model_dir: Path, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The prompt does not merge: the saved config names it, `load_trained` puts it back, the ONNX graph holds it
    and records its length, and evaluation through either runtime splits long contexts to leave it room."""
    n = 6
    model = _prompt_model(model_dir, n)
    with torch.no_grad():
        model.model.qa_outputs.weight.normal_(std=0.5)
    inputs = dict(tokenizer(["Who built it?"], ["Brenna Holm built the lighthouse in 1843."], return_tensors="pt"))
    trained = _logits(model, inputs)
    with torch.no_grad():
        model.prompt.weight.normal_(std=1.0)  # another prompt, the same backbone and head: other logits
    assert not torch.allclose(_logits(model, inputs), trained, atol=1e-3)
    out = tmp_path / "hf"
    export_merged(model, tokenizer, out)
    assert json.loads((out / "config.json").read_text())["spanflow_prompt"] == {"tokens": n}
    loaded = load_qa_model(out, "fp32", torch.device("cpu"))
    assert isinstance(loaded, SoftPromptQA) and loaded.virtual_tokens == n
    want = _logits(model, inputs)
    torch.testing.assert_close(_logits(loaded, inputs), want)
    # evaluation by either runtime: chunks that leave the virtual tokens room (the encoder, prompt included, never
    # wider than chunk_length), the same answers as answering directly
    records = tiny_records(12)
    widths = []
    hook = loaded.model.bert.embeddings.register_forward_hook(lambda _m, _a, o: widths.append(o.shape[1]))
    direct = answer_questions(loaded, tokenizer, records, 48, 8, 16, 30, 20, 16, "fp32")
    hook.remove()
    assert max(widths) == 48
    monkeypatch.chdir(tmp_path)  # the ONNX cache (models/onnx) of eval.runtime=onnx
    for runtime in ("torch", "onnx"):
        cfg = tiny_config(model_dir, ["features.chunk_length=48", "features.overlap=8", f"eval.runtime={runtime}"])
        answers = predict_records(cfg, out, records, "1.1")[0]
        assert answers == {r["id"]: a.text for r, a in zip(records, direct, strict=True)}

    # the ONNX graph holds the prompt and records its length: the logits of every chunk are torch's
    (onnx_file,) = (tmp_path / "models/onnx").glob("*/model.onnx")
    session = OnnxQAModel(onnx_file)
    assert session.virtual_tokens == n
    feats = featurize(records, tokenizer, 48, 8, 16, virtual_tokens=n)
    torch_s, torch_e, _ = run_model(loaded, feats, 5, "fp32", tokenizer.pad_token_id)
    onnx_s, onnx_e, _ = run_model(session, feats, 5, "fp32", tokenizer.pad_token_id)
    for a, b in zip(onnx_s + onnx_e, torch_s + torch_e, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_spanflow_run_trains_evaluates_and_registers_a_prompt_model(
    project: Path,  # noqa: F811 - the fixture imported above
    prefect_server: str,
):
    """`spanflow run --set method.name=prompt` on the tiny project (the search off: the grid's skips are
    `test_prompt_settings_are_checked`'s) trains the prompt and head, evaluates through ONNX Runtime and registers;
    the registered version answers with its prompt, splitting a long context as its evaluation did."""
    import mlflow
    import pandas as pd

    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    overrides = ["method.name=prompt", "method.prompt.tokens=8", "eval.runtime=onnx", "search.enabled=false"]
    spanflow_run(project, overrides, env)
    train = json.loads((project / "models/final/train.json").read_text())
    assert train["method"] == "prompt" and train["trainable_params"] == 8 * HIDDEN + HIDDEN * 2 + 2
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert metrics["runtime"] == "onnx" and metrics["trainable_params"] == train["trainable_params"]
    assert json.loads((project / "models/final/hf/config.json").read_text())["spanflow_prompt"] == {"tokens": 8}

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    version = json.loads((project / "results/registered.json").read_text())["version"]
    served = mlflow.pyfunc.load_model(f"models:/spanflow-qa-test/{version}")
    assert served.unwrap_python_model().model.virtual_tokens == 8  # its ONNX file records the prompt's length
    filler = " ".join(f"Entry {i} records a cargo of salt bound for the southern port." for i in range(30))
    context = f"{filler} The lighthouse was built by Brenna Holm in 1843."
    answers = served.predict(pd.DataFrame({"question": ["Who built the lighthouse?"], "context": [context]}))
    start, end = int(answers["start"][0]), int(answers["end"][0])
    assert 0 <= start < end <= len(context) and context[start:end] == answers["answer"][0]
