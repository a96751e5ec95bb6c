"""The training loop: mixed precision, gradient accumulation, warm-up + linear decay, early
stopping on validation loss, one checkpoint per epoch that a killed run resumes from."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup, set_seed

from spanflow.answering.inference import PRECISIONS, autocast, pad_batch, resolve_precision, run_model
from spanflow.answering.spans import answer_texts, best_spans
from spanflow.answering.squad_metrics import per_question_scores, score
from spanflow.config import Config, TrainConfig
from spanflow.data.features import Features, Record
from spanflow.models.lora_fused import release_fp32_bases
from spanflow.models.modeling import (
    HEAD_MODULES,
    PreparedModel,
    load_trainable_state,
    takes_token_type_ids,
    trainable_state,
)
from spanflow.models.qa_loss import span_loss
from spanflow.models.soft_prompt import MODULE_NAME as PROMPT_MODULE
from spanflow.models.soft_prompt import virtual_tokens
from spanflow.training.allocator import keeping_heap
from spanflow.training.passes import attention_kernel, length_sorted_passes
from spanflow.training.progress import Progress


@dataclass
class EpochStats:
    epoch: int
    step: int
    train_loss: float
    val_loss: float | None
    val_exact_match: float | None
    val_f1: float | None
    seconds: float


@dataclass
class TrainResult:
    history: list[EpochStats] = field(default_factory=list)
    precision: str = "fp32"
    train_seconds: float = 0.0
    train_examples: int = 0  # chunks seen, over all epochs
    steps: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    step_log: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, lr), every N steps

    @property
    def examples_per_second(self) -> float:
        return self.train_examples / self.train_seconds if self.train_seconds else 0.0


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Shuffled batches of similar-length chunks: shuffle, sort within mega-batches, shuffle batches."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * 50
    batches = []
    for lo in range(0, len(order), mega):
        block = sorted(order[lo : lo + mega], key=lambda i: lengths[i], reverse=True)
        batches += [block[k : k + batch_size] for k in range(0, len(block), batch_size)]
    rng.shuffle(batches)
    yield from batches


def shuffled_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    for lo in range(0, n, batch_size):
        yield order[lo : lo + batch_size]


def epoch_batches(lengths: list[int], tc: TrainConfig, epoch: int) -> list[list[int]]:
    """The chunk indices of each batch of `epoch`, in order: seeded by `train.seed` and the epoch."""
    epoch_seed = tc.seed * 1000 + epoch
    if tc.group_by_length:
        return list(length_grouped_batches(lengths, tc.batch_size, epoch_seed))
    return list(shuffled_batches(len(lengths), tc.batch_size, epoch_seed))


def accumulate_batch(
    model: torch.nn.Module,
    feats: Features,
    idx: list[int],
    pad_id: int,
    tc: TrainConfig,
    device: torch.device,
    precision: str,
    scaler: torch.amp.GradScaler,
) -> float:
    """Forward and backward one batch in up to `tc.micro_batches` length-sorted passes (`spanflow.training.passes`; the
    gradients add up in .grad); returns the batch's loss summed over its chunks."""
    loss_sum = 0.0
    lengths = {i: len(feats.input_ids[i]) for i in idx}
    parts = length_sorted_passes(
        idx, lengths, tc.micro_batches, tc.pad_to_multiple_of, tc.pass_overhead_tokens, tc.max_pass_tokens
    )
    token_types = takes_token_type_ids(model)
    for part in parts:
        padded = pad_batch(feats, part, pad_id, True, tc.pad_to_multiple_of, token_types)
        batch = {key: v.to(device) for key, v in padded.items()}
        starts, ends = batch.pop("start_positions"), batch.pop("end_positions")  # our loss, not the model's
        width = batch["input_ids"].shape[1] + virtual_tokens(model)  # the encoder's width: a soft prompt's too
        with autocast(device, precision), attention_kernel(device, width, tc.math_attention_max_width):
            out = model(**batch)
            loss = span_loss(out.start_logits, out.end_logits, batch["attention_mask"], starts, ends, tc.loss)
        scaler.scale(loss * (len(part) / len(idx) / tc.grad_accum_steps)).backward()
        loss_sum += loss.item() * len(part)
    return loss_sum


def param_groups(model: torch.nn.Module, tc: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (a soft prompt is a row of token vectors, not a matrix: none);
    the QA head (and a layer mix), which start untrained, at `head_lr_ratio` times the learning rate (the scheduler
    scales every group alike)."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ratio = tc.head_lr_ratio if any(h in name for h in HEAD_MODULES) else 1.0
        decay = tc.weight_decay if p.ndim >= 2 and PROMPT_MODULE not in name else 0.0
        groups.setdefault((ratio, decay), []).append(p)
    return [
        {"params": ps, "lr": tc.learning_rate * ratio, "weight_decay": decay} for (ratio, decay), ps in groups.items()
    ]


def run_fingerprint(cfg: Config) -> str:
    """What must not change between a killed run and its resumption."""
    keys = {"model": cfg.model, "features": cfg.features, "method": cfg.method, "train": cfg.train, "data": cfg.data}
    blob = json.dumps({k: asdict(v) for k, v in keys.items()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _answers(records: list[Record], feats: Features, starts, ends, cfg: Config) -> tuple[dict[str, str], str]:
    e = cfg.eval
    answers = best_spans(records, feats, starts, ends, e.max_answer_length, e.n_best, e.span_scoring)
    version = "2.0" if any(r["is_impossible"] for r in records) else "1.1"
    texts = answer_texts(answers, version, e.no_answer_threshold)
    return {r["id"]: t for r, t in zip(records, texts, strict=True)}, version


def score_answers(
    records: list[Record], feats: Features, starts, ends, cfg: Config
) -> tuple[dict[str, float], dict[str, float]]:
    """Official scores of the decoded answers, and question id -> F1 in percent (whose mean is the F1):
    what a paired bootstrap resamples. The spans are decoded once for both."""
    predictions, version = _answers(records, feats, starts, ends, cfg)
    per_question = per_question_scores(records, predictions, version)
    return score(records, predictions, version), {qid: 100.0 * f1 for qid, (_, f1) in per_question.items()}


def selection_score(stats: EpochStats, select_by: str) -> float | None:
    """Higher is better; None keeps the last epoch's weights."""
    if select_by == "last" or stats.val_loss is None:
        return None
    return stats.val_f1 if select_by == "val_f1" else -stats.val_loss


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted(ckpt_dir.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


@keeping_heap  # the allocator keeps what the passes free for the next ones (spanflow.training.allocator)
def train_model(
    prepared: PreparedModel,
    train_feats: Features,
    val_feats: Features,
    val_records: list[Record],
    cfg: Config,
    pad_id: int,
    ckpt_dir: Path,
    resume: bool = False,
    on_epoch: Callable[[EpochStats], None] | None = None,
    on_eval: Callable[[EpochStats, dict[str, float]], None] | None = None,
    eval_steps: Collection[int] | None = None,
    on_log: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train `prepared.model`. With a validation split it is scored at every epoch's end (`on_epoch`) and
    after the optimizer steps in `eval_steps` (default: every `train.eval_every_steps`); `on_eval` gets each
    of these scores with the per-question F1 behind it (the search's pruner watches them). Every
    `train.log_every_steps` optimizer steps `on_log` gets (step, mean training loss since the last call,
    learning rate). A callback may raise to stop the run."""
    tc = cfg.train
    set_seed(tc.seed)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    model = prepared.model
    device = next(model.parameters()).device
    precision = resolve_precision(tc.precision, device)
    if PRECISIONS[precision] is not None:  # LoRA's frozen base resident once, in the compute dtype
        released = release_fp32_bases(model, PRECISIONS[precision])
        if released:
            print(f"frozen LoRA base kept in {precision}: {released / 2**20:.0f} MiB of fp32 pages handed back")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, tc), lr=tc.learning_rate)
    steps_per_epoch = -(-len(train_feats) // (tc.batch_size * tc.grad_accum_steps))
    total_steps = steps_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    result = TrainResult(precision=precision)
    fingerprint = run_fingerprint(cfg)
    best_loss, best_state, bad_epochs, start_epoch = float("inf"), None, 0, 1
    best_score = float("-inf")
    ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if resume and ckpt is None:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
    if ckpt is not None:
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{ckpt}: checkpoint was made with other params; rerun without --resume")
        load_trainable_state(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        result.history = [EpochStats(**h) for h in state["history"]]
        result.train_seconds, result.train_examples, result.steps = (
            state["train_seconds"],
            state["train_examples"],
            state["steps"],
        )
        best_loss, best_state, bad_epochs = state["best_loss"], state["best_state"], state["bad_epochs"]
        best_score = state["best_score"]
        result.best_epoch = state["best_epoch"]
        result.step_log = [tuple(x) for x in state.get("step_log", [])]
        start_epoch = state["epoch"] + 1
        if result.history[-1].val_loss is not None and bad_epochs >= tc.early_stopping_patience:
            start_epoch = tc.epochs + 1  # that run had stopped early: nothing left to train
            result.stopped_early = state["epoch"] < tc.epochs
        print(f"resumed from {ckpt} (epoch {state['epoch']} done)")

    per_question: dict[str, float] = {}

    def validate() -> tuple[float | None, float | None, float | None]:
        if not len(val_feats):
            return None, None, None
        starts, ends, val_loss = run_model(
            model, val_feats, cfg.eval.batch_size, precision, pad_id, with_loss=True, workers=cfg.eval.workers
        )
        metrics, f1_by_question = score_answers(val_records, val_feats, starts, ends, cfg)
        per_question.clear()
        per_question.update(f1_by_question)
        return val_loss, metrics["exact_match"], metrics["f1"]

    def is_eval_step(step: int) -> bool:
        if eval_steps is not None:
            return step in eval_steps
        return bool(tc.eval_every_steps) and step % tc.eval_every_steps == 0

    model.train()
    for epoch in range(start_epoch, tc.epochs + 1):
        if tc.max_steps and result.steps >= tc.max_steps:
            break
        t0 = time.perf_counter()
        batches = epoch_batches(train_feats.lengths(), tc, epoch)
        loss_sum, seen, mid_eval_seconds = 0.0, 0, 0.0  # validation inside the epoch is not training time
        logged_loss, logged_seen = 0.0, 0  # at the last step_log entry
        bar = Progress(batches, f"epoch {epoch}/{tc.epochs}")
        for k, idx in enumerate(bar):
            loss_sum += accumulate_batch(model, train_feats, idx, pad_id, tc, device, precision, scaler)
            seen += len(idx)
            if (k + 1) % tc.grad_accum_steps == 0 or k + 1 == len(batches):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
                if tc.log_every_steps and result.steps % tc.log_every_steps == 0:
                    window = (loss_sum - logged_loss) / max(seen - logged_seen, 1)
                    entry = (result.steps, round(window, 5), scheduler.get_last_lr()[0])
                    result.step_log.append(entry)
                    logged_loss, logged_seen = loss_sum, seen
                    if on_log:
                        on_log(*entry)
                if tc.max_steps and result.steps >= tc.max_steps:
                    break
                if len(val_feats) and is_eval_step(result.steps) and k + 1 < len(batches):
                    v0 = time.perf_counter()
                    val_loss, val_em, val_f1 = validate()
                    mid_eval_seconds += time.perf_counter() - v0
                    elapsed = time.perf_counter() - t0 - mid_eval_seconds  # this epoch's training so far
                    stats = EpochStats(epoch, result.steps, loss_sum / seen, val_loss, val_em, val_f1, elapsed)
                    print(f"step {result.steps}: val F1 {val_f1:.2f}" if val_f1 is not None else f"step {result.steps}")
                    if on_eval:
                        on_eval(stats, per_question)
        bar.close()
        train_time = time.perf_counter() - t0 - mid_eval_seconds
        result.train_seconds += train_time
        result.train_examples += seen

        val_loss, val_em, val_f1 = validate()
        stats = EpochStats(epoch, result.steps, loss_sum / max(seen, 1), val_loss, val_em, val_f1, train_time)
        result.history.append(stats)
        print(
            f"epoch {epoch}: train loss {stats.train_loss:.4f}"
            + (f", val loss {val_loss:.4f}, val EM {val_em:.2f} F1 {val_f1:.2f}" if val_loss is not None else "")
            + f" ({train_time:.0f}s, {seen / train_time:.1f} chunks/s)"
        )
        if on_epoch:
            on_epoch(stats)
        if on_eval and val_f1 is not None:
            on_eval(stats, per_question)

        if val_loss is not None:  # early stopping watches the validation loss
            bad_epochs = 0 if val_loss < best_loss - 1e-4 else bad_epochs + 1
            best_loss = min(best_loss, val_loss)
        score = selection_score(stats, tc.select_by)
        if score is None:  # no validation split, or select_by: last
            best_state, result.best_epoch = None, epoch
        elif score > best_score:
            best_score, best_state, result.best_epoch = score, trainable_state(model), epoch
        _save_checkpoint(
            ckpt_dir / f"epoch-{epoch}.pt",
            {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "trainable": trainable_state(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "history": [asdict(h) for h in result.history],
                "train_seconds": result.train_seconds,
                "train_examples": result.train_examples,
                "steps": result.steps,
                "best_loss": best_loss,
                "best_score": best_score,
                "best_state": best_state,
                "step_log": result.step_log,
                "best_epoch": result.best_epoch,
                "bad_epochs": bad_epochs,
            },
        )
        for old in ckpt_dir.glob("epoch-*.pt"):  # one checkpoint is enough to resume
            if old.stem != f"epoch-{epoch}":
                old.unlink()
        if val_loss is not None and bad_epochs >= tc.early_stopping_patience:
            result.stopped_early = epoch < tc.epochs
            if result.stopped_early:
                print(f"early stopping: no lower validation loss for {bad_epochs} epoch(s)")
            break

    if best_state is not None:
        load_trainable_state(model, best_state)
    return result
