"""What autograd keeps for backward in one training forward of params.yaml's model, by tensor shape and dtype.

    .venv/bin/python -m benchmarks.saved_activations [--batch 16] [--length 256] [--set key=value ...]

Counts each saved storage once (views of one tensor share it), under the train stage's precision and attention
kernel. This is where
the activation share of training memory goes; `lora_vs_full` measures the whole process.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from spanflow.answering.inference import autocast, default_device, resolve_precision
from spanflow.config import load_config
from spanflow.models.modeling import apply_method, load_backbone
from spanflow.training.passes import attention_kernel


def saved_bytes(overrides: list[str], batch: int, length: int) -> tuple[Counter, int]:
    """({(shape, dtype): MiB}, tensors saved) for one forward with labels on random token ids."""
    cfg = load_config("params.yaml", overrides)
    device = default_device()
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(0)
    model = apply_method(load_backbone(cfg.model), cfg.method).model.to(device).train()
    ids = torch.randint(1000, 20000, (batch, length), device=device)
    labels = torch.full((batch,), 5, device=device)
    by_kind: Counter = Counter()
    seen: set[int] = set()
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            by_kind[(tuple(t.shape), str(t.dtype).removeprefix("torch."))] += storage.nbytes() / 2**20
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        autocast(device, precision),
        attention_kernel(device, length, cfg.train.math_attention_max_width),  # the kernel the train stage picks
    ):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), start_positions=labels, end_positions=labels)
    return by_kind, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    by_kind, count = saved_bytes(args.overrides, args.batch, args.length)
    for (shape, dtype), mib in by_kind.most_common(12):
        print(f"{mib:8.1f} MiB  {dtype:9} {shape}")
    print(f"{sum(by_kind.values()):8.1f} MiB in all, {count} saved tensors ({len(by_kind)} shapes)")


if __name__ == "__main__":
    main()
