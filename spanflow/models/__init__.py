"""Backbones, the fine-tuning methods and the QA loss."""
