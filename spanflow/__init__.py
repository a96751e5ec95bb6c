"""spanflow: extractive question answering with parameter-efficient fine-tuning, tracked and reproducible."""

__version__ = "0.1.0"
