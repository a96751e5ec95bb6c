"""Pictures a person would rather look at than a table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig: plt.Figure, path: Path) -> Path:
    if fig.get_layout_engine() is None:  # figures made with layout="constrained" lay themselves out
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(history: list[dict], path: Path, step_log: list[tuple[int, float, float]] | None = None) -> Path:
    """Training loss every few steps (`step_log`) with validation loss at each epoch's end, the learning rate,
    and validation EM / F1, over optimizer steps."""
    fig, (ax_loss, ax_lr, ax_f1) = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    ends = [h["step"] for h in history]
    if step_log:
        steps = [s for s, _, _ in step_log]
        ax_loss.plot(steps, [loss for _, loss, _ in step_log], "-", lw=1, label="train loss (since the last point)")
        ax_lr.plot(steps, [lr for _, _, lr in step_log], "-")
    else:
        ax_lr.text(0.5, 0.5, "no step log\n(train.log_every_steps: 0)", ha="center", va="center")
    ax_loss.plot(ends, [h["train_loss"] for h in history], "o", label="train loss (epoch mean)")
    if any(h["val_loss"] is not None for h in history):
        ax_loss.plot(ends, [h["val_loss"] for h in history], "s-", label="validation loss")
        ax_f1.plot(ends, [h["val_f1"] for h in history], "o-", label="validation F1")
        ax_f1.plot(ends, [h["val_exact_match"] for h in history], "s--", label="validation EM")
    else:  # trained on the validation articles too (train.include_validation)
        ax_f1.text(0.5, 0.5, "no validation split\n(train.include_validation)", ha="center", va="center")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    ax_lr.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate (warm-up, linear decay)")
    ax_f1.set(xlabel="optimizer step", ylabel="score (%)", title="Validation EM / F1")
    for ax in (ax_loss, ax_lr, ax_f1):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    return save_figure(fig, path)


def layer_weights(report: dict, path: Path) -> Path:
    """One bar per hidden state (the embeddings' output, then each layer's): its weight in what the QA head reads.
    `report` is `spanflow.models.layer_mix.layer_weights_report`'s: the learned softmax weights of method layer_mix
    (with the uniform weights it started from), or, for any other method, 1 on the last layer."""
    states, weights = report["state"], report["weight"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(states) + 1.5), 4))
    bars = ax.bar(states, weights, color="tab:blue" if report["learned"] else "tab:gray")
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    if report["learned"]:
        ax.axhline(1 / len(states), color="tab:red", ls="--", lw=1, label="uniform (where the mix starts)")
        ax.legend()
        title = f"Learned layer weights (softmax), gamma {report['gamma']:.3f}"
    else:
        title = f"method {report['method']}: the QA head reads the last layer alone"
    ax.set(xlabel="hidden state", ylabel="weight", ylim=(0, max(weights) * 1.15), title=title)
    ax.tick_params(axis="x", labelrotation=45 if len(states) > 8 else 0)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def search_heatmaps(rows: list[dict], path: Path, best_point: str | None = None, lead: dict | None = None) -> Path:
    """Validation F1 (top) and EM (bottom) over chunk length x overlap, one column per LoRA rank, one colour
    scale per row over the complete trials. A pruned trial, scored at a lower fidelity, is left uncoloured with
    the score of the rung where it stopped; the chosen point is framed in red, and the title says whether its
    lead over the runner-up is more than noise."""
    import numpy as np
    from matplotlib.patches import Rectangle

    chunks = sorted({r["chunk_length"] for r in rows})
    overlaps = sorted({r["overlap"] for r in rows})
    ranks = sorted({r["lora_rank"] for r in rows})
    fig, axes = plt.subplots(
        2, len(ranks), figsize=(max(6.5, 3.6 * len(ranks) + 1.2), 7.4), squeeze=False, layout="constrained"
    )
    for row_i, (metric, label) in enumerate((("val_f1", "validation F1"), ("val_exact_match", "validation EM"))):
        scored = [r[metric] for r in rows if r["state"] == "complete" and r.get(metric) is not None]
        low, high = (min(scored), max(scored)) if scored else (0.0, 1.0)
        if lead and metric == "val_f1":  # a colour step no smaller than the noise: a tie looks like one
            half = max((high - low) / 2, 2 * lead["best_f1_bootstrap_sd"])
            low, high = (low + high) / 2 - half, (low + high) / 2 + half
        for col, rank in enumerate(ranks):
            ax = axes[row_i][col]
            grid = np.full((len(overlaps), len(chunks)), np.nan)
            notes: dict[tuple[int, int], str] = {}
            for r in rows:
                if r["lora_rank"] != rank:
                    continue
                cell = (overlaps.index(r["overlap"]), chunks.index(r["chunk_length"]))
                if r["state"] == "pruned" and r.get(metric) is not None:  # a lower fidelity: no colour
                    notes[cell] = f"pruned\n{r[metric]:.1f} @ step {r.get('steps_run')}"
                elif r["state"] == "complete" and r.get(metric) is not None:
                    grid[cell] = r[metric]
                    notes[cell] = f"{r[metric]:.1f}"
                    if r["point"] == best_point:
                        ax.add_patch(Rectangle((cell[1] - 0.5, cell[0] - 0.5), 1, 1, fill=False, ec="red", lw=3))
                elif cell not in notes:
                    notes[cell] = r["state"]  # skipped, fail, running
            image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto", vmin=low, vmax=high)
            for (y, x), text in notes.items():
                bright = not np.isnan(grid[y, x]) and (grid[y, x] - low) > 0.6 * (high - low)
                dark_cell = not np.isnan(grid[y, x]) and not bright
                ax.text(x, y, text, ha="center", va="center", color="white" if dark_cell else "black")
            ax.set_xticks(range(len(chunks)), chunks)
            ax.set_yticks(range(len(overlaps)), overlaps)
            ax.set(xlabel="chunk length", ylabel="overlap", title=f"{label}, LoRA rank {rank}")
        fig.colorbar(image, ax=list(axes[row_i]), fraction=0.046)
    title = "colour: complete trials at their full budget (F1 scale at least ±2 bootstrap SDs);\n"
    title += "a pruned trial shows its score at the rung where it stopped"
    if best_point:
        title = f"chosen: {best_point} (red frame)\n" + title
    if lead:
        lead_text = f"lead over {lead['runner_up']}: {lead['lead_f1']:+.1f} F1 [{lead['lead_low']:+.1f}, "
        lead_text += f"{lead['lead_high']:+.1f}], " + ("more than noise" if lead["separated"] else "within noise")
        title += "\n" + lead_text
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def search_durations(rows: list[dict], path: Path) -> Path:
    """Wall seconds per trial, coloured by outcome."""
    trials = sorted((r for r in rows if r["state"] != "skipped"), key=lambda r: r["trial"])
    colours = {"complete": "tab:green", "pruned": "tab:orange", "fail": "tab:red", "running": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(trials) + 1.5))
    labels = [f"#{r['trial']} {r['point']}" for r in trials]
    ax.barh(labels, [r["seconds"] or 0 for r in trials], color=[colours.get(r["state"], "tab:gray") for r in trials])
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=state) for state, c in colours.items() if any(r["state"] == state for r in trials)]
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title="Search trial durations")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(handles=handles, loc="lower right")
    return save_figure(fig, path)
