"""Latency of the served model for one question over a long context, through real HTTP.

    .venv/bin/python benchmarks/serve_latency.py [--model-uri URI] [--requests 20] [--min-chars 10000]

Starts `spanflow serve` (= `mlflow models serve --env-manager local`) on a free loopback port, builds
a context of at least --min-chars characters from whole articles of the dev set (in their order), asks
a dev question whose paragraph sits near the end, and times --requests POSTs to /invocations after
one warm-up. Prints the context size, the chunks it splits into, the answer against the gold answers,
and median / min / max latency. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from spanflow.config import load_config
from spanflow.data.squad import load_squad_json


def long_context(dev_file: str, min_chars: int) -> tuple[str, dict]:
    """Paragraphs of the dev set joined until min_chars; a question from the last paragraph added."""
    records, _ = load_squad_json(Path(dev_file))
    paragraphs: list[str] = []
    for r in records:
        if not paragraphs or paragraphs[-1] != r["context"]:
            paragraphs.append(r["context"])
        if sum(len(p) + 1 for p in paragraphs) >= min_chars:
            break
    question = next(r for r in records if r["context"] == paragraphs[-1])
    return "\n".join(paragraphs), question


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def spanflow_server(
    model_uri: str | None = None, workers: int = 1, startup_timeout: float = 600, cwd: Path | None = None
) -> Iterator[tuple[str, float]]:
    """`spanflow serve --workers N` on a free loopback port, run in `cwd` (default: this process's; its params.yaml
    and MLflow store are the ones served from), in its own process group, until the block ends; yields
    its URL and the seconds until /ping answered and every worker process had loaded the model (uvicorn logs
    "Application startup complete." once per worker, after the model loaded). The server's output goes to a
    temporary file whose tail is in the error when it does not come up."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "spanflow"), "serve", "--port", str(port), "--workers", str(workers)]
    if model_uri:
        command += ["--model-uri", model_uri]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="spanflow-serve-") as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "ab") as out:  # append: the child's writes always land at the end
            server = subprocess.Popen(command, cwd=cwd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        try:
            t0 = time.perf_counter()
            while True:
                text = log.read_text(errors="replace")
                if server.poll() is not None or time.perf_counter() - t0 > startup_timeout:
                    raise SystemExit(f"the server did not come up (exit {server.poll()}):\n{text[-3000:]}")
                try:
                    up = httpx.get(f"{url}/ping", timeout=2).status_code == 200
                except httpx.TransportError:
                    up = False
                if up and text.count("Application startup complete") >= workers:
                    break
                time.sleep(0.5)
            yield url, time.perf_counter() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default=None, help="default: the champion")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--min-chars", type=int, default=10_000)
    args = parser.parse_args()

    cfg = load_config("params.yaml")
    context, q = long_context(cfg.data.dev, args.min_chars)
    with spanflow_server(args.model_uri) as (url, startup):
        body = {"dataframe_records": [{"question": q["question"], "context": context}]}
        answer = httpx.post(f"{url}/invocations", json=body, timeout=300).json()["predictions"][0]  # warm-up
        seconds = []
        for _ in range(args.requests):
            t = time.perf_counter()
            response = httpx.post(f"{url}/invocations", json=body, timeout=300)
            seconds.append(time.perf_counter() - t)
            response.raise_for_status()

    from transformers import AutoTokenizer

    from spanflow.data.features import featurize
    from spanflow.search.best_params import final_config

    f = final_config(cfg).features
    tokenizer = AutoTokenizer.from_pretrained("models/final/hf")
    record = {**q, "context": context, "answers": {"text": [], "answer_start": []}}
    chunks = len(featurize([record], tokenizer, f.chunk_length, f.overlap, f.max_query_length))
    ms = [1000 * s for s in seconds]
    print(
        json.dumps(
            {
                "context_chars": len(context),
                "chunks": chunks,
                "chunk_length": f.chunk_length,
                "overlap": f.overlap,
                "question": q["question"],
                "answer": answer["answer"],
                "gold": q["answers"]["text"],
                "server_start_seconds": round(startup, 1),
                "requests": len(ms),
                "latency_ms_median": round(statistics.median(ms), 1),
                "latency_ms_min": round(min(ms), 1),
                "latency_ms_max": round(max(ms), 1),
            },
            indent=2,
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
