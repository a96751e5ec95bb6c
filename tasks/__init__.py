"""Task-level code for spanflow: SQuAD data handling and evaluation."""
