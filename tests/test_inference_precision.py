"""Answering loads the saved model with its weights in the compute dtype (no per-call casts), and gives the
same logits as the fp32 model up to bf16 rounding. Tiny random BERT, real tokenizer and context splitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spanflow.answering.inference import autocast, load_qa_model, run_model
from spanflow.data.features import featurize
from spanflow.models.modeling import load_tokenizer
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_loaded_for_answering_in_the_precisions_dtype(model_dir: Path, precision: str, dtype: torch.dtype) -> None:
    model = load_qa_model(model_dir, precision, CPU)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_autocast_only_where_weights_are_not_already_in_the_dtype(model_dir: Path) -> None:
    fp32, bf16 = load_qa_model(model_dir, "fp32", CPU), load_qa_model(model_dir, "bf16", CPU)
    assert isinstance(autocast(CPU, "bf16", fp32), torch.autocast)
    assert not isinstance(autocast(CPU, "bf16", bf16), torch.autocast)
    assert not isinstance(autocast(CPU, "fp32", fp32), torch.autocast)


def test_bf16_weights_give_the_fp32_logits_up_to_rounding(model_dir: Path) -> None:
    tok = load_tokenizer(tiny_config(model_dir).model)
    feats = featurize(tiny_records(24), tok, 64, 16, 16)
    ref, _, _ = run_model(load_qa_model(model_dir, "fp32", CPU), feats, 8, "fp32", tok.pad_token_id)
    got, _, _ = run_model(load_qa_model(model_dir, "bf16", CPU), feats, 8, "bf16", tok.pad_token_id)
    assert [len(a) for a in got] == [len(a) for a in ref]  # trimmed to each chunk's own length
    a, b = np.concatenate(got), np.concatenate(ref)
    assert a.dtype == np.float32
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()
    assert not np.array_equal(a, b)  # it really ran in bf16
