"""spanflow's trainer against a reference `transformers.Trainer` run, same backbone, data, settings and steps.

    .venv/bin/python -m benchmarks.train_compare [--steps 20] [--reps 2] [--train-questions Q]
        [--val-questions V] [--dev-questions D] [--vary-seed] [--set key=value ...] [--spanflow-set key=value ...]
        [--spanflow-lever NAME ...] [--json out.json]

Both sides train params.yaml's final model (`final_config`: chunk length, overlap, LoRA rank/alpha/targets,
batch size, lr, weight decay, warm-up, grad-norm clipping, seed, precision) for the same number of optimizer
steps on the same seeded sample of training questions, starting from identical weights:

* spanflow: `spanflow.training.loop.train_model` (what the train stage runs) on `spanflow.data.features.featurize`
  chunks, with its dynamic padding, length-sorted passes per batch (`train.micro_batches`) and length grouping as
  configured, and its loss as `train.loss` sets it (`spanflow.models.qa_loss`: over each pass's padded row, or real
  tokens).
* trainer: `transformers.Trainer` on features prepared as the Hugging Face example `run_qa.py` does
  (`benchmarks.hf_qa_features`: padded to `max_seq_length`, `default_data_collator`), AdamW with the same
  parameter groups, linear warm-up/decay, clipping and seed, bf16 through accelerate's CPU autocast.

Each side runs in its own subprocess (`--side`), so peak RSS is per side; sides alternate order rep by rep.
Only the training loop is timed (feature preparation and evaluation are timed apart). Afterwards each side
answers the same held-out questions (the validation split and the prepare stage's dev split) with the same
evaluator (`answer_questions` + `answer_texts` + SQuAD scoring), so an F1 difference comes from training alone.
The speed claim holds only when the two median F1 agree within `F1_TOLERANCE` points; the paired-bootstrap
interval of the gap says how much of it the choice of questions could move. This is a benchmark, not a test:
the figures are for this machine, this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spanflow.training.memory import peak_rss_mb

SIDES = ("spanflow", "trainer")
F1_TOLERANCE = 1.0  # F1 points; beyond this the speed comparison is void
METRICS = (
    "examples_per_s",
    "questions_per_s",
    "padded_tokens_per_s",
    "real_tokens_per_s",
    "train_seconds",
    "prep_seconds",
    "eval_seconds",
    "peak_rss_load_mb",
    "peak_rss_train_mb",
    "peak_rss_mb",
    "val_f1",
    "val_exact_match",
    "heldout_f1",
    "heldout_exact_match",
    "train_loss",
    "loop_cpu_seconds",
    "examples_per_cpu_s",
    "foreign_cpu",
)
# The reference runs the adapters through PEFT's own LoRA forward (the fused Linear is spanflow's code, the same
# function: tests/test_lora_fused.py). model.attention_dropout is a hyperparameter like the learning rate, so both
# sides share it: with the checkpoint's 0.1 on the Trainer side only, spanflow reached val F1 18.2 vs 12.0 after
# 80 steps (2 seeds), and equal steps no longer meant equal training.
TRAINER_MODEL = ["method.lora.fused=false"]
CONTENDED = 0.10  # foreign_cpu above this: another process took a tenth of the machine during the loop


# --------------------------------------------------------------------------- shared helpers


def bench_config(overrides: list[str], path: str | Path = "params.yaml"):
    """params.yaml (+ overrides) with the search's best point, as the train stage sees it."""
    from spanflow.config import load_config
    from spanflow.search.best_params import final_config

    return final_config(load_config(path, overrides))


def freeze_config(cfg, path: Path) -> None:
    """Write the resolved config (search point applied, search off) for the children: a params.yaml or
    results/best_params.yaml edited while the benchmark runs cannot make the sides or the reps differ."""
    import yaml

    path.write_text(yaml.safe_dump(cfg.with_values({"search.enabled": False}).to_dict(), sort_keys=False))


def load_splits(cfg) -> tuple[list[dict], list[dict], str]:
    """(train, val, source): the prepare stage's split when present, else the article split of `data.train`."""
    from spanflow.data.squad import limit_records, load_squad_json, read_jsonl, split_by_article
    from spanflow.paths import PREPARED

    if (PREPARED / "train.jsonl").is_file() and (PREPARED / "val.jsonl").is_file():
        return read_jsonl(PREPARED / "train.jsonl"), read_jsonl(PREPARED / "val.jsonl"), str(PREPARED)
    records, _ = load_squad_json(cfg.data.train)
    train, val = split_by_article(limit_records(records, cfg.data.train_limit), cfg.data.val_fraction, cfg.data.seed)
    return train, val, cfg.data.train


def load_dev() -> list[dict]:
    """The prepare stage's dev questions (held out from training and selection alike); none without it."""
    from spanflow.data.squad import read_jsonl
    from spanflow.paths import PREPARED

    return read_jsonl(PREPARED / "dev.jsonl") if (PREPARED / "dev.jsonl").is_file() else []


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


class CpuMeter:
    """Wall time, this process's CPU time and the machine's busy CPU time (Linux /proc/stat) over a span, to tell
    how much of the machine other processes took meanwhile (`foreign_cpu`: 0 = quiet machine, 1 = every core)."""

    def __init__(self) -> None:
        self.begin: tuple[float, float, float] | None = None
        self.end: tuple[float, float, float] | None = None

    @staticmethod
    def snapshot() -> tuple[float, float, float]:
        busy = float("nan")
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
        except (OSError, ValueError, IndexError):
            pass
        return time.perf_counter(), time.process_time(), busy

    def start(self) -> None:
        self.begin = self.snapshot()

    def stop(self) -> None:
        self.end = self.snapshot()

    def figures(self) -> dict[str, float]:
        wall, cpu, busy = (b - a for a, b in zip(self.begin, self.end, strict=True))
        cores = os.cpu_count() or 1
        return {"loop_cpu_seconds": cpu, "foreign_cpu": max(0.0, (busy - cpu) / (wall * cores))}


class TokenCounter:
    """Counts the rows, token positions (padding included) and real tokens the model trains on."""

    def __init__(self, model: Any) -> None:
        self.rows = self.positions = self.real = self.passes = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        if not module.training:
            return
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        self.passes += 1
        self.rows += ids.shape[0]
        self.positions += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()

    def remove(self) -> None:
        self.handle.remove()


def trainable_summary(model: Any) -> dict[str, Any]:
    """Count, checksum and expected AdamW groups (decay: ndim >= 2) of the trainable parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return {
        "trainable_params": sum(p.numel() for _, p in params),
        "trainable_checksum": float(sum(p.detach().double().abs().sum() for _, p in params)),
        "decay_params": sum(p.numel() for _, p in params if p.ndim >= 2),
        "no_decay_params": sum(p.numel() for _, p in params if p.ndim < 2),
    }


def checksum(value: Any) -> str:
    import hashlib

    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def features_checksum(input_ids: list[list[int]], starts: list[int], ends: list[int]) -> str:
    """One hash over every chunk's real tokens and labels, in order: equal on both sides only when chunk i of one
    side is chunk i of the other (so that feeding both the same indices means feeding both the same batches)."""
    return checksum(list(zip(input_ids, starts, ends, strict=True)))


def batch_order(lengths: list[int], cfg, steps: int) -> list[int]:
    """The chunk indices in the order spanflow's loop draws them (`spanflow.training.loop.epoch_batches`), epoch after
    epoch, for `steps` optimizer steps."""
    from spanflow.training.loop import epoch_batches

    epochs = epochs_for(len(lengths), cfg.train, steps)
    return [i for epoch in range(1, epochs + 1) for batch in epoch_batches(lengths, cfg.train, epoch) for i in batch]


def steps_for_epochs(train: list[dict], cfg, epochs: int) -> int:
    """Optimizer steps of `epochs` passes over the chunks spanflow cuts from `train` at the configured length."""
    from spanflow.data.features import featurize
    from spanflow.models.modeling import load_tokenizer

    f, tc = cfg.features, cfg.train
    chunks = len(featurize(train, load_tokenizer(cfg.model), f.chunk_length, f.overlap, f.max_query_length))
    return epochs * -(-chunks // (tc.batch_size * tc.grad_accum_steps))


def epochs_for(features: int, tc, steps: int) -> int:
    """Epochs spanflow's loop needs for `steps` optimizer steps over `features` chunks."""
    return math.ceil(steps / -(-features // (tc.batch_size * tc.grad_accum_steps)))


def _lever_no_dropout(model: Any) -> None:
    """Backbone dropout off (hidden and attention); LoRA adapters are trained without it already."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _lever_no_attn_dropout(model: Any) -> None:
    """Attention-probability dropout off, hidden dropout kept: SDPA then needs no dropout mask over B x H x L x L."""
    import torch

    for m in model.modules():
        if type(m).__name__.endswith(("SelfAttention", "CrossAttention")) and isinstance(
            getattr(m, "dropout", None), torch.nn.Dropout
        ):
            m.dropout.p = 0.0


def _lever_bf16_frozen(model: Any) -> None:
    """Frozen Linear weights stored in bf16: autocast then has no fp32->bf16 weight copy to make per step."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:
            m.to(torch.bfloat16)


def _lever_no_input_cast(model: Any) -> None:
    """PEFT casts a bf16 activation to the fp32 adapter dtype before lora_A (autocast casts it back): skip that."""
    for m in model.modules():
        if hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = False


def _lever_pad_max(cfg: Any) -> None:
    """Every batch padded to features.chunk_length, as the Trainer reference is: the QA head's softmax then spans
    the same positions (pads included) on both sides; isolates what dynamic padding does to learning."""
    import torch

    import spanflow.training.loop
    from spanflow.answering.inference import pad_batch

    def padded(
        feats: Any, idx: list[int], pad_id: int, with_labels: bool, multiple_of: int = 1, token_types: bool = True
    ) -> dict[str, Any]:
        batch = pad_batch(feats, idx, pad_id, with_labels, multiple_of, token_types)
        extra = cfg.features.chunk_length - batch["input_ids"].shape[1]
        if extra > 0:
            for key, value in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
                if key in batch:  # a decoder's batch has no token_type_ids
                    batch[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        return batch

    spanflow.training.loop.pad_batch = padded


MODEL_LEVERS = {
    "no-dropout": _lever_no_dropout,
    "no-attn-dropout": _lever_no_attn_dropout,
    "bf16-frozen": _lever_bf16_frozen,
    "no-input-cast": _lever_no_input_cast,
}
LOOP_LEVERS = {"pad-max": _lever_pad_max}


def apply_levers(model: Any, levers: list[str], cfg: Any) -> None:
    """Experimental changes to spanflow's side (not what the train stage runs); each still faces the F1 check."""
    for name in levers:
        if name in MODEL_LEVERS:
            MODEL_LEVERS[name](model)
        elif name in LOOP_LEVERS:
            LOOP_LEVERS[name](cfg)
        else:
            raise ValueError(f"unknown lever {name!r} (known: {', '.join([*MODEL_LEVERS, *LOOP_LEVERS])})")


def evaluate(model: Any, tokenizer: Any, records: list[dict], cfg, precision: str) -> dict[str, Any]:
    """EM/F1 with spanflow's chunked inference and SQuAD scorer (the same for both sides), in total and per
    question (0 to 100, in `records` order)."""
    from spanflow.answering.inference import answer_questions
    from spanflow.answering.spans import answer_texts
    from spanflow.answering.squad_metrics import per_question_scores

    t0 = time.perf_counter()
    f, e = cfg.features, cfg.eval
    answers = answer_questions(
        model,
        tokenizer,
        records,
        f.chunk_length,
        f.overlap,
        f.max_query_length,
        e.max_answer_length,
        e.n_best,
        e.batch_size,
        precision,
        e.workers,
        e.span_scoring,
    )
    version = "2.0" if any(r.get("is_impossible") for r in records) else "1.1"
    texts = answer_texts(answers, version, e.no_answer_threshold)
    scores = per_question_scores(records, {r["id"]: t for r, t in zip(records, texts, strict=True)}, version)
    em, f1 = ([100 * scores[r["id"]][k] for r in records] for k in (0, 1))
    return {"exact_match": em, "f1": f1, "eval_seconds": time.perf_counter() - t0}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def held_out_scores(model: Any, tokenizer: Any, val: list[dict], dev: list[dict], cfg, precision: str) -> dict:
    """The side's scores on the validation questions (`val_*`, as the train stage selects on) and on those plus the
    dev questions (`heldout_*`, what the F1 agreement is judged on: 291 validation questions alone move F1 by a
    point or more from one trained model to the next, the size of the tolerance)."""
    out = evaluate(model, tokenizer, val + dev, cfg, precision)
    em, f1 = out["exact_match"], out["f1"]
    return {
        "val_f1": _mean(f1[: len(val)]),
        "val_exact_match": _mean(em[: len(val)]),
        "heldout_f1": _mean(f1),
        "heldout_exact_match": _mean(em),
        "heldout_f1_per_question": f1,
        "eval_seconds": out["eval_seconds"],
    }


# --------------------------------------------------------------------------- one side, in its own process


def _spanflow_train(prepared: Any, tokenizer: Any, train: list[dict], cfg, steps: int) -> dict[str, Any]:
    from spanflow.data.features import Features, featurize
    from spanflow.training.loop import train_model

    f, tc = cfg.features, cfg.train
    t0 = time.perf_counter()
    feats = featurize(train, tokenizer, f.chunk_length, f.overlap, f.max_query_length)
    prep = time.perf_counter() - t0
    order = batch_order(feats.lengths(), cfg, steps)
    run_cfg = cfg.with_values({"train.max_steps": steps, "train.epochs": epochs_for(len(feats), tc, steps)})
    counter, meter = TokenCounter(prepared.model), CpuMeter()
    with tempfile.TemporaryDirectory(prefix="train-compare-") as ckpt:
        meter.start()
        result = train_model(prepared, feats, Features(), [], run_cfg, tokenizer.pad_token_id, Path(ckpt))
        meter.stop()
    counter.remove()
    losses = [h.train_loss for h in result.history]
    return {
        "features": len(feats),
        "features_checksum": features_checksum(feats.input_ids, feats.start_positions, feats.end_positions),
        "batch_order_checksum": checksum(order),
        "feature_real_tokens": sum(feats.lengths()),
        "prep_seconds": prep,
        "train_seconds": result.train_seconds,
        "steps": result.steps,
        "epochs": len(result.history),
        "train_loss": losses[-1] if losses else float("nan"),
        "precision": result.precision,
        **meter.figures(),
        "counter": counter,
    }


class _LoopTimer:
    """Trainer callback: from on_train_begin (optimizer and accelerate set up) to the end of the last step."""

    def __init__(self, last_step: int) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                timer.meter.start()
                timer.start = timer.meter.begin[0]

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                if state.global_step >= timer.last_step and timer.end is None:
                    timer.meter.stop()
                    timer.end = timer.meter.end[0]

        self.last_step, self.start, self.end = last_step, None, None
        self.meter = CpuMeter()
        self.callback = _Callback()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def trainer_arguments(cfg, steps: int, precision: str, output_dir: str, optim: str):
    """TrainingArguments matching spanflow's loop: AdamW, linear warm-up/decay, clipping, seed, no eval/save/log.

    bf16 on CPU: `bf16=True` + `use_cpu=True` sets accelerate's mixed_precision="bf16", which wraps the model's
    forward (loss included) in `torch.autocast("cpu", dtype=torch.bfloat16)`; without `use_cpu` the arguments
    refuse bf16 on a machine without a bf16 GPU. fp16 is CUDA-only on both sides.
    """
    import torch
    from transformers import TrainingArguments

    tc = cfg.train
    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.grad_accum_steps,
        learning_rate=tc.learning_rate,
        weight_decay=tc.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim=optim,
        lr_scheduler_type="linear",
        warmup_steps=int(tc.warmup_ratio * steps),  # spanflow rounds the ratio down; Trainer's ratio rounds up
        max_grad_norm=tc.max_grad_norm,
        max_steps=steps,
        seed=tc.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        dataloader_num_workers=0,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",  # the dataset comes in spanflow's batch order (`batch_order`)
    )


def _trainer_train(prepared: Any, tokenizer: Any, train: list[dict], cfg, steps: int, optim: str) -> dict[str, Any]:
    from transformers import Trainer, default_data_collator

    from benchmarks.hf_qa_features import build_train_dataset
    from spanflow.answering.inference import default_device, resolve_precision

    f = cfg.features
    precision = resolve_precision(cfg.train.precision, default_device())
    t0 = time.perf_counter()
    dataset = build_train_dataset(train, tokenizer, f.chunk_length, f.overlap)
    prep = time.perf_counter() - t0
    real_ids = [ids[: sum(m)] for ids, m in zip(dataset["input_ids"], dataset["attention_mask"], strict=True)]
    labels = dataset["start_positions"], dataset["end_positions"]
    # the Trainer gets spanflow's batches, in spanflow's order (sequential sampling over the reordered features):
    # with the same batches the two F1s differ by what each loop computes, not by which chunks each drew
    order = batch_order([len(ids) for ids in real_ids], cfg, steps)
    timer = _LoopTimer(steps)
    with tempfile.TemporaryDirectory(prefix="train-compare-") as out:
        trainer = Trainer(
            model=prepared.model,
            args=trainer_arguments(cfg, steps, precision, out, optim),
            train_dataset=dataset.select(order),
            data_collator=default_data_collator,  # run_qa.py's collator with pad_to_max_length
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )
        counter = TokenCounter(prepared.model)
        output = trainer.train()
        counter.remove()
    groups = trainer.optimizer.param_groups
    return {
        "features": len(dataset),
        "features_checksum": features_checksum(real_ids, *labels),
        "batch_order_checksum": checksum(order),
        "feature_real_tokens": sum(len(ids) for ids in real_ids),
        "prep_seconds": prep,
        "train_seconds": timer.seconds,
        "trainer_train_runtime": output.metrics.get("train_runtime"),
        "steps": trainer.state.global_step,
        "epochs": math.ceil(trainer.state.epoch or 0),
        "train_loss": output.training_loss,
        "precision": precision,
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "optimizer_decay_params": sum(p.numel() for g in groups if g["weight_decay"] > 0 for p in g["params"]),
        "optimizer_no_decay_params": sum(p.numel() for g in groups if g["weight_decay"] == 0 for p in g["params"]),
        "autocast_forward": hasattr(prepared.model, "_original_forward"),  # accelerate wrapped forward in autocast
        **timer.meter.figures(),
        "counter": counter,
    }


def run_side(
    side: str,
    steps: int,
    data_dir: Path,
    overrides: list[str],
    optim: str = "adamw_torch",
    levers: list[str] | None = None,
) -> dict[str, Any]:
    """Train one side from scratch, score it, and return its figures (run in a fresh process)."""
    import torch
    from transformers import set_seed

    from spanflow.answering.inference import default_device, resolve_precision
    from spanflow.data.squad import read_jsonl
    from spanflow.models.modeling import apply_method, load_backbone, load_tokenizer

    cfg = bench_config(overrides, data_dir / "params.yaml")
    if cfg.train.num_threads:  # train_model sets it for spanflow; the Trainer side gets the same
        torch.set_num_threads(cfg.train.num_threads)
    train, val = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "val.jsonl")
    dev = read_jsonl(data_dir / "dev.jsonl") if (data_dir / "dev.jsonl").is_file() else []
    tokenizer = load_tokenizer(cfg.model)
    device = default_device()
    rss_before_model = peak_rss_mb()
    t0 = time.perf_counter()
    set_seed(cfg.train.seed)  # the QA head and the adapters start from the seed, as in the train stage
    prepared = apply_method(load_backbone(cfg.model), cfg.method)
    prepared.model.to(device)
    load_seconds = time.perf_counter() - t0
    init = trainable_summary(prepared.model)
    rss_load = peak_rss_mb()
    if levers:
        if side != "spanflow":
            raise ValueError("levers are for the spanflow side only")
        apply_levers(prepared.model, levers, cfg)
    if side == "spanflow":
        out = _spanflow_train(prepared, tokenizer, train, cfg, steps)
    elif side == "trainer":
        out = _trainer_train(prepared, tokenizer, train, cfg, steps, optim)
    else:
        raise ValueError(f"--side: unknown side {side!r} (known: {', '.join(SIDES)})")
    rss_train = peak_rss_mb()
    counter: TokenCounter = out.pop("counter")
    scores = held_out_scores(prepared.model, tokenizer, val, dev, cfg, resolve_precision(cfg.train.precision, device))
    seconds = out["train_seconds"]
    features_per_question = out["features"] / len(train)
    return {
        "side": side,
        **init,
        **out,
        **scores,
        "load_seconds": load_seconds,
        "threads": torch.get_num_threads(),
        "group_by_length": cfg.train.group_by_length,
        "micro_batches": cfg.train.micro_batches,
        "pass_overhead_tokens": cfg.train.pass_overhead_tokens,
        "passes_per_step": counter.passes / out["steps"] if out.get("steps") else None,
        "loss": cfg.train.loss,
        "train_questions": len(train),
        "val_questions": len(val),
        "dev_questions": len(dev),
        "features_per_question": features_per_question,
        "rows_trained": counter.rows,
        "padded_tokens_trained": counter.positions,
        "real_tokens_trained": counter.real,
        "examples_per_s": counter.rows / seconds,
        "questions_per_s": counter.rows / features_per_question / seconds,
        "padded_tokens_per_s": counter.positions / seconds,
        "real_tokens_per_s": counter.real / seconds,
        "examples_per_cpu_s": counter.rows / out["loop_cpu_seconds"],
        "padding_fraction": 1 - counter.real / counter.positions if counter.positions else 0.0,
        "levers": list(levers or []),
        "rss_before_model_mb": rss_before_model,
        "peak_rss_load_mb": rss_load,
        "peak_rss_train_mb": rss_train,
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- both sides, alternating


def _spawn(
    side: str, steps: int, data_dir: Path, overrides: list[str], optim: str, levers: list[str]
) -> dict[str, Any]:
    result = data_dir / f"result-{side}.json"
    cmd = [sys.executable, "-m", "benchmarks.train_compare", "--side", side, "--steps", str(steps)]
    cmd += ["--data-dir", str(data_dir), "--result", str(result), "--trainer-optim", optim]
    for o in overrides:
        cmd += ["--set", o]
    for lever in levers:
        cmd += ["--spanflow-lever", lever]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"side {side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _f1_gap_interval(runs: dict[str, list[dict[str, Any]]], gate: Any) -> Any:
    """Paired bootstrap over the scored questions of spanflow's minus the Trainer's F1, each averaged over the reps
    (`spanflow.answering.bootstrap`, with the promotion gate's resamples, confidence and seed)."""
    import numpy as np

    from spanflow.answering.bootstrap import paired_bootstrap

    per_side = [np.mean([r["heldout_f1_per_question"] for r in runs[s]], axis=0) for s in SIDES]
    return paired_bootstrap(*per_side, gate.bootstrap_resamples, gate.confidence, gate.seed)


def compare(
    steps: int = 20,
    reps: int = 2,
    train_questions: int | None = None,
    val_questions: int | None = 300,
    overrides: list[str] | None = None,
    spanflow_overrides: list[str] | None = None,
    trainer_optim: str = "adamw_torch",
    spanflow_levers: list[str] | None = None,
    vary_seed: bool = False,
    epochs: int | None = None,
    dev_questions: int | None = None,
) -> dict[str, Any]:
    """Run both sides `reps` times, alternating their order; returns per-run figures, medians and ratios.

    `epochs`, when given, replaces `steps`: that many passes over the training chunks at the configured
    chunk length (so the depth of training follows the searched point instead of a fixed step count).

    `overrides` apply to both sides; `spanflow_overrides` to the spanflow side only (for trying levers such as
    `train.group_by_length=false`; anything that changes the optimization makes the comparison unfair), and
    `spanflow_levers` (names in MODEL_LEVERS / LOOP_LEVERS) patch the spanflow side in its own process only.
    Each side is deterministic for a seed; with `vary_seed` rep k trains both sides with `train.seed` + k (same
    initial weights on both sides within a rep), so the F1 medians and ranges reflect seed-to-seed noise.

    Both sides are scored on the validation questions plus `dev_questions` of the prepare stage's dev split (None:
    all; 0: none). `f1_gap_vs_trainer` is the difference of the two sides' median F1 on those questions;
    `f1_gap_interval` resamples the questions (paired, with the promotion gate's bootstrap settings) for the
    interval of the gap in F1 averaged over the reps.
    """
    from spanflow.search.worker import sample_questions

    overrides, spanflow_overrides = list(overrides or []), list(spanflow_overrides or [])
    levers = list(spanflow_levers or [])
    cfg = bench_config(overrides)
    train_all, val_all, source = load_splits(cfg)
    train = sample_questions(train_all, train_questions, cfg.data.seed)
    val = sample_questions(val_all, val_questions, cfg.data.seed)
    dev = sample_questions(load_dev(), dev_questions, cfg.data.seed) if dev_questions != 0 else []
    if epochs is not None:
        steps = steps_for_epochs(train, cfg, epochs)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="train-compare-") as tmp:
        data_dir = Path(tmp)
        write_jsonl(data_dir / "train.jsonl", train)
        write_jsonl(data_dir / "val.jsonl", val)
        if dev:
            write_jsonl(data_dir / "dev.jsonl", dev)
        freeze_config(cfg, data_dir / "params.yaml")
        for rep in range(reps):
            seed = [f"train.seed={cfg.train.seed + rep}"] if vary_seed else []
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:  # alternate, so drift hits both sides alike
                ours = side == "spanflow"
                side_overrides = seed + (spanflow_overrides if ours else TRAINER_MODEL)
                run = _spawn(side, steps, data_dir, side_overrides, trainer_optim, levers if ours else [])
                runs[side].append({**run, "seed": cfg.train.seed + rep if vary_seed else cfg.train.seed})
                print(
                    f"rep {rep + 1} {side}: {run['examples_per_s']:.2f} ex/s,"
                    f" {run['real_tokens_per_s']:.0f} real tok/s, F1 {run['heldout_f1']:.2f}"
                    f" (validation only {run['val_f1']:.2f}),"
                    f" peak RSS {run['peak_rss_train_mb']:.0f} MB, foreign CPU {run['foreign_cpu']:.2f}",
                    file=sys.stderr,
                )
    summary = {s: {m: _spread([r[m] for r in runs[s]]) for m in METRICS} for s in SIDES}
    sf, tr = summary["spanflow"], summary["trainer"]

    def ratio(metric: str) -> float:
        return sf[metric]["median"] / tr[metric]["median"]

    f1_gap = sf["heldout_f1"]["median"] - tr["heldout_f1"]["median"]
    interval = _f1_gap_interval(runs, cfg.registry)
    for run in (r for side in runs.values() for r in side):
        del run["heldout_f1_per_question"]  # in the interval; too long for results.json
    first = {s: runs[s][0] for s in SIDES}
    return {
        "settings": {
            "steps": steps,
            "epochs_requested": epochs,
            "reps": reps,
            "batch_size": cfg.train.batch_size,
            "chunk_length": cfg.features.chunk_length,
            "overlap": cfg.features.overlap,
            "max_query_length": cfg.features.max_query_length,
            "method": cfg.method.name,
            "lora_rank": cfg.method.lora.rank,
            "learning_rate": cfg.train.learning_rate,
            "precision": first["spanflow"]["precision"],
            "threads": first["spanflow"]["threads"],
            "group_by_length": first["spanflow"]["group_by_length"],
            "micro_batches": first["spanflow"]["micro_batches"],
            "pass_overhead_tokens": first["spanflow"].get("pass_overhead_tokens", 0),
            "passes_per_step": {side: runs[side][0].get("passes_per_step") for side in runs},
            "loss": first["spanflow"]["loss"],
            "seeds": sorted({r["seed"] for r in runs["spanflow"]}),
            "trainer_optim": trainer_optim,
            "data_source": source,
            "train_questions": len(train),
            "val_questions": len(val),
            "dev_questions": len(dev),
            "overrides": overrides,
            "spanflow_overrides": spanflow_overrides,
            "spanflow_levers": levers,
        },
        "checks": {
            "trainable_params": {s: first[s]["trainable_params"] for s in SIDES},
            "trainable_params_match": first["spanflow"]["trainable_params"] == first["trainer"]["trainable_params"],
            "initial_weights_match": first["spanflow"]["trainable_checksum"] == first["trainer"]["trainable_checksum"],
            "optimizer_groups_match": (
                first["spanflow"]["decay_params"] == first["trainer"]["optimizer_decay_params"]
                and first["spanflow"]["no_decay_params"] == first["trainer"]["optimizer_no_decay_params"]
            ),
            "trainer_optimizer": first["trainer"]["optimizer"],
            "trainer_autocast_forward": first["trainer"]["autocast_forward"],
            "steps": {s: [r["steps"] for r in runs[s]] for s in SIDES},
            "epochs": {s: first[s]["epochs"] for s in SIDES},
            "features": {s: first[s]["features"] for s in SIDES},
            "same_features": first["spanflow"]["features_checksum"] == first["trainer"]["features_checksum"],
            "same_batches": all(
                a["batch_order_checksum"] == b["batch_order_checksum"] for a, b in zip(*runs.values(), strict=True)
            ),
            "features_per_question": {s: first[s]["features_per_question"] for s in SIDES},
            "padding_fraction": {s: first[s]["padding_fraction"] for s in SIDES},
        },
        "summary": summary,
        "train_speedup_vs_trainer": ratio("examples_per_s"),
        "questions_speedup_vs_trainer": ratio("questions_per_s"),
        "real_tokens_speedup_vs_trainer": ratio("real_tokens_per_s"),
        "cpu_time_speedup_vs_trainer": ratio("examples_per_cpu_s"),
        "f1_gap_vs_trainer": f1_gap,
        "f1_agree": abs(f1_gap) <= F1_TOLERANCE,
        "f1_gap_interval": [interval.low, interval.high],
        "f1_gap_interval_confidence": interval.confidence,
        "val_f1_gap": sf["val_f1"]["median"] - tr["val_f1"]["median"],
        "f1_gap_per_rep": [round(a["heldout_f1"] - b["heldout_f1"], 2) for a, b in zip(*runs.values(), strict=True)],
        "f1_range_within_side": {
            s: round(summary[s]["heldout_f1"]["max"] - summary[s]["heldout_f1"]["min"], 2) for s in SIDES
        },
        "contended_runs": sum(r["foreign_cpu"] > CONTENDED for s in SIDES for r in runs[s]),
        "runs": runs,
    }


def print_table(res: dict[str, Any]) -> None:
    s, c = res["settings"], res["checks"]
    padding = {k: round(v, 3) for k, v in c["padding_fraction"].items()}
    print(
        f"\n{s['method']} r={s['lora_rank']} chunk={s['chunk_length']}/{s['overlap']} bs={s['batch_size']}"
        f" {s['precision']} threads={s['threads']}, spanflow: length grouping {s['group_by_length']},"
        f" up to {s.get('micro_batches', 1)} length-sorted passes per batch"
        f" (a pass costing {s.get('pass_overhead_tokens', 0)} tokens; passes per step {s.get('passes_per_step')}),"
        f" loss over {s.get('loss', 'real_tokens')};"
        f" {s['steps']} steps x {s['reps']} reps,"
        f" {s['train_questions']} train / {s['val_questions']} val + {s.get('dev_questions', 0)} dev questions scored"
        + (f", spanflow levers {s['spanflow_levers']}" if s["spanflow_levers"] else "")
        + (f", spanflow overrides {s['spanflow_overrides']}" if s["spanflow_overrides"] else "")
    )
    print(
        f"trainable params {c['trainable_params']} (match {c['trainable_params_match']}),"
        f" same initial weights {c['initial_weights_match']}, same AdamW groups {c['optimizer_groups_match']},"
        f" features {c['features']} (same chunks {c['same_features']}, same batches {c['same_batches']}),"
        f" padding fraction {padding}"
    )
    rows = [
        ("examples/s", "examples_per_s", ".2f"),
        ("questions/s", "questions_per_s", ".2f"),
        ("tokens/s (all positions)", "padded_tokens_per_s", ".0f"),
        ("tokens/s (real)", "real_tokens_per_s", ".0f"),
        ("train loop s", "train_seconds", ".1f"),
        ("feature prep s", "prep_seconds", ".2f"),
        ("peak RSS MB (after model load)", "peak_rss_load_mb", ".0f"),
        ("peak RSS MB (after training)", "peak_rss_train_mb", ".0f"),
        ("held-out F1 (val + dev)", "heldout_f1", ".2f"),
        ("held-out EM (val + dev)", "heldout_exact_match", ".2f"),
        ("val F1", "val_f1", ".2f"),
        ("val EM", "val_exact_match", ".2f"),
        ("train loss", "train_loss", ".3f"),
        ("loop CPU s (this process)", "loop_cpu_seconds", ".1f"),
        ("examples per CPU-second", "examples_per_cpu_s", ".2f"),
        ("foreign CPU share in loop", "foreign_cpu", ".2f"),
    ]
    print("| figure | spanflow median (min..max) | Trainer median (min..max) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for label, key, fmt in rows:
        a, b = res["summary"]["spanflow"][key], res["summary"]["trainer"][key]
        cell = [f"{d['median']:{fmt}} ({d['min']:{fmt}}..{d['max']:{fmt}})" for d in (a, b)]
        ratio = a["median"] / b["median"] if b["median"] else float("nan")
        print(f"| {label} | {cell[0]} | {cell[1]} | {ratio:.2f} |")
    verdict = "agree" if res["f1_agree"] else "DISAGREE: speed claim void"
    print(
        f"train_speedup_vs_trainer {res['train_speedup_vs_trainer']:.2f}x (questions/s"
        f" {res['questions_speedup_vs_trainer']:.2f}x, real tokens/s {res['real_tokens_speedup_vs_trainer']:.2f}x);"
        f" f1_gap_vs_trainer {res['f1_gap_vs_trainer']:+.2f} on val + dev ({verdict} within {F1_TOLERANCE} point;"
        f" {round(100 * res['f1_gap_interval_confidence'])}% interval {res['f1_gap_interval'][0]:+.2f}.."
        f"{res['f1_gap_interval'][1]:+.2f}; val only {res['val_f1_gap']:+.2f};"
        f" rep-to-rep F1 range {res['f1_range_within_side']})"
    )
    if res["contended_runs"]:
        print(f"WARNING: {res['contended_runs']} run(s) shared the CPU with other processes; timings are unreliable")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--epochs", type=int, help="train this many epochs of the chunks instead of --steps")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--train-questions", type=int, default=None, help="seeded sample (default: all)")
    parser.add_argument("--val-questions", type=int, default=300, help="seeded sample of the validation split")
    parser.add_argument("--dev-questions", type=int, default=None, help="dev questions also scored (default: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="params override, both sides")
    parser.add_argument("--spanflow-set", action="append", default=[], help="params override, spanflow side only")
    parser.add_argument(
        "--spanflow-lever",
        action="append",
        default=[],
        help="experimental patch of the spanflow side: " + " | ".join([*MODEL_LEVERS, *LOOP_LEVERS]),
    )
    parser.add_argument("--trainer-optim", default="adamw_torch", help="TrainingArguments.optim (adamw_torch = ours)")
    parser.add_argument("--vary-seed", action="store_true", help="rep k trains both sides with train.seed + k")
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:
        res = run_side(args.side, args.steps, args.data_dir, args.overrides, args.trainer_optim, args.spanflow_lever)
        args.result.write_text(json.dumps(res, indent=2))
        return
    res = compare(
        args.steps,
        args.reps,
        args.train_questions,
        args.val_questions,
        args.overrides,
        args.spanflow_set,
        args.trainer_optim,
        args.spanflow_lever,
        args.vary_seed,
        args.epochs,
        args.dev_questions,
    )
    print_table(res)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
