"""Evaluation cost on a CIFAR-100-sized test set, model inference excluded.

10k predictions x 100 classes and 2,000 x 512 penultimate features (synthetic, with class structure):
time every metric, table and figure, including writing the PNGs. Target: <= 30 s on 2 CPU cores.
Usage: python benchmarks/evaluation_speed.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from cifar_exp.evaluate import TSNE_POINTS, evaluate, softmax, stratified_subsample


def main() -> None:
    rng = np.random.default_rng(0)
    n, k = 10_000, 100
    labels = np.repeat(np.arange(k), n // k)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += rng.normal(3, 1.5, n)  # roughly 70% top-1
    centers = rng.normal(0, 3, (k, 512))
    sample = stratified_subsample(labels, TSNE_POINTS, 0)
    features = centers[labels[sample]] + rng.normal(0, 1, (len(sample), 512))
    classes = [f"class_{i}" for i in range(k)]
    supers = [f"super_{i}" for i in range(20)]
    f2c = [i % 20 for i in range(k)]
    history = [{"train_loss": 4 - e / 10, "val_loss": 4 - e / 12, "train_accuracy": e / 40, "val_accuracy": e / 45}
               for e in range(30)]

    t0 = time.perf_counter()
    probs = softmax(logits)
    ev = evaluate(probs, labels, classes, supers, f2c, features, labels[sample], history)
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fig in ev.figures.items():
            fig.savefig(Path(tmp) / name)
            plt.close(fig)
        for name, table in ev.tables.items():
            table.to_csv(Path(tmp) / name, index=False)
        np.savez_compressed(Path(tmp) / "predictions.npz", **ev.predictions)
    t2 = time.perf_counter()
    print(f"metrics, tables, t-SNE and figures computed: {t1 - t0:6.2f} s")
    print(f"PNG / CSV / npz files written:               {t2 - t1:6.2f} s")
    print(f"total: {t2 - t0:.2f} s (target <= 30 s); test_accuracy={ev.metrics['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()
