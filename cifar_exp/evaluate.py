"""Test-set evaluation: metrics from accuracy to calibration, the superclass view, tables, figures.

Everything works from class probabilities, so a model trained here and a model loaded by URI (which
returns probabilities) are evaluated by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import f1_score, log_loss, precision_recall_fscore_support, roc_auc_score

from . import plots

CHANCE_WITHIN_SUPERCLASS = 4 / 99  # a uniformly wrong guess lands in the true superclass this often
TSNE_POINTS = 2000  # 20 per class: enough structure, and t-SNE stays within seconds on 2 cores


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.asarray(logits, dtype=np.float64)).softmax(1).numpy()


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    topk = np.argpartition(-probs, kth=min(k, probs.shape[1]) - 1, axis=1)[:, :k]
    return float((topk == labels[:, None]).any(axis=1).mean())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Confidence-vs-accuracy gap over equal-width confidence bins, weighted by bin size."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)  # conf 1.0 falls in the top bin
    ece = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def per_class_auc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC per class; NaN for a class without positives in `labels`."""
    out = np.full(probs.shape[1], np.nan)
    if len(np.unique(labels)) < 2:
        return out
    for c in np.unique(labels):
        out[c] = roc_auc_score(labels == c, probs[:, c])
    return out


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    aucs = per_class_auc(probs, labels)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def superclass_metrics(pred: np.ndarray, labels: np.ndarray, fine_to_coarse: list[int]) -> dict[str, float]:
    f2c = np.asarray(fine_to_coarse)
    wrong = pred != labels
    same = f2c[pred] == f2c[labels]
    return {
        "superclass_accuracy": float(same.mean()),
        "within_superclass_error_share": float(same[wrong].mean()) if wrong.any() else float("nan"),
        "within_superclass_error_chance": CHANCE_WITHIN_SUPERCLASS,
    }


def classification_metrics(probs: np.ndarray, labels: np.ndarray, fine_to_coarse: list[int] | None = None,
                           aucs: np.ndarray | None = None) -> dict[str, float]:
    """Every scalar metric of a test set; names are snake_case without a split prefix."""
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    aucs = per_class_auc(probs, labels) if aucs is None else aucs
    p, r, _, _ = precision_recall_fscore_support(labels, pred, average="macro", zero_division=0)
    out = {
        "accuracy": float((pred == labels).mean()),
        "top5_accuracy": topk_accuracy(probs, labels, 5),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(labels, pred, average="weighted", zero_division=0)),
        "macro_precision": float(p),
        "macro_recall": float(r),
        "macro_auc": float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan"),
        "log_loss": float(log_loss(labels, np.clip(probs, 1e-12, 1), labels=np.arange(probs.shape[1]))),
        "ece": expected_calibration_error(probs, labels),
    }
    if fine_to_coarse is not None:
        out.update(superclass_metrics(pred, labels, fine_to_coarse))
    return out


def per_class_table(probs: np.ndarray, labels: np.ndarray, classes: list[str], aucs: np.ndarray) -> pd.DataFrame:
    n = len(classes)
    p, r, f, s = precision_recall_fscore_support(labels, probs.argmax(1), labels=np.arange(n), zero_division=0)
    return pd.DataFrame({"class": classes, "precision": p, "recall": r, "f1": f, "auc": aucs, "support": s})


def confused_pairs(labels: np.ndarray, pred: np.ndarray, classes: list[str], fine_to_coarse: list[int],
                   top: int = 20) -> pd.DataFrame:
    """The most frequent (true, predicted) mistakes; ties ordered by class index."""
    wrong = labels != pred
    pairs, counts = np.unique(np.stack([labels[wrong], pred[wrong]], 1), axis=0, return_counts=True)
    if len(pairs) == 0:
        pairs = np.zeros((0, 2), dtype=int)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
    f2c = np.asarray(fine_to_coarse)
    return pd.DataFrame({
        "true": [classes[t] for t in pairs[order, 0]],
        "predicted": [classes[q] for q in pairs[order, 1]],
        "count": counts[order],
        "same_superclass": f2c[pairs[order, 0]] == f2c[pairs[order, 1]],
    })


def predictions_record(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per test image: true, predicted, top-5 labels and the probability of the true class (npz)."""
    top5 = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    return {
        "true": labels.astype(np.int16),
        "pred": top5[:, 0].astype(np.int16),
        "top5": top5.astype(np.int16),
        "p_true": probs[np.arange(len(labels)), labels].astype(np.float32),
    }


def stratified_subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """About n indices with every class equally represented (all of a class if it has fewer)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes]
    return np.sort(np.concatenate(picks))


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA to 50 dimensions first (denoises, and t-SNE's cost grows with dimension), then 2-D t-SNE."""
    x = features.reshape(len(features), -1).astype(np.float32)
    dims = min(50, x.shape[0], x.shape[1])
    x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    perplexity = min(30.0, max(2.0, (len(x) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


@dataclass
class Evaluation:
    metrics: dict[str, float]  # test_* names
    tables: dict[str, pd.DataFrame]  # artifact file name -> table
    predictions: dict[str, np.ndarray]
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact file name -> figure


def evaluate(probs: np.ndarray, labels: np.ndarray, classes: list[str], superclasses: list[str],
             fine_to_coarse: list[int], features: np.ndarray | None = None, feature_labels: np.ndarray | None = None,
             history: list[dict[str, float]] | None = None, seed: int = 0) -> Evaluation:
    """Everything the report shows, and more, for one model on one test set.

    `features` are penultimate-layer features of the images `feature_labels` describe (a subsample).
    """
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    aucs = per_class_auc(probs, labels)
    metrics = {f"test_{k}": v for k, v in classification_metrics(probs, labels, fine_to_coarse, aucs).items()}
    tables = {
        "per_class.csv": per_class_table(probs, labels, classes, aucs),
        "confused_pairs.csv": confused_pairs(labels, pred, classes, fine_to_coarse),
    }
    figures = {
        "confusion_matrix.png": plots.confusion_figure(labels, pred, classes, fine_to_coarse, superclasses),
        "superclass_confusion.png": plots.superclass_confusion_figure(labels, pred, fine_to_coarse, superclasses),
        "roc.png": plots.roc_figure(probs, labels, classes, aucs),
    }
    if features is not None and len(features) >= 5:
        points = tsne_embedding(features, seed)
        figures["tsne.png"] = plots.tsne_figure(points, np.asarray(fine_to_coarse)[feature_labels], superclasses)
    if history:
        figures["training_curves.png"] = plots.training_curves_figure(history)
    return Evaluation(metrics, tables, predictions_record(probs, labels), figures)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, classes: list[str],
                   superclasses: list[str], fine_to_coarse: list[int], batch_size: int = 256, seed: int = 0) -> Evaluation:
    """Evaluate a served model (raw uint8 NCHW images in, probabilities out) on a test split."""
    from .models import penultimate_features

    nhwc = images.permute(0, 2, 3, 1)
    probs = torch.cat([model(x).float() for x in nhwc.split(batch_size)]).numpy()
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ValueError(f"the model outputs {probs.shape[1:]} per image, expected {len(classes)} class probabilities")
    sample = stratified_subsample(labels, TSNE_POINTS, seed)
    features = penultimate_features(model, nhwc[torch.from_numpy(sample)].split(batch_size)).numpy()
    return evaluate(probs.astype(np.float64), labels, classes, superclasses, fine_to_coarse, features, labels[sample], seed=seed)
