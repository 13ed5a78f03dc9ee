"""Training curves and confusion matrices as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_confusion", "plot_curves"]


def plot_curves(metrics_path: str | Path, out: str | Path) -> Path:
    """Loss and learning rate against step, test top-1 against epoch."""
    steps, losses, lrs, epochs, top1 = [], [], [], [], []
    for line in Path(metrics_path).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "lr" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
            lrs.append(rec["lr"])
        if "test_top1" in rec:
            epochs.append(rec["epoch"])
            top1.append(rec["test_top1"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, losses)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].plot(steps, lrs)
    axes[1].set(title="learning rate", xlabel="step")
    axes[2].plot(epochs, top1, marker="o")
    axes[2].set(title="test top-1 (%)", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def plot_confusion(confusion: list[list[int]], classes: list[str], out: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class on rows) with counts in the cells."""
    import numpy as np

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.clip(cm.sum(1, keepdims=True), 1, None)
    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    int(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
