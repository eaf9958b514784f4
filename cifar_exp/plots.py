"""Evaluation figures, readable at 100 classes. Each function returns a matplotlib Figure."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import auc, confusion_matrix, roc_curve  # noqa: E402


def superclass_order(fine_to_coarse: Sequence[int]) -> np.ndarray:
    """Class indices sorted by superclass, so related classes sit in adjacent blocks."""
    return np.lexsort((np.arange(len(fine_to_coarse)), np.asarray(fine_to_coarse)))


def _row_normalized(cm: np.ndarray) -> np.ndarray:
    return cm / np.maximum(cm.sum(1, keepdims=True), 1)


def confusion_figure(labels, pred, classes: list[str], fine_to_coarse: Sequence[int], superclasses: list[str]) -> Figure:
    """100x100 row-normalized confusion, ordered by superclass, with superclass grid and labels."""
    order = superclass_order(fine_to_coarse)
    cm = _row_normalized(confusion_matrix(labels, pred, labels=np.arange(len(classes))))[np.ix_(order, order)]
    fig, ax = plt.subplots(figsize=(15, 14), dpi=100)
    # sqrt colour scale: a 5% confusion is visible next to a 70% diagonal.
    im = ax.imshow(cm, cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, [classes[i] for i in order], rotation=90, fontsize=5)
    ax.set_yticks(ticks, [classes[i] for i in order], fontsize=5)
    coarse = np.asarray(fine_to_coarse)[order]
    edges = np.flatnonzero(np.diff(coarse)) + 0.5
    for e in edges:
        ax.axhline(e, color="white", lw=0.6)
        ax.axvline(e, color="white", lw=0.6)
    # Superclass names on the right, centred on their block.
    bounds = np.concatenate([[-0.5], edges, [len(classes) - 0.5]])
    for s, (lo, hi) in zip(coarse[np.r_[0, (edges + 0.5).astype(int)]], zip(bounds[:-1], bounds[1:])):
        ax.text(len(classes) + 1, (lo + hi) / 2, superclasses[s], fontsize=6, va="center")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalized, grouped by superclass)")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.09)
    fig.tight_layout()
    return fig


def superclass_confusion_figure(labels, pred, fine_to_coarse: Sequence[int], superclasses: list[str]) -> Figure:
    f2c = np.asarray(fine_to_coarse)
    n = len(superclasses)
    cm = _row_normalized(confusion_matrix(f2c[labels], f2c[pred], labels=np.arange(n)))
    fig, ax = plt.subplots(figsize=(10, 9), dpi=100)
    im = ax.imshow(cm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(np.arange(n), superclasses, rotation=90, fontsize=7)
    ax.set_yticks(np.arange(n), superclasses, fontsize=7)
    for i in range(n):
        for j in range(n):
            if cm[i, j] >= 0.01:
                ax.text(j, i, f"{cm[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="black" if cm[i, j] > 0.5 else "white")
    ax.set_xlabel("predicted superclass")
    ax.set_ylabel("true superclass")
    ax.set_title("Superclass confusion (fine prediction mapped to its superclass)")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig


def roc_figure(probs: np.ndarray, labels: np.ndarray, classes: list[str], per_class_auc: np.ndarray) -> Figure:
    """Micro and macro averages plus the 5 best and 5 worst classes by AUC."""
    n = probs.shape[1]
    onehot = np.eye(n, dtype=bool)[labels]
    present = np.flatnonzero(onehot.any(0) & ~onehot.all(0))
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    ax.plot(fpr, tpr, lw=2, color="black", label=f"micro average (AUC {auc(fpr, tpr):.3f})")
    grid = np.linspace(0, 1, 201)
    curves = {c: roc_curve(onehot[:, c], probs[:, c])[:2] for c in present}
    mean_tpr = np.mean([np.interp(grid, f, t) for f, t in curves.values()], axis=0)
    ax.plot(grid, mean_tpr, lw=2, ls="--", color="gray",
            label=f"macro average (AUC {np.nanmean(per_class_auc[present]):.3f})")
    ranked = present[np.argsort(-per_class_auc[present], kind="stable")]
    picks = [(c, "tab:green") for c in ranked[:5]] + [(c, "tab:red") for c in ranked[-5:][::-1]]
    for c, color in picks:
        f, t = curves[c]
        ax.plot(f, t, lw=1, color=color, alpha=0.8, label=f"{classes[c]} (AUC {per_class_auc[c]:.3f})")
    ax.plot([0, 1], [0, 1], lw=0.5, color="lightgray")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one-vs-rest: averages, 5 best (green) and 5 worst (red) classes")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def tsne_figure(points: np.ndarray, coarse: np.ndarray, superclasses: list[str]) -> Figure:
    fig, ax = plt.subplots(figsize=(11, 8), dpi=100)
    cmap = plt.get_cmap("tab20")
    for s, name in enumerate(superclasses):
        m = coarse == s
        if m.any():
            ax.scatter(points[m, 0], points[m, 1], s=5, color=cmap(s % 20), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE of penultimate-layer features (test subsample), coloured by superclass")
    ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def training_curves_figure(history: list[dict[str, float]]) -> Figure:
    epochs = np.arange(1, len(history) + 1)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for split, style in (("train", "-"), ("val", "--")):
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], style, marker="o", ms=3, label=split)
        acc_ax.plot(epochs, [h[f"{split}_accuracy"] for h in history], style, marker="o", ms=3, label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


# --- comparison report ----------------------------------------------------------------------

def close(fig: Figure) -> None:
    plt.close(fig)


def family_accuracy_figure(runs, cis: dict, families: dict[str, str]) -> Figure:
    """Every run's test accuracy by family, with the best run's bootstrap 95% CI."""
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for i, fam in enumerate(families):
        acc = runs.loc[runs["family"] == fam, "test_accuracy"].to_numpy()
        if not len(acc):
            continue
        ax.scatter(np.full(len(acc), i) + np.linspace(-0.15, 0.15, len(acc)), acc, s=18, alpha=0.6, label=f"{families[fam]} runs")
        if fam in cis:
            lo, hi = cis[fam]
            best = acc.max()
            ax.errorbar([i + 0.3], [best], yerr=[[best - lo], [hi - best]], fmt="D", color="black", capsize=6,
                        label="best run, 95% CI" if i == 0 else None)
    ax.set_xticks(range(len(families)), list(families.values()))
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy by family")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def curves_figure(curves: dict[str, list[tuple[int, float]]], metric: str) -> Figure:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for label, points in curves.items():
        steps, values = zip(*sorted(points)) if points else ((), ())
        ax.plot(np.asarray(steps) + 1, values, marker="o", ms=3, label=label)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} of the best run per family")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def cost_figure(runs, families: dict[str, str]) -> Figure:
    """Accuracy against training time and against parameter count."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for ax, col, label in ((axes[0], "training_seconds", "training time (s)"), (axes[1], "parameter_count", "parameters")):
        for fam, name in families.items():
            sel = runs[runs["family"] == fam]
            if len(sel):
                ax.scatter(sel[col], sel["test_accuracy"], s=18, alpha=0.7, label=name)
        ax.set(xlabel=label, ylabel="test accuracy", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("Accuracy vs training time")
    axes[1].set_title("Accuracy vs parameter count")
    fig.tight_layout()
    return fig
