"""Concurrent load on the served model through real HTTP on 127.0.0.1: throughput, p50/p99 latency, errors.

    .venv/bin/python -m benchmarks.load_test [--model-uri URI] [--clients 8] [--requests 25] [--min-chars 10000]
        [--workers 1 2] [--reps 1] [--json out.json]

For each worker count of --workers (default 1, then 2, in the same run; with --reps R the counts alternate R times),
starts `spanflow serve --workers N` on a free loopback port (`serve_latency.spanflow_server`: each worker process
loads the model with usable CPUs // N torch threads), waits until every worker has loaded the model, sends one
untimed request per client side by side (warm-up), then lets --clients threads each send --requests POSTs to
/invocations one after another (a closed loop: a client sends its next request when the last one is answered). Every
request asks the same dev question over the same context of at least --min-chars characters (whole dev articles,
`serve_latency.long_context`). An error is a transport failure, a status other than 200, or an answer that is not
`context[start:end]`. Afterwards the server must still answer /ping and one more request. Reports per worker count:
throughput (requests answered / wall seconds of the burst), latency p50 / p90 / p99 / max, errors; and each count's
throughput and latency against the first count's in the same run. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT = 300.0  # seconds; MLflow's scoring server gives up on a request after 60 s (a 504, an error here)


# --------------------------------------------------------------------------- pure parts (tests/test_load_test.py)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q}: must be within 0..100")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summarize(latencies: list[float], errors: list[str], wall_seconds: float) -> dict[str, Any]:
    """Figures of one burst: `latencies` in seconds of the requests answered correctly, `errors` one line per failed
    request, `wall_seconds` from the first request sent to the last one answered."""
    ms = [1000 * s for s in latencies]
    answered = len(ms)
    out: dict[str, Any] = {
        "requests": answered + len(errors),
        "answered": answered,
        "errors": len(errors),
        "error_kinds": {e: errors.count(e) for e in sorted(set(errors))},
        "wall_seconds": wall_seconds,
        "throughput_rps": answered / wall_seconds if wall_seconds > 0 else 0.0,
    }
    if ms:
        out |= {
            "latency_ms_p50": percentile(ms, 50),
            "latency_ms_p90": percentile(ms, 90),
            "latency_ms_p99": percentile(ms, 99),
            "latency_ms_max": max(ms),
            "latency_ms_mean": statistics.fmean(ms),
        }
    return out


def against_first(by_workers: dict[int, dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Each worker count's median throughput and p50 / p99 latency as ratios to the first count's (same run)."""
    (first, base), *_ = by_workers.items()
    ratios = {}
    for workers, s in by_workers.items():
        ratios[workers] = {
            f"throughput_vs_{first}_workers": s["throughput_rps"] / base["throughput_rps"],
            **{
                f"latency_{p}_vs_{first}_workers": s[f"latency_ms_{p}"] / base[f"latency_ms_{p}"]
                for p in ("p50", "p99")
                if s.get(f"latency_ms_{p}") and base.get(f"latency_ms_{p}")
            },
        }
    return ratios


def median_of_reps(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from the reps of one worker count: the median of each figure, the errors added up."""
    out: dict[str, Any] = {"reps": len(reps)}
    for key in ("throughput_rps", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_max"):
        values = [r["burst"][key] for r in reps if key in r["burst"]]
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_reps"] = values
    out["requests"] = sum(r["burst"]["requests"] for r in reps)
    out["errors"] = sum(r["burst"]["errors"] + r["warmup_errors"] for r in reps)
    out["still_answering"] = all(r["still_answering"] for r in reps)
    out["startup_seconds"] = statistics.median(r["startup_seconds"] for r in reps)
    return out


# --------------------------------------------------------------------------- the load


def _server_error(response: httpx.Response) -> str:
    """What went wrong, from an error response: MLflow's message, then the exception its stack trace ends with
    (the scoring server wraps any error in predict as "unexpected error while evaluating the model")."""
    try:
        body = response.json()
        reason = body["message"][:120]
        trace = body.get("stack_trace", "").strip().splitlines()
    except (ValueError, KeyError, TypeError, AttributeError):
        return response.text[:120]
    return f"{reason} ({trace[-1][:200]})" if trace else reason


def _ask(client: httpx.Client, url: str, body: dict, context: str) -> tuple[float, str | None, str | None]:
    """One request: (seconds, error or None, answer text or None)."""
    t = time.perf_counter()
    try:
        response = client.post(f"{url}/invocations", json=body, timeout=REQUEST_TIMEOUT)
    except httpx.HTTPError as exc:
        return time.perf_counter() - t, f"{type(exc).__name__}", None
    seconds = time.perf_counter() - t
    if response.status_code != 200:
        return seconds, f"HTTP {response.status_code}: {_server_error(response)}", None
    try:
        (answer,) = response.json()["predictions"]
        ok = context[answer["start"] : answer["end"]] == answer["answer"]
    except (ValueError, KeyError, TypeError):
        return seconds, "malformed response", None
    return seconds, (None if ok else "answer is not context[start:end]"), answer["answer"]


def burst(url: str, body: dict, context: str, clients: int, requests: int) -> tuple[dict[str, Any], set[str]]:
    """`clients` threads, each sending `requests` requests one after another; the summary and the distinct answers."""
    latencies: list[float] = []
    errors: list[str] = []
    answers: set[str] = set()
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with httpx.Client() as client:
            start.wait()
            for _ in range(requests):
                seconds, error, answer = _ask(client, url, body, context)
                with lock:
                    if error is None:
                        latencies.append(seconds)
                        answers.add(answer)
                    else:
                        errors.append(error)

    threads = [threading.Thread(target=client_loop, name=f"client-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return summarize(latencies, errors, time.perf_counter() - t0), answers


def run_server(
    model_uri: str | None, workers: int, body: dict, context: str, clients: int, requests: int
) -> dict[str, Any]:
    """Start a server with `workers` worker processes, warm it up, run the burst, check it still answers."""
    from benchmarks.serve_latency import spanflow_server

    with spanflow_server(model_uri, workers) as (url, startup):
        warm, _ = burst(url, body, context, clients, 1)  # one request per client, side by side: not timed
        print(
            f"{workers} worker(s): up in {startup:.1f} s, warm-up {warm['wall_seconds']:.1f} s "
            f"({warm['errors']} errors); {clients} clients x {requests} requests ...",
            file=sys.stderr,
        )
        result, answers = burst(url, body, context, clients, requests)
        with httpx.Client() as client:
            ping = client.get(f"{url}/ping", timeout=30).status_code == 200
            _, error, _ = _ask(client, url, body, context)
        print(
            f"{workers} worker(s): {result['throughput_rps']:.2f} requests/s, "
            f"p50 {result.get('latency_ms_p50', float('nan')):.0f} ms, "
            f"p99 {result.get('latency_ms_p99', float('nan')):.0f} ms, {result['errors']} errors",
            file=sys.stderr,
        )
    return {
        "startup_seconds": startup,
        "warmup_errors": warm["errors"],
        "warmup_error_kinds": warm["error_kinds"],
        "burst": result,
        "distinct_answers": sorted(answers),
        "still_answering": ping and error is None,
        "after_burst_error": error,
    }


def torch_threads_per_worker(workers: int) -> int:
    """What `spanflow serve --workers N` gives each worker (spanflow/tracking/registry_cli.py::serve_command)."""
    from spanflow.serving import THREADS_ENV
    from spanflow.tracking.registry_cli import usable_cpus

    return int(os.environ.get(THREADS_ENV) or max(1, usable_cpus() // workers))


def cpu() -> dict[str, Any]:
    """The CPU's name, its CPUs and whether it has bf16 instructions (as `lscpu` and /proc/cpuinfo say)."""
    name, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return {
        "cpu": name,
        "cpu_count": os.cpu_count(),
        "cpu_bf16": sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16"}),
    }


def load_test(
    model_uri: str | None = None,
    clients: int = 8,
    requests: int = 25,
    min_chars: int = 10_000,
    workers: list[int] | None = None,
    reps: int = 1,
    params: Path = ROOT / "params.yaml",
) -> dict[str, Any]:
    """Every figure of the load test, for each worker count (alternating rep by rep)."""
    from benchmarks.serve_latency import long_context
    from spanflow.config import load_config
    from spanflow.tracking.registry_cli import champion_uri

    workers = workers or [1, 2]
    cfg = load_config(params)
    context, q = long_context(cfg.data.dev, min_chars)
    body = {"dataframe_records": [{"question": q["question"], "context": context}]}
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in workers}
    for rep in range(reps):
        for w in workers:
            print(f"== rep {rep + 1}/{reps}: {w} worker(s) ==", file=sys.stderr)
            runs[w].append(run_server(model_uri, w, body, context, clients, requests))
    by_workers = {w: median_of_reps(r) for w, r in runs.items()}
    ratios = against_first(by_workers)
    for w, s in by_workers.items():
        s["torch_threads_per_worker"] = torch_threads_per_worker(w)
        s.update(ratios[w])
    return {
        "model_uri": model_uri or champion_uri(cfg),
        "clients": clients,
        "requests_per_client": requests,
        "context_chars": len(context),
        "question": q["question"],
        "gold": q["answers"]["text"],
        **cpu(),
        "by_workers": by_workers,
        "runs": runs,
        "errors": sum(s["errors"] for s in by_workers.values()),
        "still_answering": all(s["still_answering"] for s in by_workers.values()),
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['clients']} clients x {result['requests_per_client']} requests, a "
        f"{result['context_chars']}-character context, {result['model_uri']}; {result['cpu']} "
        f"({result['cpu_count']} CPUs, bf16: {', '.join(result['cpu_bf16']) or 'none'})"
    )
    first = next(iter(result["by_workers"]))
    header = (
        f"{'workers':>7} {'threads':>7} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'errors':>6} {'alive':>5} {'req/s ratio':>11} {'p99 ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    for w, s in result["by_workers"].items():
        print(
            f"{w:>7} {s['torch_threads_per_worker']:>7} {s['throughput_rps']:>7.2f} {s.get('latency_ms_p50', 0):>8.0f} "
            f"{s.get('latency_ms_p90', 0):>8.0f} {s.get('latency_ms_p99', 0):>8.0f} {s.get('latency_ms_max', 0):>8.0f} "
            f"{s['errors']:>6} {'yes' if s['still_answering'] else 'NO':>5} "
            f"{s[f'throughput_vs_{first}_workers']:>11.2f} {s.get(f'latency_p99_vs_{first}_workers', 0):>9.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=None, help="default: models:/<registry.model_name>@<champion alias>")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--requests", type=int, default=25, help="requests per client (default 25)")
    parser.add_argument("--min-chars", type=int, default=10_000, help="context length in characters, at least")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="server worker counts (default 1 2)")
    parser.add_argument("--reps", type=int, default=1, help="times each worker count runs, alternating")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    if min(args.clients, args.requests, args.reps, *args.workers) < 1:
        parser.error("--clients, --requests, --reps and --workers must be >= 1")

    os.chdir(ROOT)  # params.yaml's data and the MLflow store are relative to the project
    result = load_test(
        args.model_uri, args.clients, args.requests, args.min_chars, args.workers, args.reps, args.params
    )
    print_table(result)
    if args.json:
        from spanflow.io_utils import atomic_write_json

        atomic_write_json(args.json, result)
    if result["errors"] or not result["still_answering"]:
        raise SystemExit(f"{result['errors']} errors; still answering: {result['still_answering']}")


if __name__ == "__main__":
    main()
