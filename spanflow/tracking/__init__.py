"""MLflow runs, the registry CLI, plots."""
