"""Learning curves of a federated training run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_path


def _save(fig, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def learning_curves(rounds: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "",
                    best_round: int | None = None) -> Path:
    """A 2 x 2 figure over rounds: ROC AUC; accuracy and balanced accuracy; sensitivity and specificity;
    evaluation loss. With DP, epsilon spent is drawn on the loss panel's right axis."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ev = [r for r in rounds if "roc_auc" in r]
    x = [r["round"] for r in ev]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), sharex=True)
    panels = [("ROC AUC", ["roc_auc"]), ("accuracy", ["accuracy", "balanced_accuracy"]),
              ("sensitivity / specificity", ["sensitivity", "specificity"]), ("evaluation loss", ["loss"])]
    for ax, (name, keys) in zip(axes.ravel(), panels):
        for k in keys:
            ax.plot(x, [r[k] for r in ev], marker="o", ms=3, label=k.replace("_", " "))
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        if best_round is not None:
            ax.axvline(best_round, color="grey", ls="--", lw=0.8)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    eps = [(r["round"], r["epsilon"]) for r in rounds if r.get("epsilon") is not None]
    if eps:
        ax2 = axes[1, 1].twinx()
        ax2.plot([e[0] for e in eps], [e[1] for e in eps], color="tab:red", lw=1)
        ax2.set_ylabel("epsilon spent", color="tab:red", fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("round")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


__all__ = ["learning_curves"]
