"""One search worker: claim a grid point, train it on a sample of the training split, score it on the
validation split, report each epoch's validation F1 to Optuna (which may prune), and log it all as a
nested MLflow run. The backbone is loaded once per worker and the chunks once per (chunk length,
overlap)."""

from __future__ import annotations

import copy
import os
import socket
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import psutil
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from transformers import set_seed

from spanflow.answering.inference import default_device, resolve_precision
from spanflow.config import Config
from spanflow.data.features import Features, Record, featurize, first_chunks
from spanflow.data.splits import sample_questions, trial_train_records
from spanflow.data.squad import read_jsonl
from spanflow.models.modeling import apply_method, load_backbone, load_tokenizer
from spanflow.models.warm_start import log_trial_weights
from spanflow.paths import PREPARED
from spanflow.search.claims import ClaimBoard
from spanflow.search.grid import GridPoint, grid_space
from spanflow.tracking.runs import setup_mlflow
from spanflow.training.loop import EpochStats, train_model


@dataclass(frozen=True)
class SearchContext:
    """What every worker of one search session needs (picklable, for spawned processes)."""

    cfg: Config
    study_name: str
    storage_url: str
    parent_run_id: str
    todo: tuple[tuple[GridPoint, int], ...]  # (point, attempt number) this session may claim


def worker_id(pid: int | None = None) -> str:
    """host:pid of this process, or of another process on this host."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


def open_storage(url: str, heartbeat_seconds: int) -> optuna.storages.RDBStorage:
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_seconds, grace_period=3 * heartbeat_seconds
        )


def trial_config(cfg: Config, point: GridPoint, num_threads: int | None = None) -> Config:
    """params.yaml with the point's values and the trial budget (epochs, steps) in place."""
    t = cfg.search.trial
    return cfg.with_values(
        {
            **point.config_values(),
            "train.epochs": t.epochs,
            "train.max_steps": t.max_steps,
            "train.select_by": "val_f1",
            "train.num_threads": cfg.train.num_threads or num_threads,
        }
    )


def trial_steps(cfg: Config, train_chunks: int) -> int:
    """The optimizer steps one trial trains: its epochs over the sample, capped by search.trial.max_steps."""
    t, tc = cfg.search.trial, cfg.train
    steps = -(-train_chunks // (tc.batch_size * tc.grad_accum_steps)) * t.epochs
    return min(steps, t.max_steps) if t.max_steps else steps


def rung_steps(cfg: Config, total_steps: int) -> list[int]:
    """Where a trial is scored and may be pruned: min_steps x reduction_factor^k below the trial's budget,
    then the budget itself (a trial at its last step is finished, never pruned)."""
    p = cfg.search.pruner
    steps, step = [], p.min_steps
    while step < total_steps:
        steps.append(step)
        step *= p.reduction_factor
    return [*steps, total_steps]


class _Ticker(threading.Thread):
    """Beats the trial's Optuna heartbeat and samples this process's memory while a trial runs."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, heartbeat_seconds: int) -> None:
        super().__init__(daemon=True)
        self.storage, self.trial_id, self.every = storage, trial_id, heartbeat_seconds
        self.stop_event = threading.Event()
        self.process = psutil.Process()
        self.peak_rss = self.process.memory_info().rss

    def run(self) -> None:
        last_beat = 0.0
        while not self.stop_event.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            if time.monotonic() - last_beat >= self.every:
                self.storage.record_heartbeat(self.trial_id)
                last_beat = time.monotonic()

    def stop(self) -> float:
        self.stop_event.set()
        self.join()
        return self.peak_rss / 2**20


class SearchWorker:
    def __init__(self, ctx: SearchContext, num_threads: int | None = None) -> None:
        self.ctx, self.cfg, self.num_threads = ctx, ctx.cfg, num_threads
        self.worker = worker_id()
        self.storage = open_storage(ctx.storage_url, ctx.cfg.search.heartbeat_seconds)
        self.study = optuna.load_study(study_name=ctx.study_name, storage=self.storage, pruner=make_pruner(ctx.cfg))
        self.study_id = self.storage.get_study_id_from_name(ctx.study_name)
        self.board = ClaimBoard(ctx.storage_url)
        self.space = {k: CategoricalDistribution(v) for k, v in grid_space(ctx.cfg).items()}
        self.tokenizer = load_tokenizer(ctx.cfg.model)
        self._backbone: torch.nn.Module | None = None
        self._chunks: dict[tuple[int, int], tuple[Features, Features]] = {}
        self._records: tuple[list[Record], list[Record]] | None = None
        self.backbone_loads = 0  # both counters go on every trial: proof that the caches hold
        self.featurize_calls = 0

    # --- loaded once per worker -------------------------------------------------------------
    def backbone(self) -> torch.nn.Module:
        if self._backbone is None:
            set_seed(self.cfg.train.seed)  # the QA head starts from the seed
            device = default_device()
            precision = resolve_precision(self.cfg.train.precision, device)
            self._backbone = load_backbone(self.cfg.model, self.cfg.method, precision, device)
            self.backbone_loads += 1
        return self._backbone

    def chunks(self, point: GridPoint) -> tuple[Features, Features, list[Record]]:
        """(train chunks, validation chunks, validation records), shared by points with equal splitting."""
        if self._records is None:
            trial, seed = self.cfg.search.trial, self.cfg.data.seed
            val = sample_questions(read_jsonl(PREPARED / "val.jsonl"), trial.val_questions, seed)
            self._records = (trial_train_records(self.cfg), val)
        train, val = self._records
        key = (point.chunk_length, point.overlap)
        if key not in self._chunks:
            q, n = self.cfg.features.max_query_length, self.cfg.method.virtual_tokens
            train_chunks = featurize(train, self.tokenizer, *key, q, virtual_tokens=n)
            if self.cfg.features.train_contexts == "truncate":
                train_chunks = first_chunks(train_chunks)
            self._chunks[key] = (
                train_chunks,
                featurize(val, self.tokenizer, *key, q, virtual_tokens=n),
            )
            self.featurize_calls += 2
        return *self._chunks[key], val

    # --- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        """Train every point of the session's list that this worker wins; returns how many it ran."""
        setup_mlflow(self.cfg)
        ran = 0
        for k, (point, attempt) in enumerate(self.ctx.todo, start=1):
            if self.board.claim(self.ctx.study_name, point.key, attempt, self.worker):
                print(f"grid point {k} of {len(self.ctx.todo)} to train: {point.key}", flush=True)
                self.run_point(point, attempt)
                ran += 1
        self.board.dispose()
        return ran

    def run_point(self, point: GridPoint, attempt: int) -> None:
        template = create_trial(
            state=TrialState.RUNNING,
            params=point.params(),
            distributions=self.space,
            user_attrs={"point": point.key, "attempt": attempt, "worker": self.worker, "pid": os.getpid()},
        )
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=template)
        self.storage.record_heartbeat(trial_id)
        trial = optuna.trial.Trial(self.study, trial_id)
        self.board.set_trial(self.ctx.study_name, point.key, attempt, trial.number)
        ticker = _Ticker(self.storage, trial_id, self.cfg.search.heartbeat_seconds)
        ticker.start()
        t0 = time.perf_counter()
        run = mlflow.start_run(
            experiment_id=mlflow.get_experiment_by_name(self.cfg.tracking.experiment).experiment_id,
            run_name=f"trial-{trial.number}-{point.key}",
            parent_run_id=self.ctx.parent_run_id,
            tags={"optuna.study": self.ctx.study_name, "optuna.trial": str(trial.number), "search.worker": self.worker},
        )
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        state, value, error = TrialState.FAIL, None, None
        history: list[EpochStats] = []  # filled rung by rung, so a pruned or failed trial keeps its part
        per_question: dict[int, list[float]] = {}  # step -> validation F1 per question, for the paired bootstrap
        try:
            value = self.train_point(point, trial, history, per_question)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except Exception as exc:  # one failed point must not stop the search
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            seconds = time.perf_counter() - t0
            peak = ticker.stop()
            self._finish(trial, state, value, error, history, per_question, seconds, peak, point)

    def train_point(
        self,
        point: GridPoint,
        trial: optuna.trial.Trial,
        history: list[EpochStats],
        per_question: dict[int, list[float]],
    ) -> float:
        """Train and score one point; returns its validation F1 at the end of the trial's budget. At each rung
        the F1 goes to Optuna, whose pruner may stop the trial there."""
        cfg = trial_config(self.cfg, point, self.num_threads)
        train_feats, val_feats, val_records = self.chunks(point)
        total = trial_steps(self.cfg, len(train_feats))
        rungs = rung_steps(self.cfg, total)
        trial.set_user_attr("budget_steps", total)
        set_seed(cfg.train.seed)  # the adapters start from the seed, whatever ran before
        prepared = apply_method(copy.deepcopy(self.backbone()), cfg.method)
        prepared.model.to(default_device())
        mlflow.log_params(
            {
                **point.params(),
                "train_questions": len(self._records[0]),
                "train_chunks": len(train_feats),
                "val_questions": len(val_records),
                "budget_steps": total,
                "rung_steps": ",".join(map(str, rungs)),
                "trainable_params": prepared.trainable_params,
            }
        )
        order = [r["id"] for r in val_records]

        def report(stats: EpochStats, f1_by_question: dict[str, float]) -> None:
            history.append(stats)
            per_question[stats.step] = [round(f1_by_question[q], 2) for q in order]
            metrics = {k: getattr(stats, k) for k in ("val_f1", "val_exact_match", "val_loss", "train_loss")}
            mlflow.log_metrics(metrics, step=stats.step)
            trial.report(stats.val_f1, stats.step)
            if stats.step < total and trial.should_prune():
                print(f"trial {trial.number} {point.key}: pruned at step {stats.step} (val F1 {stats.val_f1:.2f})")
                raise optuna.TrialPruned()

        with tempfile.TemporaryDirectory(prefix="spanflow-trial-") as ckpt:
            pad_id = self.tokenizer.pad_token_id
            train_model(
                prepared, train_feats, val_feats, val_records, cfg, pad_id, Path(ckpt), on_eval=report, eval_steps=rungs
            )
        log_trial_weights(prepared.model)  # the final model may start from the best trial's
        return history[-1].val_f1

    def _finish(
        self,
        trial: optuna.trial.Trial,
        state: TrialState,
        value: float | None,
        error: str | None,
        history: list[EpochStats],
        per_question: dict[int, list[float]],
        seconds: float,
        peak_mb: float,
        point: GridPoint,
    ) -> None:
        """Record the outcome in Optuna (user attrs, state) and close the nested MLflow run."""
        last = history[-1] if history else None
        epoch_seconds = {h.epoch: h.seconds for h in history}  # each epoch's last score: its training time so far
        attrs = {
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_mb, 1),
            "steps_run": last.step if last else 0,
            "train_seconds": round(sum(epoch_seconds.values()), 2),  # training only, validation excluded
            "val_f1_by_step": {str(h.step): h.val_f1 for h in history},
            "val_f1_per_question": {str(k): v for k, v in per_question.items()},
            "val_exact_match": last.val_exact_match if last else None,
            "last_val_f1": last.val_f1 if last else None,
            "worker_backbone_loads": self.backbone_loads,  # so far in this worker process
            "worker_featurize_calls": self.featurize_calls,
        }
        if error:
            attrs["error"] = error
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        mlflow.log_metrics(
            {"trial_wall_seconds": seconds, "trial_peak_rss_mb": peak_mb, "steps_run": attrs["steps_run"]}
        )
        mlflow.set_tag("optuna.state", state.name)
        # a pruned trial was stopped before its budget: KILLED in MLflow's terms, with optuna.state saying why
        mlflow.end_run({TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(state, "FAILED"))
        self.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        shown = f"val F1 {value:.2f}" if value is not None else state.name.lower()
        print(f"trial {trial.number} {point.key}: {shown} in {seconds:.0f}s (worker {self.worker})")


def make_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    """Optuna's pruner over training steps; the rungs (`rung_steps`) are where trials report."""
    p = cfg.search.pruner
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_steps, reduction_factor=p.reduction_factor)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_steps, max_resource=cfg.search.trial.max_steps, reduction_factor=p.reduction_factor
        )
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.min_steps - 1)
    return optuna.pruners.NopPruner()


def worker_main(ctx: SearchContext, num_threads: int | None) -> None:
    """Entry point of a spawned worker process."""
    SearchWorker(ctx, num_threads).run()
