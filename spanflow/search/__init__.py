"""The Optuna grid search over chunk length x overlap x LoRA rank."""
