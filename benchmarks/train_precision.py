"""Training throughput per precision on the same config, alternating runs in one process.

    .venv/bin/python benchmarks/train_precision.py [--steps 20] [--reps 2] [--set key=value ...]

Prints chunks/s per precision (median over repetitions) and the ratio against fp32.
This is a benchmark, not a test: the ratio is measured here, on this machine, in this run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from spanflow.answering.inference import default_device
from spanflow.config import load_config
from spanflow.data.features import Features, featurize
from spanflow.data.squad import load_squad_json
from spanflow.models.modeling import apply_method, load_backbone, load_tokenizer
from spanflow.training.loop import train_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    cfg = load_config("params.yaml", args.overrides)
    tokenizer = load_tokenizer(cfg.model)
    records, _ = load_squad_json(Path(cfg.data.train))
    f = cfg.features
    feats = featurize(records[:1500], tokenizer, f.chunk_length, f.overlap, f.max_query_length)
    precisions = args.precisions.split(",")
    speeds: dict[str, list[float]] = {p: [] for p in precisions}
    for rep in range(args.reps):
        for precision in precisions:  # alternate, so drift hits every precision alike
            run_cfg = load_config(
                "params.yaml",
                [*args.overrides, f"train.precision={precision}", f"train.max_steps={args.steps}", "train.epochs=1"],
            )
            prepared = apply_method(load_backbone(cfg.model), cfg.method)
            prepared.model.to(default_device())
            with tempfile.TemporaryDirectory() as tmp:
                result = train_model(prepared, feats, Features(), [], run_cfg, tokenizer.pad_token_id, Path(tmp))
            speeds[precision].append(result.examples_per_second)
            print(f"rep {rep + 1} {precision}: {result.examples_per_second:.2f} chunks/s")
    base = statistics.median(speeds[precisions[0]])
    print(f"\nmethod={cfg.method.name} chunk_length={f.chunk_length} batch_size={cfg.train.batch_size}")
    print("| precision | chunks/s (median) | min..max | ratio vs " + precisions[0] + " |")
    print("| --- | ---: | ---: | ---: |")
    for p in precisions:
        med = statistics.median(speeds[p])
        print(f"| {p} | {med:.2f} | {min(speeds[p]):.2f}..{max(speeds[p]):.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
