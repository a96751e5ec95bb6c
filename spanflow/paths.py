"""Where each stage reads and writes, relative to the project root (dvc.yaml names the same paths)."""

from pathlib import Path

PREPARED = Path("data/prepared")  # train/val/dev records + version.json
FEATURES = Path("data/features")  # tokenized chunks of train and val
MODEL = Path("models/final")  # hf/ (merged model + tokenizer), checkpoints/, run.json, train.json
RESULTS = Path("results")  # predictions.json, metrics.json, history.csv, plots, registered.json
SEARCH_MODEL = Path("models/search")  # best_trial.safetensors: the search's best trial, the final model's start
