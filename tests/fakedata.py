"""Synthetic CIFAR-100 in the real on-disk format (`cifar-100-python/{train,test,meta}` pickles)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CLASSES = [f"class_{i:02d}" for i in range(100)]
SUPERCLASSES = [f"super_{i:02d}" for i in range(20)]
FINE_TO_COARSE = [i % 20 for i in range(100)]  # class c belongs to superclass c mod 20


def make_images(labels: np.ndarray, seed: int, noise: int = 40) -> np.ndarray:
    """Each class is a fixed random 4x4 colour pattern scaled up to 32x32, plus noise: learnable."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(12345).integers(0, 256, (100, 3, 4, 4))
    base = patterns[labels].repeat(8, axis=2).repeat(8, axis=3)
    images = base + rng.integers(-noise, noise + 1, base.shape)
    return np.clip(images, 0, 255).astype(np.uint8).reshape(len(labels), -1)


def write_split(path: Path, labels: np.ndarray, seed: int, **overrides) -> None:
    d = {
        "filenames": [f"img_{i}.png" for i in range(len(labels))],
        "batch_label": "synthetic",
        "fine_labels": labels.tolist(),
        "coarse_labels": [FINE_TO_COARSE[c] for c in labels],
        "data": make_images(labels, seed),
    }
    d.update(overrides)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)


def write_fake_cifar100(root: Path, train_per_class: int = 4, test_per_class: int = 1, classes: int = 100) -> Path:
    """Write the three pickles under root/cifar-100-python and return that folder."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    write_split(folder / "train", np.repeat(np.arange(classes), train_per_class), seed=1)
    write_split(folder / "test", np.repeat(np.arange(classes), test_per_class), seed=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": CLASSES, "coarse_label_names": SUPERCLASSES}, f, protocol=2)
    return folder
