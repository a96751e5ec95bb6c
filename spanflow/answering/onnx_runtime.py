"""Answering with ONNX Runtime: the trained model exported to ONNX, in fp32 or with int8 weights.

`eval.runtime` (and `serving.runtime`) pick the path: `torch` (the model as trained), `onnx` (the same graph in
ONNX Runtime, fp32) or `onnx_int8` (dynamic int8 quantization of the Linear layers: int8 weights per output
channel, activations quantized per batch). The Linear layers named in `eval.int8_skip_modules` stay fp32: in
BERT-style encoders the FFN's first Linear (`intermediate`) reads LayerNorm outputs with a few outlier channels
that an 8-bit per-tensor range cannot hold.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

RUNTIMES = ("torch", "onnx", "onnx_int8")
ONNX_FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx"}
MANIFEST = "export.json"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("start_logits", "end_logits")
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # torch.onnx (dynamo) records each node's module path here
_WRAPPER_ATTR = "qa"
VIRTUAL_TOKENS_KEY = "spanflow.virtual_tokens"  # model metadata: a soft prompt's share of each chunk's positions


def export_onnx(model_dir: Path, out_file: Path) -> Path:
    """Export the saved QA model in `model_dir` (fp32) to `out_file`, batch and sequence length dynamic."""
    import torch

    from spanflow.models.modeling import load_saved_tokenizer, load_trained, takes_token_type_ids

    class SpanLogits(torch.nn.Module):  # named tensors in, (start_logits, end_logits) out
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, _WRAPPER_ATTR, model)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            out = getattr(self, _WRAPPER_ATTR)(**{k: v for k, v in inputs.items() if v is not None})
            return out.start_logits, out.end_logits

    tokenizer = load_saved_tokenizer(model_dir)
    model = load_trained(model_dir)
    names = [n for n in MODEL_INPUTS if n in tokenizer.model_input_names]
    if not takes_token_type_ids(model):  # a decoder has no token types, whatever its tokenizer gives
        names = [n for n in names if n != "token_type_ids"]
    example = tokenizer(["What is it?"] * 2, ["It is an example, two rows long."] * 2, return_tensors="pt")
    kwargs = {n: example[n] for n in names}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    program = torch.onnx.export(
        SpanLogits(model).eval(),
        (),
        kwargs=kwargs,
        dynamo=True,
        input_names=names,
        output_names=list(OUTPUTS),
        dynamic_shapes={n: {0: batch, 1: sequence} for n in names},
        external_data=False,
        verbose=False,
    )
    program.save(str(out_file))
    _set_virtual_tokens(out_file, getattr(model, "virtual_tokens", 0))
    return out_file


def _set_virtual_tokens(onnx_file: Path, tokens: int) -> None:
    """Record in `onnx_file` how many virtual tokens its graph puts before each chunk, so that whoever answers with
    it splits contexts into chunks that leave them room (`OnnxQAModel.virtual_tokens`)."""
    import onnx

    if not tokens:
        return
    model = onnx.load(str(onnx_file))
    onnx.helper.set_model_props(model, {VIRTUAL_TOKENS_KEY: str(tokens)})
    onnx.save(model, str(onnx_file))


def linear_modules(onnx_file: Path) -> dict[str, str]:
    """Node name -> the torch module it came from (`bert.encoder.layer.0.intermediate.dense`), for every MatMul
    with a weight (a graph initializer) as its second input."""
    import onnx

    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    modules = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get(_SCOPES_KEY, "[]"))  # ['', 'qa', ..., 'qa.x.dense', 'linear_3']
        modules[node.name] = scopes[-2].removeprefix(f"{_WRAPPER_ATTR}.") if len(scopes) > 1 else ""
    return modules


def quantize_int8(src: Path, dst: Path, skip_modules: list[str]) -> list[str]:
    """Dynamic int8 quantization of `src`'s Linear layers into `dst`, except those whose module name contains one
    of `skip_modules`; returns the modules kept in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    modules = linear_modules(src)
    if skip_modules and not all(modules.values()):
        raise ValueError(f"{src}: the graph does not say which module each MatMul came from; set int8_skip_modules: []")
    for pattern in skip_modules:
        if not any(pattern in m for m in modules.values()):
            known = sorted({m for m in modules.values()})[:6]
            raise ValueError(f"int8_skip_modules: {pattern!r} names no Linear layer of {src.name} (e.g. {known})")
    skipped = {n: m for n, m in modules.items() if any(p in m for p in skip_modules)}
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=sorted(skipped))
    return sorted(skipped.values())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_onnx(model_dir: Path, runtime: str, skip_modules: list[str], cache_dir: Path) -> Path:
    """The ONNX file `runtime` answers with, exported from `model_dir` into `cache_dir/<weights' sha256>/` unless
    one made from the same weights and int8 settings is there already."""
    if runtime not in ONNX_FILES:
        raise ValueError(f"runtime {runtime!r} has no ONNX file (one of {', '.join(ONNX_FILES)})")
    out_dir = cache_dir / _sha256(model_dir / "model.safetensors")[:16]
    target = out_dir / ONNX_FILES[runtime]
    wanted = {"int8_skip_modules": list(skip_modules) if runtime == "onnx_int8" else None}
    manifest_file = out_dir / MANIFEST
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    made_with = manifest.get(target.name, {})
    if target.is_file() and made_with.get("int8_skip_modules") == wanted["int8_skip_modules"]:
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # a cut-short export leaves no half-written target
        made = export_onnx(model_dir, Path(tmp) / ONNX_FILES["onnx"])
        if runtime == "onnx_int8":
            wanted["kept_fp32"] = quantize_int8(made, Path(tmp) / ONNX_FILES["onnx_int8"], skip_modules)
            made = Path(tmp) / ONNX_FILES["onnx_int8"]
        shutil.move(made, target)
    manifest = {k: v for k, v in manifest.items() if (out_dir / k).is_file()}
    manifest[target.name] = {"source": str(model_dir), **wanted}
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    return target


class OnnxQAModel:
    """An ONNX Runtime session answering batches as spanflow's torch model does: padded input tensors in,
    start/end logits (numpy, fp32) out. Thread-safe: several threads may call `logits` at once."""

    def __init__(self, onnx_file: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        self.path = Path(onnx_file)
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.virtual_tokens = int(metadata.get(VIRTUAL_TOKENS_KEY, 0))  # a soft prompt's (spanflow.models.soft_prompt)

    def logits(self, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        feed = {name: batch[name].numpy() for name in self.input_names}
        start, end = self.session.run(list(OUTPUTS), feed)
        return start, end
