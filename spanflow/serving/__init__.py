"""The registered model's pyfunc."""

# torch threads of each serving worker process: set by `spanflow serve` (usable CPUs // --workers), read by the
# pyfunc (spanflow/serving/qa_pyfunc.py) when it loads
THREADS_ENV = "SPANFLOW_TORCH_THREADS"
