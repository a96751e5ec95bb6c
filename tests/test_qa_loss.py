"""The QA loss over real tokens (spanflow/models/qa_loss.py): Hugging Face's loss where nothing is padded, and the same
value and gradient however wide the padding, on a tiny random BERT with the real tokenizer (CPU)."""

from __future__ import annotations

import pytest
import torch

from spanflow.answering.inference import pad_batch
from spanflow.config import ModelConfig
from spanflow.data.features import featurize
from spanflow.models.modeling import load_backbone, load_tokenizer
from spanflow.models.qa_loss import span_loss
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records


@pytest.fixture(scope="module")
def model_and_feats(tmp_path_factory: pytest.TempPathFactory):
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert")
    cfg = tiny_config(model_dir)
    tok = load_tokenizer(cfg.model)
    feats = featurize(tiny_records(8), tok, 64, 16, 16)
    model = load_backbone(ModelConfig(name_or_path=str(model_dir))).eval()  # dropout off, gradients on
    return model, feats, tok.pad_token_id


def loss_and_grad(model, feats, idx, pad_id, extra_pad: int, hf: bool) -> tuple[float, torch.Tensor]:
    batch = pad_batch(feats, idx, pad_id, with_labels=True, multiple_of=1)
    if extra_pad:  # wider rows, as in a batch with a longer chunk
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.nn.functional.pad(batch[key], (0, extra_pad), value=fill)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    loss = (
        out.loss
        if hf
        else span_loss(
            out.start_logits, out.end_logits, batch["attention_mask"], batch["start_positions"], batch["end_positions"]
        )
    )
    loss.backward()
    return loss.item(), model.qa_outputs.weight.grad.clone()


def test_equals_hugging_faces_loss_where_nothing_is_padded(model_and_feats) -> None:
    model, feats, pad_id = model_and_feats
    n = len(feats.input_ids[0])
    same = [i for i in range(len(feats)) if len(feats.input_ids[i]) == n][:4]  # equal lengths: no padding
    ours, _ = loss_and_grad(model, feats, same, pad_id, 0, hf=False)
    theirs, _ = loss_and_grad(model, feats, same, pad_id, 0, hf=True)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_padding_changes_neither_the_loss_nor_the_gradient(model_and_feats) -> None:
    model, feats, pad_id = model_and_feats
    idx = list(range(min(len(feats), 6)))
    loss, grad = loss_and_grad(model, feats, idx, pad_id, 0, hf=False)
    loss_wide, grad_wide = loss_and_grad(model, feats, idx, pad_id, 40, hf=False)
    assert loss_wide == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(grad_wide, grad, rtol=1e-4, atol=1e-6)
    # Hugging Face's loss does change: the pad positions enter its softmax
    hf, _ = loss_and_grad(model, feats, idx, pad_id, 0, hf=True)
    hf_wide, _ = loss_and_grad(model, feats, idx, pad_id, 40, hf=True)
    assert abs(hf_wide - hf) > 1e-3


def test_padded_loss_is_hugging_faces_loss_on_a_padded_row(model_and_feats) -> None:
    model, feats, pad_id = model_and_feats
    idx = list(range(min(len(feats), 6)))
    batch = pad_batch(feats, idx, pad_id, with_labels=True, multiple_of=1)
    batch = {
        k: torch.nn.functional.pad(v, (0, 40), value=pad_id if k == "input_ids" else 0) if v.ndim == 2 else v
        for k, v in batch.items()
    }
    with torch.no_grad():
        out = model(**batch)
    mask, starts, ends = batch["attention_mask"], batch["start_positions"], batch["end_positions"]
    padded = span_loss(out.start_logits, out.end_logits, mask, starts, ends, over="padded")
    assert padded.item() == pytest.approx(out.loss.item(), rel=1e-6)
    real = span_loss(out.start_logits, out.end_logits, mask, starts, ends)
    assert real.item() < padded.item() - 1e-3  # 40 pad positions fewer in each softmax


def test_unknown_loss_is_refused() -> None:
    logits, mask, pos = torch.zeros(1, 4), torch.ones(1, 4), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="loss over 'tokens': expected one of real_tokens, padded"):
        span_loss(logits, logits, mask, pos, pos, over="tokens")
