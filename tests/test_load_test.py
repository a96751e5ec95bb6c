"""The load test's arithmetic (benchmarks/load_test.py); the load itself is a benchmark, not a test."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from benchmarks.load_test import _server_error, against_first, median_of_reps, percentile, print_table, summarize


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
@pytest.mark.parametrize("values", [[3.0], [2.0, 1.0], [5.0, 1.0, 4.0, 2.0, 3.0], list(np.linspace(0, 7, 200) ** 2)])
def test_percentile_is_numpys_linear_interpolation(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_counts_errors_apart_from_latencies() -> None:
    latencies = [0.1 * i for i in range(1, 101)]  # 100 answered, 0.1 s to 10 s
    s = summarize(latencies, ["HTTP 504: timeout", "ReadTimeout", "HTTP 504: timeout"], wall_seconds=20.0)
    assert s["requests"] == 103 and s["answered"] == 100 and s["errors"] == 3
    assert s["error_kinds"] == {"HTTP 504: timeout": 2, "ReadTimeout": 1}
    assert s["throughput_rps"] == pytest.approx(5.0)  # answered requests only
    assert s["latency_ms_p50"] == pytest.approx(5050.0)
    assert s["latency_ms_p99"] == pytest.approx(9901.0)
    assert s["latency_ms_max"] == pytest.approx(10_000.0)
    assert s["latency_ms_p50"] <= s["latency_ms_p90"] <= s["latency_ms_p99"] <= s["latency_ms_max"]


def test_a_burst_with_no_answer_has_no_latency() -> None:
    s = summarize([], ["ConnectError"] * 4, wall_seconds=1.0)
    assert s["throughput_rps"] == 0.0 and s["errors"] == 4 and "latency_ms_p50" not in s


def _rep(rps: float, p99: float, errors: int = 0, warmup_errors: int = 0, alive: bool = True) -> dict:
    burst = {"throughput_rps": rps, "latency_ms_p50": p99 / 2, "latency_ms_p90": p99 * 0.9, "latency_ms_p99": p99}
    burst |= {"latency_ms_max": p99, "requests": 200, "errors": errors}
    return {"burst": burst, "warmup_errors": warmup_errors, "still_answering": alive, "startup_seconds": 10.0}


def test_reps_give_medians_and_every_error() -> None:
    s = median_of_reps([_rep(2.0, 900), _rep(3.0, 700, errors=1), _rep(2.5, 800, warmup_errors=2, alive=False)])
    assert s["throughput_rps"] == 2.5 and s["throughput_rps_reps"] == [2.0, 3.0, 2.5]
    assert s["latency_ms_p99"] == 800 and s["requests"] == 600
    assert s["errors"] == 3  # the warm-up's count too
    assert s["still_answering"] is False


def test_ratios_are_against_the_first_worker_count_of_the_run() -> None:
    by_workers = {1: median_of_reps([_rep(2.0, 1000)]), 2: median_of_reps([_rep(3.0, 800)])}
    ratios = against_first(by_workers)
    assert set(ratios[1]) == {"throughput_vs_1_workers", "latency_p50_vs_1_workers", "latency_p99_vs_1_workers"}
    assert set(ratios[1].values()) == {1.0}
    assert ratios[2]["throughput_vs_1_workers"] == pytest.approx(1.5)
    assert ratios[2]["latency_p99_vs_1_workers"] == pytest.approx(0.8)


def test_the_table_shows_each_worker_count_against_the_first(capsys: pytest.CaptureFixture[str]) -> None:
    by_workers = {1: median_of_reps([_rep(2.0, 1000)]), 2: median_of_reps([_rep(3.0, 800, errors=1)])}
    for w, ratios in against_first(by_workers).items():
        by_workers[w] |= ratios | {"torch_threads_per_worker": 2 // w}
    result = {"clients": 8, "requests_per_client": 25, "context_chars": 10_123, "model_uri": "models:/m@champion"}
    result |= {"cpu": "Some CPU", "cpu_count": 2, "cpu_bf16": [], "by_workers": by_workers}
    print_table(result)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:7].strip() in ("1", "2")]
    assert rows[0][:3] == ["1", "2", "2.00"] and rows[0][-2:] == ["1.00", "1.00"]
    assert rows[1][:3] == ["2", "1", "3.00"] and rows[1][7:9] == ["1", "yes"] and rows[1][-2:] == ["1.50", "0.80"]


def test_an_error_response_names_the_exception_behind_it() -> None:
    """The scoring server answers an error in predict with MLflow's generic message and the stack trace: the load
    test's error kind names the exception the trace ends with."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    trace = "Traceback (most recent call last):\n  File ...\nRuntimeError: The size of tensor a (3923) must match\n"
    error = MlflowException("unexpected error while evaluating the model", error_code=BAD_REQUEST, stack_trace=trace)
    kind = _server_error(httpx.Response(400, content=error.serialize_as_json()))
    assert kind == "unexpected error while evaluating the model (RuntimeError: The size of tensor a (3923) must match)"
    plain = MlflowException("batch of 4 rows is over serving.max_batch = 3", error_code=BAD_REQUEST)
    assert _server_error(httpx.Response(400, content=plain.serialize_as_json())) == plain.message
    assert _server_error(httpx.Response(504, text="Request processing time exceeded limit")).startswith("Request")
