"""Where each stage reads and writes, relative to the project root (dvc.yaml names the same paths)."""

from pathlib import Path

PREPARED = Path("data/prepared")  # train/val/dev records + version.json
FEATURES = Path("data/features")  # tokenized chunks of train and val
MODEL = Path("models/final")  # hf/ (merged model + tokenizer), checkpoints/, run.json, train.json
SEARCH_MODEL = Path("models/search")  # best_trial.safetensors: the search's best trial, the final model's start
ONNX_CACHE = Path("models/onnx")  # <weights' sha256>/model.onnx, model.int8.onnx: exports for ONNX Runtime
RESULTS = Path("results")  # predictions.json, metrics.json, history.csv, plots, registered.json

VERSION_FILE = PREPARED / "version.json"  # prepare: content hashes, DVC md5s, the split
TRAIN_SUMMARY_FILE = MODEL / "train.json"  # train: steps, seconds, history
HISTORY_FILE = RESULTS / "history.csv"
CURVES_FILE = RESULTS / "learning_curves.png"
LAYER_WEIGHTS_FILE = RESULTS / "layer_weights.png"  # train: each layer's weight in what the QA head reads
PREDICTIONS_FILE = RESULTS / "predictions.json"  # evaluate: id -> answer
METRICS_FILE = RESULTS / "metrics.json"
REGISTERED_FILE = RESULTS / "registered.json"  # register: the new version
PROMOTION_FILE = RESULTS / "promotion.json"  # promote: the gate's decision
