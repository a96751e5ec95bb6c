"""LoRA against full fine-tuning: step time and peak memory of `train_model` for the same config.

    .venv/bin/python -m benchmarks.lora_vs_full [--steps 30] [--reps 3] [--train-questions 400] [--json out.json]

Three variants of params.yaml's final model, each run in its own process (so peak RSS is its own), in rotating
order rep by rep, on the same seeded training questions and batches:

* `lora`: what the train stage runs (spanflow's fused LoRA Linear, spanflow/models/lora_fused.py);
* `lora-peft`: the same adapters through PEFT's own forward (`method.lora.fused=false`);
* `full`: every weight trained (`method.name=full`, learning rate 5e-5 so that its F1 means something);
* `lora-qv`: adapters on query and value only (the LoRA paper's choice), for what the target modules cost: an
  adapted Linear keeps its input for the adapter's gradient, a frozen one does not, so with every Linear adapted
  (params.yaml) LoRA saves as many activations as full fine-tuning and gains only the base's gradients and
  optimizer state.

Step time is the training loop's wall time over its optimizer steps. Training memory is the peak RSS while
training minus the RSS before the backbone was loaded (Python, torch and the data are the same for all three):
weights, gradients, optimizer state and activations. Absolute peak RSS is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.train_compare import _spawn, bench_config, freeze_config, load_splits, write_jsonl

VARIANTS: dict[str, list[str]] = {
    "lora": [],
    "lora-peft": ["method.lora.fused=false"],
    "full": ["method.name=full", "train.learning_rate=5.0e-5"],
    "lora-qv": ["method.lora.target_modules=[query, value]"],
}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(
    steps: int = 30,
    reps: int = 3,
    train_questions: int | None = 400,
    val_questions: int | None = 100,
    overrides: list[str] | None = None,
    variants: list[str] | None = None,
) -> dict[str, Any]:
    from spanflow.search.worker import sample_questions

    overrides = list(overrides or [])
    cfg = bench_config(overrides)
    train_all, val_all, source = load_splits(cfg)
    train = sample_questions(train_all, train_questions, cfg.data.seed)
    val = sample_questions(val_all, val_questions, cfg.data.seed)
    names = list(variants or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="lora-vs-full-") as tmp:
        data_dir = Path(tmp)
        write_jsonl(data_dir / "train.jsonl", train)
        write_jsonl(data_dir / "val.jsonl", val)
        freeze_config(cfg, data_dir / "params.yaml")
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate: drift hits all alike
            for name in order:
                run = _spawn("spanflow", steps, data_dir, VARIANTS[name], "adamw_torch", [])
                del run["heldout_f1_per_question"]  # no dev questions here: the validation F1 is the figure
                run["step_seconds"] = run["train_seconds"] / run["steps"]
                run["train_memory_mb"] = run["peak_rss_train_mb"] - run["rss_before_model_mb"]
                runs[name].append(run)
                print(
                    f"rep {rep + 1} {name}: {1000 * run['step_seconds']:.0f} ms/step, training memory"
                    f" {run['train_memory_mb']:.0f} MB (peak RSS {run['peak_rss_train_mb']:.0f} MB),"
                    f" trainable {run['trainable_params']:,}, F1 {run['val_f1']:.2f}",
                    file=sys.stderr,
                )
    metrics = ("step_seconds", "train_memory_mb", "peak_rss_train_mb", "examples_per_s", "val_f1", "foreign_cpu")
    summary = {n: {m: _spread([r[m] for r in runs[n]]) for m in metrics} for n in names}
    for n in names:
        summary[n]["trainable_params"] = runs[n][0]["trainable_params"]

    def ratio(a: str, b: str, metric: str) -> float | None:
        if a not in summary or b not in summary:
            return None  # a variant left out with --variants
        return summary[a][metric]["median"] / summary[b][metric]["median"]

    first = runs[names[0]][0]
    return {
        "settings": {
            "steps": steps,
            "reps": reps,
            "train_questions": len(train),
            "val_questions": len(val),
            "data_source": source,
            "batch_size": cfg.train.batch_size,
            "chunk_length": cfg.features.chunk_length,
            "lora_rank": cfg.method.lora.rank,
            "target_modules": cfg.method.lora.target_modules,
            "precision": first["precision"],
            "threads": first["threads"],
            "variants": {n: VARIANTS[n] for n in names},
        },
        "summary": summary,
        "lora_step_time_ratio": ratio("lora", "full", "step_seconds"),
        "lora_peak_memory_ratio": ratio("lora", "full", "train_memory_mb"),
        "lora_peak_rss_ratio": ratio("lora", "full", "peak_rss_train_mb"),
        "peft_lora_step_time_ratio": ratio("lora-peft", "full", "step_seconds"),
        "peft_lora_peak_memory_ratio": ratio("lora-peft", "full", "train_memory_mb"),
        "fused_vs_peft_step_time": ratio("lora", "lora-peft", "step_seconds"),
        "lora_qv_step_time_ratio": ratio("lora-qv", "full", "step_seconds"),
        "lora_qv_peak_memory_ratio": ratio("lora-qv", "full", "train_memory_mb"),
        "runs": {n: [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in runs[n]] for n in names},
    }


def print_table(res: dict[str, Any]) -> None:
    s = res["settings"]
    print(
        f"\nLoRA r={s['lora_rank']} vs full fine-tuning, chunk {s['chunk_length']}, bs {s['batch_size']},"
        f" {s['precision']}, {s['threads']} threads, {s['steps']} steps x {s['reps']} reps"
    )
    print("| variant | trainable params | ms/step | training memory MB | peak RSS MB | val F1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in res["summary"].items():
        st, mem = ({k: round(v * 1000) for k, v in m["step_seconds"].items()}), m["train_memory_mb"]
        print(
            f"| {name} | {m['trainable_params']:,} | {st['median']} ({st['min']}..{st['max']})"
            f" | {mem['median']:.0f} ({mem['min']:.0f}..{mem['max']:.0f}) | {m['peak_rss_train_mb']['median']:.0f}"
            f" | {m['val_f1']['median']:.2f} |"
        )
    ratios = [k for k in res if k.endswith("_ratio") and res[k] is not None]
    print(", ".join(f"{k} {res[k]:.2f}" for k in ratios))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-questions", type=int, default=400)
    parser.add_argument("--val-questions", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="run only these (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    res = compare(args.steps, args.reps, args.train_questions, args.val_questions, args.overrides, args.variants)
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
