"""spanflow's chunked inference against the `question-answering` pipeline of transformers 5.2.0.

    .venv/bin/python -m benchmarks.infer_compare [--questions N] [--reps R] [--precision bf16 fp32]
        [--threads T] [--pipeline-batch-size 1] [--stages] [--json out.json]

Same weights (models/final/hf, LoRA merged by the train stage), same dev questions, same chunking
(features.chunk_length = the pipeline's max_seq_len, features.overlap = its doc_stride) and answer
length, and the same precision: for each precision of --precision, spanflow and the pipeline both hold
the weights in that dtype (bf16 or fp32; the pipeline through its `dtype=` argument). Each side runs in its
own process, with the same torch / tokenizer thread count: spanflow in this venv, the pipeline in
benchmarks/.venv-tf52 (transformers 5.2.0, the last release with the pipeline; made on first use by
`ensure_tf52_venv`). Sides alternate rep by rep; model loading and a small warm-up are not timed. Reports
questions/s per side (median, min-max over reps), the ratio at equal precision (the headline:
`inference_speedup_vs_pipeline_equal_precision`, at the first precision), the official SQuAD EM/F1 of both
sides and their gaps, how often the answers differ, each side's peak RSS, and, where bf16 and fp32 both
ran, the mixed-precision gain of each side on its own (`mixed_precision_speedup`: spanflow bf16 / spanflow
fp32). spanflow answers with `eval.span_scoring`; its first rep also decodes the same logits with every rule
of spanflow/answering/spans.py, so the gaps are given per rule too (`chunk_softmax` is the pipeline's own
rule: what is left is the inference, not the decoding). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spanflow.answering.onnx_runtime import RUNTIMES
from spanflow.answering.spans import DEFAULT_SPAN_SCORING, SPAN_SCORINGS
from spanflow.training.memory import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TF52_VENV = BENCH / ".venv-tf52"
TF52_REQUIREMENTS = BENCH / "requirements-tf52.txt"
PIPELINE_SIDE = BENCH / "pipeline_side.py"
MODEL_DIR = ROOT / "models" / "final" / "hf"
DEV_FILE = ROOT / "data" / "prepared" / "dev.jsonl"
VERSION_FILE = ROOT / "data" / "prepared" / "version.json"
WARMUP_RECORDS = 3
EXAMPLES = 8  # differing answers shown in the result
PIPELINE_DTYPES = ("bf16", "fp32")  # what benchmarks/pipeline_side.py --dtype takes

_VERIFY_TF52 = """
import sys, inspect, torch, transformers
from transformers import pipeline
from transformers.pipelines import SUPPORTED_TASKS, QuestionAnsweringPipeline
assert transformers.__version__ == sys.argv[1], transformers.__version__
assert "question-answering" in SUPPORTED_TASKS
assert "max_seq_len" in inspect.signature(QuestionAnsweringPipeline._sanitize_parameters).parameters
print(f"transformers {transformers.__version__}, torch {torch.__version__}: question-answering pipeline ok")
"""


# --------------------------------------------------------------------------- the transformers 5.2.0 venv


def _pins(requirements: Path) -> dict[str, str]:
    """name -> the pinned `name==version` lines of a requirements file."""
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pins[line.split("==", 1)[0].strip().lower()] = line
    return pins


def ensure_tf52_venv(
    venv: Path = TF52_VENV, requirements: Path = TF52_REQUIREMENTS, python: str = "python3.11", quiet: bool = True
) -> Path:
    """The Python of a venv with transformers 5.2.0 and its question-answering pipeline; made if missing.

    Reused as is when its stamp file holds the hash of `requirements`; otherwise (re)made with
    `venv --clear`: the torch pin first on its own (a bare torch requirement with no torch installed
    pulls the CUDA build), then all of `requirements`, then `pip check` and an import check."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / ".installed"
    py = venv / "bin" / "python"
    if py.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return py
    pins = _pins(requirements)
    if "torch" not in pins or "transformers" not in pins:
        raise ValueError(f"{requirements}: needs torch==... and transformers==... pins")
    print(f"making {venv} from {requirements.name} (torch first) ...", file=sys.stderr)
    q = ["--quiet"] if quiet else []
    subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", *q, pins["torch"]], check=True)
    subprocess.run([str(py), "-m", "pip", "install", *q, "-r", str(requirements)], check=True)
    subprocess.run([str(py), "-m", "pip", "check"], check=True)
    version = pins["transformers"].split("==", 1)[1]
    subprocess.run([str(py), "-c", _VERIFY_TF52, version], check=True)
    stamp.write_text(digest + "\n")
    return py


# --------------------------------------------------------------------------- the spanflow side (a child process)


def spanflow_side(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model as spanflow/answering/inference.py::predict_records does, warm up, time answer_questions +
    answer_texts over all records; with `stages`, one more pass timed stage by stage."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from spanflow.answering.inference import (
        answer_questions,
        default_device,
        load_answering_model,
        resolve_precision,
        run_model,
    )
    from spanflow.answering.spans import answer_texts, best_spans
    from spanflow.data.features import featurize
    from spanflow.data.squad import read_jsonl

    if args.threads:
        torch.set_num_threads(args.threads)
    records = read_jsonl(args.records)
    device = default_device()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    # as the evaluate stage and the served model load it; an ONNX export is made (or found in models/onnx) untimed
    model, precision = load_answering_model(
        args.model_dir,
        args.runtime,
        resolve_precision(args.precision, device),
        device,
        args.workers,
        json.loads(args.int8_skip_modules),
    )
    feat_args = (args.chunk_length, args.overlap, args.max_query_length)

    def answer(recs: list[dict]) -> list[str]:
        answers = answer_questions(
            model,
            tokenizer,
            recs,
            *feat_args,
            args.max_answer_length,
            args.n_best,
            args.batch_size,
            precision,
            args.workers,
            args.span_scoring,
        )
        return answer_texts(answers, args.squad_version, args.no_answer_threshold)

    answer(records[:WARMUP_RECORDS])
    t0 = time.perf_counter()
    texts = answer(records)
    seconds = time.perf_counter() - t0

    result: dict[str, Any] = {
        "predictions": {r["id"]: t for r, t in zip(records, texts, strict=True)},
        "seconds": seconds,
        "questions": len(records),
        "questions_per_second": len(records) / seconds,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "runtime": args.runtime,
        "device": str(device),
    }
    if args.stages or args.by_scoring:  # the three steps of answer_questions, one by one
        t = [time.perf_counter()]
        feats = featurize(records, tokenizer, *feat_args)
        t.append(time.perf_counter())
        starts, ends, _ = run_model(
            model, feats, args.batch_size, precision, tokenizer.pad_token_id, workers=args.workers
        )
        t.append(time.perf_counter())
        best_spans(records, feats, starts, ends, args.max_answer_length, args.n_best, args.span_scoring)
        t.append(time.perf_counter())
        if args.stages:
            result["chunks"] = len(feats)
            result["stage_seconds"] = {
                "featurize": t[1] - t[0],
                "model_forward": t[2] - t[1],
                "span_decoding": t[3] - t[2],
            }
        if args.by_scoring:  # the same logits, decoded by every rule
            result["predictions_by_scoring"] = {}
            for rule in SPAN_SCORINGS:
                answers = best_spans(records, feats, starts, ends, args.max_answer_length, args.n_best, rule)
                texts = answer_texts(answers, args.squad_version, args.no_answer_threshold)
                result["predictions_by_scoring"][rule] = {r["id"]: x for r, x in zip(records, texts, strict=True)}
    result["peak_rss_mb"] = peak_rss_mb()
    args.out.write_text(json.dumps(result, ensure_ascii=False))
    return result


# --------------------------------------------------------------------------- the comparison (the parent process)


def _child_env(threads: int) -> dict[str, str]:
    """The same thread count for torch (OpenMP) and the tokenizers' Rust pool on both sides."""
    env = dict(os.environ)
    n = str(threads)
    env.update(
        OMP_NUM_THREADS=n,
        MKL_NUM_THREADS=n,
        RAYON_NUM_THREADS=n,
        RAYON_RS_NUM_CPUS=n,
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        TOKENIZERS_PARALLELISM="true",
    )
    return env


def wait_for_idle(max_load: float | None, timeout: float) -> float:
    """Wait until the 1-minute load average is below `max_load` (None: don't wait), at most `timeout`
    seconds; return the load average when starting."""
    t0 = time.monotonic()
    while max_load is not None and os.getloadavg()[0] >= max_load and time.monotonic() - t0 < timeout:
        time.sleep(5)
    return os.getloadavg()[0]


def _run_child(command: list[str], out: Path, env: dict[str, str], log: Path, idle: tuple) -> dict[str, Any]:
    out.unlink(missing_ok=True)
    load = wait_for_idle(*idle)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... exited with {proc.returncode}:\n{tail}")
    result = json.loads(out.read_text())
    result["process_seconds"] = wall
    result["load_average_1min"] = [load, os.getloadavg()[0]]
    return result


def _spread(values: list[float]) -> dict[str, Any]:
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread_pct": 100 * (max(values) - min(values)) / med if med else 0.0,
        "reps": values,
    }


def _disagreements(
    records: list[dict], ours: dict[str, str], theirs: dict[str, str], version: str, gate: Any
) -> dict[str, Any]:
    """How the two sides' answers differ, per question, and the paired-bootstrap interval of each gap with the
    promotion gate's settings (`gate`: params.yaml's `registry`): a gap whose interval holds 0 is within what
    resampling the questions moves it by."""
    import numpy as np

    from spanflow.answering.bootstrap import paired_bootstrap
    from spanflow.answering.squad_metrics import normalize_answer, per_question_scores

    s_scores = per_question_scores(records, ours, version)
    p_scores = per_question_scores(records, theirs, version)
    differ = [r for r in records if ours[r["id"]] != theirs[r["id"]]]
    kinds = {"normalized_equal": 0, "pipeline_longer": 0, "spanflow_longer": 0, "overlapping_or_disjoint": 0}
    for r in differ:
        a, b = ours[r["id"]], theirs[r["id"]]
        if normalize_answer(a) == normalize_answer(b):
            kinds["normalized_equal"] += 1
        elif a in b:
            kinds["pipeline_longer"] += 1
        elif b in a:
            kinds["spanflow_longer"] += 1
        else:
            kinds["overlapping_or_disjoint"] += 1
    ids = [r["id"] for r in records]
    intervals: dict[str, Any] = {"gap_interval_confidence": gate.confidence}
    for k, metric in enumerate(("em", "f1")):
        ours_k, theirs_k = (np.array([100 * scores[i][k] for i in ids]) for scores in (s_scores, p_scores))
        ci = paired_bootstrap(ours_k, theirs_k, gate.bootstrap_resamples, gate.confidence, gate.seed)
        intervals[f"{metric}_gap_interval"] = [ci.low, ci.high]
    return {
        **intervals,
        "answers_differ": len(differ),
        "answers_differ_pct": 100 * len(differ) / len(records),
        "kinds": kinds,
        "spanflow_f1_better": sum(s_scores[r["id"]][1] > p_scores[r["id"]][1] for r in differ),
        "pipeline_f1_better": sum(s_scores[r["id"]][1] < p_scores[r["id"]][1] for r in differ),
        "examples": [
            {
                "id": r["id"],
                "question": r["question"],
                "gold": r["answers"]["text"][:3],
                "spanflow": ours[r["id"]],
                "pipeline": theirs[r["id"]],
            }
            for r in differ[:EXAMPLES]
        ],
    }


def _gaps_by_scoring(
    records: list[dict],
    by_rule: dict[str, dict[str, str]],
    pipe: dict,
    pipe_preds: dict[str, str],
    version: str,
    gate: Any,
) -> dict[str, Any]:
    """EM / F1 gaps to the pipeline, their intervals and how many answers differ, per span-scoring rule of
    spanflow (the same logits, decoded by each rule)."""
    from spanflow.answering.squad_metrics import score

    out = {}
    for rule, preds in by_rule.items():
        sc = score(records, preds, version)
        d = _disagreements(records, preds, pipe_preds, version, gate)
        out[rule] = {
            "exact_match": sc["exact_match"],
            "f1": sc["f1"],
            "em_gap_vs_pipeline": sc["exact_match"] - pipe["exact_match"],
            "f1_gap_vs_pipeline": sc["f1"] - pipe["f1"],
            "em_gap_interval": d["em_gap_interval"],
            "f1_gap_interval": d["f1_gap_interval"],
            "answers_differ": d["answers_differ"],
        }
    return out


def compare(
    questions: int | None = None,
    reps: int = 3,
    precisions: list[str] | None = None,
    threads: int | None = None,
    pipeline_batch_size: int = 1,
    stages: bool = False,
    model_dir: Path = MODEL_DIR,
    params: Path = ROOT / "params.yaml",
    keep: Path | None = None,
    max_load: float | None = None,
    max_wait: float = 600,
    runtimes: list[str] | None = None,
) -> dict[str, Any]:
    """Run both sides `reps` times at each precision, alternating (spanflow, then the pipeline with its
    weights in the same dtype, precision by precision), then spanflow with each ONNX Runtime path of
    `runtimes` (onnx, onnx_int8: fp32 on the CPU, int8 Linears), and return every figure. `precisions`: "config"
    (train.precision of params.yaml, resolved for this machine), "bf16", "fp32"; the first one gives the
    headline ratio and gaps. With `max_load`, each child waits (at most `max_wait` s) for the 1-minute
    load average to fall below it: other work on the machine slows the pipeline's batch-1 forwards far
    more than spanflow's batches."""
    import torch

    from spanflow.answering.inference import default_device, resolve_precision
    from spanflow.config import load_config
    from spanflow.data.squad import read_jsonl
    from spanflow.search.best_params import final_config

    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise SystemExit(f"{model_dir}: no trained model (config.json + model.safetensors); run `make run` first")
    for f in (DEV_FILE, VERSION_FILE):
        if not f.is_file():
            raise SystemExit(f"{f}: missing; run the prepare stage first")
    cfg = final_config(load_config(params))
    version = json.loads(VERSION_FILE.read_text())["dev"]["squad_version"]
    records = read_jsonl(DEV_FILE)[:questions]
    threads = threads or cfg.train.num_threads or torch.get_num_threads()
    device = default_device()
    resolved = []
    for p in precisions or ["config"]:
        p = resolve_precision(cfg.train.precision if p == "config" else p, device)
        if p not in PIPELINE_DTYPES:
            raise SystemExit(f"precision {p}: the pipeline side runs on the CPU in {' or '.join(PIPELINE_DTYPES)}")
        if p not in resolved:
            resolved.append(p)
    f, e = cfg.features, cfg.eval
    settings = {
        "chunk_length": f.chunk_length,
        "overlap": f.overlap,
        "max_query_length": f.max_query_length,
        "max_answer_length": e.max_answer_length,
        "n_best": e.n_best,
        "span_scoring": e.span_scoring,
        "spanflow_batch_size": e.batch_size,
        "spanflow_workers": e.workers,
        "pipeline_batch_size": pipeline_batch_size,
    }
    tf52_python = ensure_tf52_venv()

    with tempfile.TemporaryDirectory(prefix="infer_compare_") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        records_file = work / "records.jsonl"
        with open(records_file, "w", encoding="utf-8") as fh:
            for r in records:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        env = _child_env(threads)
        common = ["--model-dir", str(model_dir), "--records", str(records_file), "--threads", str(threads)]

        def pipeline_cmd(precision: str) -> list[str]:  # its weights in the dtype of spanflow's side
            return [
                str(tf52_python),
                str(PIPELINE_SIDE),
                *common,
                *("--max-seq-len", str(f.chunk_length), "--doc-stride", str(f.overlap)),
                *("--max-answer-len", str(e.max_answer_length), "--max-question-len", str(f.max_query_length)),
                *("--batch-size", str(pipeline_batch_size), "--dtype", precision),
                *("--out", str(work / f"pipeline-{precision}.json")),
            ]

        def spanflow_cmd(precision: str, first: bool, runtime: str = "torch") -> list[str]:
            out = work / f"spanflow-{precision}-{runtime}.json"
            return [
                sys.executable,
                "-m",
                "benchmarks.infer_compare",
                "--side",
                "spanflow",
                *common,
                *("--precision", precision, "--chunk-length", str(f.chunk_length), "--overlap", str(f.overlap)),
                *("--max-query-length", str(f.max_query_length), "--max-answer-length", str(e.max_answer_length)),
                *("--n-best", str(e.n_best), "--batch-size", str(e.batch_size), "--squad-version", version),
                *("--workers", str(e.workers), "--span-scoring", e.span_scoring),
                *("--no-answer-threshold", str(e.no_answer_threshold), "--out", str(out)),
                *("--runtime", runtime, "--int8-skip-modules", json.dumps(e.int8_skip_modules)),
                *(["--stages"] if stages and first else []),
                *(["--by-scoring"] if first and runtime == "torch" else []),
            ]

        ours: dict[str, list[dict[str, Any]]] = {p: [] for p in resolved}
        theirs: dict[str, list[dict[str, Any]]] = {p: [] for p in resolved}
        onnx: dict[str, list[dict[str, Any]]] = {r: [] for r in runtimes or [] if r != "torch"}
        load_before = os.getloadavg()[0]
        idle = (max_load, max_wait)
        for rep in range(reps):
            for p in resolved:
                r = _run_child(spanflow_cmd(p, rep == 0), work / f"spanflow-{p}-torch.json", env, work / "log", idle)
                ours[p].append(r)
                print(f"rep {rep + 1}/{reps} spanflow {p}: {r['questions_per_second']:.2f} q/s", file=sys.stderr)
                r = _run_child(pipeline_cmd(p), work / f"pipeline-{p}.json", env, work / "log", idle)
                theirs[p].append(r)
                print(f"rep {rep + 1}/{reps} pipeline {p}: {r['questions_per_second']:.2f} q/s", file=sys.stderr)
            for rt in onnx:
                out = work / f"spanflow-fp32-{rt}.json"
                r = _run_child(spanflow_cmd("fp32", False, rt), out, env, work / "log", idle)
                onnx[rt].append(r)
                print(f"rep {rep + 1}/{reps} spanflow {rt}: {r['questions_per_second']:.2f} q/s", file=sys.stderr)
        load_after = os.getloadavg()[0]

    meta = {
        "questions": len(records),
        "reps": reps,
        "threads": threads,
        "squad_version": version,
        "model_dir": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "settings": settings,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before, load_after],  # other work on the machine skews the timings
    }
    return summarize(records, version, cfg.registry, ours, theirs, meta, onnx)


def _side_summary(side_runs: list[dict[str, Any]], records: list[dict], version: str) -> dict[str, Any]:
    """One side at one precision over its reps: speed (median, range), EM/F1 of its first rep's answers."""
    from spanflow.answering.squad_metrics import score

    first = side_runs[0]
    preds = first["predictions"]
    scores = score(records, preds, version)
    out = {
        "questions_per_second": _spread([r["questions_per_second"] for r in side_runs]),
        "ms_per_question": statistics.median(1000 * r["seconds"] / r["questions"] for r in side_runs),
        "load_average_1min_per_rep": [r["load_average_1min"] for r in side_runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in side_runs),
        "exact_match": scores["exact_match"],
        "f1": scores["f1"],
        "predictions_stable": all(r["predictions"] == preds for r in side_runs),
        "transformers": first["transformers"],
        "torch": first["torch"],
        "threads": first["threads"],
    }
    for k in ("precision", "dtype", "chunks", "stage_seconds"):
        if k in first:
            out[k] = first[k]
    return out


def _median_qps(side_runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["questions_per_second"] for r in side_runs)


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """The questions/s ratio of two sides rep by rep (rep k of each ran one after the other)."""
    return _spread([x["questions_per_second"] / y["questions_per_second"] for x, y in zip(a, b, strict=True)])


def summarize(
    records: list[dict],
    version: str,
    gate: Any,
    ours: dict[str, list[dict[str, Any]]],
    theirs: dict[str, list[dict[str, Any]]],
    meta: dict[str, Any] | None = None,
    onnx: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Every figure from the children's results. `ours[p]` / `theirs[p]`: spanflow's / the pipeline's reps at
    precision p (both sides' weights in p's dtype), in the order the precisions were asked for; `gate`: the
    paired bootstrap's settings (params.yaml's `registry`).

    For each precision p, spanflow against the pipeline at p: `inference_speedup_vs_pipeline_equal_precision_<p>`,
    `f1_gap_vs_pipeline_<p>`, `em_gap_vs_pipeline_<p>`, ...; the first precision's figures also without the
    suffix (the headline). Where bf16 and fp32 both ran, the mixed-precision gain of each side on its own:
    `mixed_precision_speedup` (spanflow bf16 / spanflow fp32 questions/s) and `pipeline_mixed_precision_speedup`,
    with the EM/F1 each loses or gains by it. `inference_speedup_vs_pipeline_fp32_default`: spanflow at the first
    precision against the pipeline in fp32, the dtype it loads in unless told (the figure earlier rounds headlined,
    for comparison only). `onnx[r]`: spanflow's reps with ONNX Runtime path r, each against spanflow's torch fp32
    and the pipeline's fp32 where those ran: `<r>_speedup_vs_torch_fp32`, `<r>_f1_change_vs_torch_fp32`, ...."""
    result: dict[str, Any] = {**(meta or {}), "equal_precision": True, "pipeline": {}, "spanflow": {}}
    for i, p in enumerate(ours):
        side = _side_summary(ours[p], records, version)
        pipe = result["pipeline"][p] = _side_summary(theirs[p], records, version)
        pipe_preds = theirs[p][0]["predictions"]
        gaps = {
            "inference_speedup_vs_pipeline_equal_precision": _median_qps(ours[p]) / _median_qps(theirs[p]),
            "inference_speedup_vs_pipeline_equal_precision_paired": _paired(ours[p], theirs[p]),
            "f1_gap_vs_pipeline": side["f1"] - pipe["f1"],
            "em_gap_vs_pipeline": side["exact_match"] - pipe["exact_match"],
            "rss_ratio_vs_pipeline": side["peak_rss_mb"] / pipe["peak_rss_mb"],
        }
        differ = _disagreements(records, ours[p][0]["predictions"], pipe_preds, version, gate)
        by_rule = ours[p][0].get("predictions_by_scoring", {})
        by_scoring = _gaps_by_scoring(records, by_rule, pipe, pipe_preds, version, gate)
        side["vs_pipeline"] = gaps | {"disagreement": differ, "by_span_scoring": by_scoring}
        result["spanflow"][p] = side
        flat = gaps | {
            f"{k}_{rule}": g[k] for rule, g in by_scoring.items() for k in ("em_gap_vs_pipeline", "f1_gap_vs_pipeline")
        }
        for k, v in flat.items():
            value = v["median"] if isinstance(v, dict) else v
            result[f"{k}_{p}"] = value
            if i == 0:
                result[k] = value
        if i == 0:
            result["precision"] = p
    if "bf16" in ours and "fp32" in ours:  # the mixed-precision gain: each side against itself
        for prefix, runs, sides in (("", ours, result["spanflow"]), ("pipeline_", theirs, result["pipeline"])):
            result[f"{prefix}mixed_precision_speedup"] = _median_qps(runs["bf16"]) / _median_qps(runs["fp32"])
            result[f"{prefix}mixed_precision_speedup_paired"] = _paired(runs["bf16"], runs["fp32"])["median"]
            result[f"{prefix}mixed_precision_f1_change"] = sides["bf16"]["f1"] - sides["fp32"]["f1"]
            result[f"{prefix}mixed_precision_em_change"] = sides["bf16"]["exact_match"] - sides["fp32"]["exact_match"]
    if "fp32" in theirs:
        result["inference_speedup_vs_pipeline_fp32_default"] = _median_qps(ours[result["precision"]]) / _median_qps(
            theirs["fp32"]
        )
    if onnx:
        result["onnx_runtime"] = {}
    for rt, runs in (onnx or {}).items():
        side = result["onnx_runtime"][rt] = _side_summary(runs, records, version)
        for name, against in (("torch_fp32", ours.get("fp32")), ("pipeline_fp32", theirs.get("fp32"))):
            if not against:
                continue
            other = _side_summary(against, records, version)
            figures = {
                f"{rt}_speedup_vs_{name}": _median_qps(runs) / _median_qps(against),
                f"{rt}_f1_change_vs_{name}": side["f1"] - other["f1"],
                f"{rt}_em_change_vs_{name}": side["exact_match"] - other["exact_match"],
            }
            side.update(figures)
            result.update(figures)
    return result


def print_table(result: dict[str, Any]) -> None:
    """A short human-readable summary of `compare`'s result (and of the results.json of earlier rounds, whose
    pipeline ran in fp32 only)."""
    equal = result.get("equal_precision", False)
    pipes = result["pipeline"] if equal else {result["pipeline"].get("dtype", "fp32"): result["pipeline"]}
    print(
        f"\n{result['questions']} dev questions (SQuAD v{result['squad_version']}), {result['reps']} reps, "
        f"{result['threads']} threads, chunk {result['settings']['chunk_length']} / overlap "
        f"{result['settings']['overlap']}, load average {result['load_average_1min'][0]:.1f} -> "
        f"{result['load_average_1min'][1]:.1f} on {result['cpu_count']} CPUs"
    )
    header = f"{'side':<34} {'q/s median':>10} {'min-max':>15} {'ms/q':>8} {'EM':>7} {'F1':>7} {'RSS MB':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for p, s in result["spanflow"].items():
        rows.append((f"spanflow {p} (tf {s['transformers']})", s))
        if equal:
            rows.append((f"pipeline {p} (tf {pipes[p]['transformers']})", pipes[p]))
    if not equal:
        rows += [(f"pipeline {dtype} (tf {s['transformers']})", s) for dtype, s in pipes.items()]
    for name, s in rows:
        q = s["questions_per_second"]
        print(
            f"{name:<34} {q['median']:>10.2f} {q['min']:>7.2f}-{q['max']:<7.2f} {s['ms_per_question']:>8.1f} "
            f"{s['exact_match']:>7.2f} {s['f1']:>7.2f} {s['peak_rss_mb']:>8.0f}"
        )
    for name, s in rows:
        reps = " ".join(
            f"{q:.2f}@{load[0]:.1f}"
            for q, load in zip(s["questions_per_second"]["reps"], s["load_average_1min_per_rep"], strict=True)
        )
        print(f"  {name}: q/s@load per rep: {reps}")
    for p, s in result["spanflow"].items():
        v = s["vs_pipeline"]
        d = v["disagreement"]
        if equal:
            against, ratio = f"pipeline {p} (equal precision)", v["inference_speedup_vs_pipeline_equal_precision"]
            paired = v["inference_speedup_vs_pipeline_equal_precision_paired"]
        else:
            against, ratio = f"pipeline {next(iter(pipes))}", v["inference_speedup_vs_pipeline"]
            paired = v["inference_speedup_vs_pipeline_paired"]
        (f1_lo, f1_hi), (em_lo, em_hi) = d["f1_gap_interval"], d["em_gap_interval"]
        print(
            f"spanflow {p} vs {against}: speed-up x{ratio:.2f} "
            f"(paired reps {paired['min']:.2f}-{paired['max']:.2f}), F1 {v['f1_gap_vs_pipeline']:+.2f}, "
            f"EM {v['em_gap_vs_pipeline']:+.2f} ({round(100 * d['gap_interval_confidence'])}% intervals: "
            f"F1 {f1_lo:+.2f}..{f1_hi:+.2f}, EM {em_lo:+.2f}..{em_hi:+.2f}), "
            f"answers differ on {d['answers_differ']} "
            f"({d['answers_differ_pct']:.1f}%) {d['kinds']}"
        )
        for rule, g in v.get("by_span_scoring", {}).items():  # results.json of earlier rounds lack it
            (f1_lo, f1_hi), (em_lo, em_hi) = g["f1_gap_interval"], g["em_gap_interval"]
            print(
                f"  same logits, span scoring {rule}: EM {g['exact_match']:.2f} ({g['em_gap_vs_pipeline']:+.2f}, "
                f"{em_lo:+.2f}..{em_hi:+.2f}), F1 {g['f1']:.2f} ({g['f1_gap_vs_pipeline']:+.2f}, "
                f"{f1_lo:+.2f}..{f1_hi:+.2f}), answers differ on {g['answers_differ']}"
            )
        if "stage_seconds" in s:
            total = sum(s["stage_seconds"].values())
            parts = ", ".join(f"{k} {t:.2f}s ({100 * t / total:.0f}%)" for k, t in s["stage_seconds"].items())
            print(f"spanflow {p} stages ({s['chunks']} chunks): {parts}")
    for prefix, side in (("", "spanflow"), ("pipeline_", "pipeline")):
        if f"{prefix}mixed_precision_speedup" in result:
            print(
                f"mixed precision, {side} bf16 vs {side} fp32: x{result[f'{prefix}mixed_precision_speedup']:.2f}, "
                f"F1 {result[f'{prefix}mixed_precision_f1_change']:+.2f}, "
                f"EM {result[f'{prefix}mixed_precision_em_change']:+.2f}"
            )
    for rt, s in result.get("onnx_runtime", {}).items():
        q = s["questions_per_second"]
        against = [
            f"x{s[f'{rt}_speedup_vs_{n}']:.2f} F1 {s[f'{rt}_f1_change_vs_{n}']:+.2f} vs {n.replace('_', ' ')}"
            for n in ("torch_fp32", "pipeline_fp32")
            if f"{rt}_speedup_vs_{n}" in s
        ]
        print(
            f"spanflow {rt} (ONNX Runtime): {q['median']:.2f} q/s ({q['min']:.2f}-{q['max']:.2f}), "
            f"EM {s['exact_match']:.2f} F1 {s['f1']:.2f}, RSS {s['peak_rss_mb']:.0f} MB; {'; '.join(against)}"
        )
    if equal and "inference_speedup_vs_pipeline_fp32_default" in result:
        print(
            f"spanflow {result['precision']} vs pipeline fp32 (its default dtype; not a like-for-like ratio): "
            f"x{result['inference_speedup_vs_pipeline_fp32_default']:.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=None, help="first N dev questions (default: all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["config"],
        choices=["config", "auto", "bf16", "fp32"],
        help="precision(s) of both sides (the pipeline's weights in the same dtype as spanflow's); config ="
        " train.precision of params.yaml (auto: bf16 on CPUs with AMX or avx512-bf16)",
    )
    parser.add_argument("--threads", type=int, default=None, help="default: train.num_threads, else torch's")
    parser.add_argument("--pipeline-batch-size", type=int, default=1, help="the pipeline's batch_size")
    parser.add_argument("--stages", action="store_true", help="also time spanflow's steps (first rep)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--max-load", type=float, default=None, help="wait for a 1-min load average below this")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for --max-load, per run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the children's files in this folder")
    parser.add_argument("--setup-only", action="store_true", help="only make benchmarks/.venv-tf52")
    parser.add_argument(
        "--runtimes", nargs="*", choices=RUNTIMES, default=["onnx", "onnx_int8"], help="spanflow's ONNX Runtime paths"
    )
    # --side spanflow: the child process that runs spanflow's inference (started by `compare`)
    parser.add_argument("--side", choices=["spanflow"], default=None, help=argparse.SUPPRESS)
    child = parser.add_argument_group("child process (--side spanflow)")
    child.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    child.add_argument("--records", type=Path)
    child.add_argument("--out", type=Path)
    child.add_argument("--chunk-length", type=int)
    child.add_argument("--overlap", type=int)
    child.add_argument("--max-query-length", type=int)
    child.add_argument("--max-answer-length", type=int)
    child.add_argument("--n-best", type=int)
    child.add_argument("--batch-size", type=int)
    child.add_argument("--workers", type=int, default=1)
    child.add_argument("--squad-version", default="1.1")
    child.add_argument("--no-answer-threshold", type=float, default=0.0)
    child.add_argument("--span-scoring", choices=SPAN_SCORINGS, default=DEFAULT_SPAN_SCORING)
    child.add_argument("--by-scoring", action="store_true", help="also decode with every span-scoring rule")
    child.add_argument("--runtime", choices=RUNTIMES, default="torch")
    child.add_argument("--int8-skip-modules", default="[]", help="JSON list (eval.int8_skip_modules)")
    args = parser.parse_args(argv)

    if args.side == "spanflow":
        args.precision = args.precision[0]
        spanflow_side(args)
        return
    if args.setup_only:
        print(ensure_tf52_venv(quiet=False))
        return
    result = compare(
        questions=args.questions,
        reps=args.reps,
        precisions=args.precision,
        threads=args.threads,
        pipeline_batch_size=args.pipeline_batch_size,
        stages=args.stages,
        model_dir=args.model_dir,
        keep=args.keep,
        max_load=args.max_load,
        max_wait=args.max_wait,
        runtimes=args.runtimes,
    )
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
