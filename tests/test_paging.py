"""spanflow/training/paging.py and `release_fp32_bases`: pages of tensors training does not read are handed back to the
kernel, the values stay. On a file-mapped tensor and on the default backbone's safetensors file (CPU, Linux)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from spanflow.config import load_config
from spanflow.models.lora_fused import FusedLoraLinear, release_fp32_bases
from spanflow.models.modeling import apply_method, load_backbone, resolve_model_path
from spanflow.training.memory import mapped_mb
from spanflow.training.paging import page_out

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),  # peft x transformers 5
]


def test_page_out_hands_back_a_file_mapped_tensors_pages_and_keeps_its_values(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    values = torch.arange(4 * 2**20, dtype=torch.float32)  # 16 MiB
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.float32)
    assert torch.equal(mapped, values)  # read: every page resident
    assert mapped_mb(path) > 15
    assert page_out(mapped) == 16 * 2**20
    assert mapped_mb(path) < 1
    assert torch.equal(mapped, values)  # read back from the file
    assert page_out(mapped[::2]) == 0  # a strided view: its bytes are not one span


def test_release_fp32_bases_hands_back_the_default_backbones_adapted_weights_and_keeps_them() -> None:
    cfg = load_config(ROOT / "params.yaml")
    checkpoint = Path(resolve_model_path(cfg.model.name_or_path)) / "model.safetensors"
    model = apply_method(load_backbone(cfg.model), cfg.method).model
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    weights = [m.get_base_layer().weight for m in layers]
    sums = [float(w.double().sum()) for w in weights]  # reads them all: resident from the file
    before = mapped_mb(checkpoint)
    released = release_fp32_bases(model, torch.bfloat16)
    linear_mb = sum(w.numel() * w.element_size() for w in weights) / 2**20  # 6 layers x 6 Linear: ~40 MiB fp32
    assert released / 2**20 > 0.95 * linear_mb
    assert before - mapped_mb(checkpoint) > 0.9 * linear_mb
    # the forward's bf16 copies exist already, and the fp32 weights are what they were
    assert all(m._spanflow_cast[1].dtype == torch.bfloat16 for m in layers)
    assert [float(w.double().sum()) for w in weights] == sums
    assert release_fp32_bases(model, torch.float32) == 0  # fp32 compute reads the fp32 weights: nothing to hand back
