"""Pictures a person would rather look at than a table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curves(history: list[dict], path: Path) -> Path:
    """Training and validation loss, and validation F1, per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_f1) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    if any(h["val_loss"] is not None for h in history):
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation loss")
        ax_f1.plot(epochs, [h["val_f1"] for h in history], "o-", label="validation F1")
        ax_f1.plot(epochs, [h["val_exact_match"] for h in history], "s--", label="validation EM")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_f1.set(xlabel="epoch", ylabel="score (%)", title="Validation EM / F1")
    for ax in (ax_loss, ax_f1):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
