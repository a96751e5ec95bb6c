"""`spanflow ensemble`: registered versions answering together (BERTVision's max-probability ensembling), scored on
the dev questions beside each member alone, and registered as one servable version on request."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from spanflow.answering.bootstrap import paired_bootstrap, question_f1
from spanflow.answering.inference import default_device, load_members, model_answerer, resolve_precision
from spanflow.answering.spans import answer_texts
from spanflow.answering.squad_metrics import score
from spanflow.config import Config
from spanflow.data.features import Record
from spanflow.data.splits import check_prepared
from spanflow.data.squad import read_jsonl
from spanflow.io_utils import atomic_write_json
from spanflow.models.ensemble import ENSEMBLE_RULES, EnsembleQAModel
from spanflow.models.modeling import load_saved_tokenizer
from spanflow.paths import PREPARED, RESULTS
from spanflow.serving.registration import log_pyfunc
from spanflow.tracking.registered_versions import registered_config, registered_files
from spanflow.tracking.runs import git_commit, setup_mlflow

ENSEMBLE_FILE = RESULTS / "ensemble.json"


def ensemble_stage(cfg: Config, versions: list[int], rule: str = "max", register: bool = False) -> dict:
    """Answer the prepared dev questions with each version alone and with the versions together by every rule
    (all with the first version's chunking and decoding); the paired bootstrap of each rule against the best
    member; with `register`, the ensemble by `rule` becomes a new version of the registered model."""
    if len(versions) < 2 or len(set(versions)) != len(versions):
        raise ValueError(f"ensemble: give two or more different versions, got {versions}")
    if rule not in ENSEMBLE_RULES:
        raise ValueError(f"ensemble --rule {rule!r}: use one of {', '.join(ENSEMBLE_RULES)}")
    squad_version = check_prepared(cfg)["dev"]["squad_version"]
    records = read_jsonl(PREPARED / "dev.jsonl")
    setup_mlflow(cfg)
    name = cfg.registry.model_name
    device = default_device()
    precision = resolve_precision(cfg.train.precision, device)
    with tempfile.TemporaryDirectory() as tmp:
        members = [registered_files(name, v, Path(tmp) / f"v{v}") for v in versions]
        if any(settings.get("ensemble_rule") for _, settings in members):
            raise ValueError("ensemble: a member is an ensemble itself; name its members instead")
        dirs = [model_dirs[0] for model_dirs, _ in members]
        models = load_members(dirs, precision, device)
        own = registered_config(cfg, members[0][1])
        tokenizer = load_saved_tokenizer(dirs[0])
        candidates = {f"v{v}": m for v, m in zip(versions, models, strict=True)}
        candidates |= {r: EnsembleQAModel(models, r) for r in ENSEMBLE_RULES}
        scores, f1s = {}, {}
        for label, model in candidates.items():
            _, scores[label], f1s[label] = answer_and_score(own, model, tokenizer, precision, records, squad_version)
            print(f"{label}: EM {scores[label]['exact_match']:.2f} F1 {scores[label]['f1']:.2f}")
        best = max((f"v{v}" for v in versions), key=lambda k: scores[k]["f1"])
        gate = cfg.registry
        against_best = {
            r: paired_bootstrap(f1s[r], f1s[best], gate.bootstrap_resamples, gate.confidence, gate.seed)
            for r in ENSEMBLE_RULES
        }
        out = {
            "versions": versions,
            "rule": rule,
            "dev_questions": len(records),
            "squad_version": squad_version,
            "chunking_of": f"v{versions[0]}",
            "scores": {k: {"exact_match": s["exact_match"], "f1": s["f1"]} for k, s in scores.items()},
            "best_member": best,
            "gain_over_best_member": {r: b.to_dict() for r, b in against_best.items()},
        }
        with mlflow.start_run(run_name=f"ensemble-{'-'.join(f'v{v}' for v in versions)}") as run:
            mlflow.set_tags({"ensemble.versions": ",".join(map(str, versions)), "git_commit": git_commit()})
            mlflow.log_params({"ensemble.rule": rule, "ensemble.versions": ",".join(map(str, versions))})
            mlflow.log_metrics({f"dev_f1_{k}": s["f1"] for k, s in scores.items()})
            mlflow.log_metrics({f"dev_exact_match_{k}": s["exact_match"] for k, s in scores.items()})
        out["mlflow_run_id"] = run.info.run_id
        if register:  # after the run closed: logging the model reopens it
            out["registered_version"] = _register(cfg, run.info.run_id, dirs, members[0][1], versions, rule)
            tags = {
                "dev_f1": scores[rule]["f1"],
                "dev_exact_match": scores[rule]["exact_match"],
                "dev_questions": len(records),
                "squad_version": squad_version,
                "ensemble.versions": ",".join(map(str, versions)),
                "ensemble.rule": rule,
            }
            client = MlflowClient()
            for key, value in tags.items():
                client.set_model_version_tag(name, str(out["registered_version"]), key, str(value))
    atomic_write_json(ENSEMBLE_FILE, out)
    for r, b in against_best.items():
        print(
            f"{r} vs {best}: {b.mean_gain:+.2f} F1 ({100 * b.confidence:.0f}% interval {b.low:+.2f} .. {b.high:+.2f})"
        )
    return out


def answer_and_score(
    cfg: Config, model: torch.nn.Module, tokenizer, precision: str, records: list[Record], squad_version: str
) -> tuple[dict[str, str], dict, np.ndarray]:
    """`model`'s answers to `records` by the chunking and decoding of `cfg`: id -> text, the official scores, and
    every question's F1 (0-100) in the order of `records`."""
    answers = model_answerer(cfg, model, tokenizer, precision)(records)
    texts = answer_texts(answers, squad_version, cfg.eval.no_answer_threshold)
    predictions = {r["id"]: t for r, t in zip(records, texts, strict=True)}
    return predictions, score(records, predictions, squad_version), question_f1(records, predictions, squad_version)


def _register(cfg: Config, run_id: str, dirs: list[Path], settings: dict, versions: list[int], rule: str) -> int:
    """The members' model directories as one pyfunc that answers with all of them (torch, fp32 or bf16)."""
    artifacts = {"model_dir": str(dirs[0])} | {f"model_dir_{k}": str(d) for k, d in enumerate(dirs[1:], start=1)}
    own = {
        **settings,
        "runtime": "torch",
        "ensemble_rule": rule,
        "ensemble_members": len(dirs),
        "ensemble_versions": versions,
    }
    version = log_pyfunc(cfg, run_id, artifacts, own)
    print(f"registered {cfg.registry.model_name} version {version}: the ensemble of {versions} by {rule}")
    return version


ensemble_task = task(ensemble_stage, name="ensemble", cache_policy=NO_CACHE)
