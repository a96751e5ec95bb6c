"""The fused LoRA Linear (spanflow/models/lora_fused.py) computes what PEFT's own LoRA forward computes: same
outputs, same gradients, same state dict and merged export, in fp32 and under bf16 autocast; it steps aside where
it does not apply. On a tiny random BERT with the real tokenizer and real context splitting (CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from transformers import set_seed

from spanflow.answering.inference import pad_batch
from spanflow.data.features import featurize
from spanflow.models.lora_fused import FusedLoraLinear, fuse_lora, release_fp32_bases
from spanflow.models.modeling import apply_method, load_backbone, load_tokenizer
from tests.helpers import make_tiny_model_dir, tiny_config, tiny_records

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft x transformers 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-bert")


@pytest.fixture(scope="module")
def batch(model_dir: Path) -> dict[str, torch.Tensor]:
    cfg = tiny_config(model_dir)
    tok = load_tokenizer(cfg.model)
    feats = featurize(tiny_records(12), tok, 64, 16, 16)
    return pad_batch(feats, list(range(8)), tok.pad_token_id, with_labels=True)


def pair(model_dir: Path, overrides: list[str] | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(PEFT's forward, fused forward) on identical weights, with LoRA B made non-zero so the adapters count."""
    cfg = tiny_config(model_dir, ["method.lora.fused=false", *(overrides or [])])
    set_seed(0)
    peft_model = apply_method(load_backbone(cfg.model), cfg.method).model
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    fused = copy.deepcopy(peft_model)
    fuse_lora(fused)
    return peft_model, fused


def forward_backward(model: torch.nn.Module, batch: dict, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.cat([out.start_logits.float(), out.end_logits.float()]), grads


def test_every_adapted_linear_is_switched_and_the_state_dict_is_unchanged(model_dir: Path) -> None:
    peft_model, fused = pair(model_dir)
    # 2 layers x (query, key, value, attention.output.dense, intermediate.dense, output.dense)
    assert sum(type(m) is FusedLoraLinear for m in fused.modules()) == 12
    assert not any(type(m) is PeftLoraLinear for m in fused.modules())
    assert fused.state_dict().keys() == peft_model.state_dict().keys()


def test_outputs_and_gradients_match_pefts_forward_in_fp32(model_dir: Path, batch: dict) -> None:
    peft_model, fused = pair(model_dir)
    ref_logits, ref_grads = forward_backward(peft_model, batch, bf16=False)
    logits, grads = forward_backward(fused, batch, bf16=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any("lora_A" in n for n in grads) and any("lora_B" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # the frozen base really is frozen on the fused path: no gradient reaches it
    assert all(p.grad is None for n, p in fused.named_parameters() if not p.requires_grad)


def relative_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    a, b = (torch.cat([d[n].flatten().double() for n in sorted(ref)]) for d in (got, ref))
    return float((a - b).norm() / b.norm())


def test_bf16_autocast_is_at_least_as_close_to_fp32_as_pefts_forward(model_dir: Path, batch: dict) -> None:
    """bf16 rounds differently on the two paths, so each is measured against the fp32 gradients: the fused one
    (frozen weight cast once, scaling folded into B) must not be farther off than PEFT's."""
    _, fp32_grads = forward_backward(pair(model_dir)[0], batch, bf16=False)
    peft_model, fused = pair(model_dir)
    peft_logits, peft_grads = forward_backward(peft_model, batch, bf16=True)
    logits, grads = forward_backward(fused, batch, bf16=True)
    torch.testing.assert_close(logits, peft_logits, rtol=5e-2, atol=5e-2)
    peft_err, fused_err = relative_error(peft_grads, fp32_grads), relative_error(grads, fp32_grads)
    assert fused_err < 0.1, fused_err
    assert fused_err <= 1.25 * peft_err, (fused_err, peft_err)


def test_merged_export_is_the_same_model(model_dir: Path, batch: dict) -> None:
    peft_model, fused = pair(model_dir)
    with torch.no_grad():
        expected = fused(**batch).start_logits
        a = peft_model.merge_and_unload()(**batch).start_logits
        b = fused.merge_and_unload()(**batch).start_logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, expected, rtol=1e-5, atol=1e-5)


def test_cached_bf16_weight_follows_changes_of_the_base_weight(model_dir: Path, batch: dict) -> None:
    peft_model, fused = pair(model_dir)
    forward_backward(fused, batch, bf16=True)  # fills the per-layer bf16 copies
    with torch.no_grad():
        for model in (peft_model, fused):
            for m in model.modules():
                if isinstance(m, PeftLoraLinear):
                    m.get_base_layer().weight.mul_(1.5)  # in place: same storage, new version
    ref, _ = forward_backward(peft_model, batch, bf16=True)
    got, _ = forward_backward(fused, batch, bf16=True)
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)


def test_query_key_and_value_share_one_saved_copy_of_their_input(model_dir: Path, batch: dict) -> None:
    """Under bf16 autocast the fp32 hidden states are cast once for the three projections that read them, and
    autograd saves that one copy: per layer 3 distinct inputs (attention in, attention out, feed-forward in) for
    the 5 adapted Linear layers that read 32-wide inputs (output.dense reads the 64-wide intermediate)."""
    _, fused = pair(model_dir)
    saved: list[torch.Tensor] = []
    tokens = batch["input_ids"].numel()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.shape == (tokens, 32) and t.dtype == torch.bfloat16:
            saved.append(t)  # the (tokens, hidden) inputs the fused layers keep for backward
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_backward(fused, batch, bf16=True)
    assert len(saved) == 2 * 5 + 1  # + the QA head's input
    assert len({t.untyped_storage().data_ptr() for t in saved}) == 2 * 3 + 1


def test_inference_mode_under_autocast_gives_the_training_paths_outputs(model_dir: Path, batch: dict) -> None:
    _, fused = pair(model_dir)
    fused.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            expected = fused(**batch).start_logits
        with torch.inference_mode():
            got = fused(**batch).start_logits
    torch.testing.assert_close(got, expected)


def test_falls_back_to_pefts_forward_where_fusing_does_not_apply(model_dir: Path, batch: dict) -> None:
    peft_model, fused = pair(model_dir, ["method.lora.dropout=0.1"])  # dropout on the adapter input
    layer = next(m for m in fused.modules() if isinstance(m, FusedLoraLinear))
    assert not layer._fusable()
    peft_model.eval()  # dropout off: the two must then agree exactly
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).start_logits, peft_model(**batch).start_logits)
    _, fused_plain = pair(model_dir)
    with fused_plain.disable_adapter():
        layer = next(m for m in fused_plain.modules() if isinstance(m, FusedLoraLinear))
        assert not layer._fusable()


def test_config_switch_selects_the_path(model_dir: Path) -> None:
    for fused, cls in ((True, FusedLoraLinear), (False, PeftLoraLinear)):
        cfg = tiny_config(model_dir, [f"method.lora.fused={str(fused).lower()}"])
        model = apply_method(load_backbone(cfg.model), cfg.method).model
        assert {type(m) for m in model.modules() if isinstance(m, PeftLoraLinear)} == {cls}


def test_ffn_output_layer_keeps_the_gelu_input_and_recomputes_the_same_bits(
    model_dir: Path, batch: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """output.dense reads gelu(intermediate): it saves the GELU's input, which the GELU node keeps anyway, instead
    of the GELU's output, and recomputes the output in backward. Outputs and gradients are bit for bit those of the
    same fused model that saves the output; per layer one (tokens, intermediate) tensor less is kept."""
    tokens, layers = batch["input_ids"].numel(), 2  # the tiny BERT: 2 layers, intermediate size 64

    def run(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        storages: set[int] = set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() in (2, 3) and t.numel() == tokens * 64 and t.dtype == torch.bfloat16:  # not the 4-d mask
                storages.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, grads = forward_backward(model, batch, bf16=True)
        return logits, grads, len(storages)

    _, fused = pair(model_dir)
    logits, grads, kept = run(fused)
    monkeypatch.setattr("spanflow.models.lora_fused._gelu_input", lambda x: (None, ""))  # save the GELU's output
    ref_logits, ref_grads, ref_kept = run(fused)
    assert (kept, ref_kept) == (layers, 2 * layers)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    assert any("output.dense.lora_A" in n and grads[n].abs().sum() > 0 for n in grads)


def test_releasing_the_fp32_bases_changes_no_bit(model_dir: Path, batch: dict) -> None:
    """`release_fp32_bases` makes the forward's bf16 copies up front and hands the fp32 pages back (tests/
    test_paging.py): training from there computes exactly what it computes without."""
    _, fused = pair(model_dir)
    ref = copy.deepcopy(fused)
    release_fp32_bases(fused, torch.bfloat16)
    for _ in range(2):  # the second pass reads the copies the first one kept
        logits, grads = forward_backward(fused, batch, bf16=True)
        ref_logits, ref_grads = forward_backward(ref, batch, bf16=True)
        assert torch.equal(logits, ref_logits)
        assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
