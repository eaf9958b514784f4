"""CIFAR-100 on disk: download, verify, read, validate and split (batching lives in pipeline.py).

Pretrained weights live here too: everything the project fetches from disk or network sits in one
module, so offline errors read the same.
"""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.utils import check_integrity, download_and_extract_archive, extract_archive

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER = "cifar-100-python"
SPLIT_FILES = ("train", "test", "meta")
NUM_CLASSES, NUM_SUPERCLASSES = 100, 20
IMAGE_SHAPE = (3, 32, 32)


class DataError(RuntimeError):
    """Data or weights that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64 fine labels, 0..99
    coarse: torch.Tensor  # (N,) int64 superclass labels, 0..19

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "Split":
        i = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.images[i], self.labels[i], self.coarse[i])


@dataclass(frozen=True)
class Cifar100:
    train: Split
    test: Split
    classes: list[str]
    superclasses: list[str]
    digest: str  # content hash of images and labels of both splits
    source: str  # the folder it was read from

    @property
    def fine_to_coarse(self) -> list[int]:
        """Superclass of each fine class, read off the training labels."""
        table = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
        table[self.train.labels] = self.train.coarse
        return table.tolist()


def _offline_message(root: Path, reason: str) -> str:
    return (
        f"CIFAR-100 is not in {root} and could not be downloaded ({reason}). "
        f"Fetch {URL} elsewhere and put {ARCHIVE} or the extracted {FOLDER}/ folder in {root}, "
        f"or point --data-dir / CIFAR_EXP_DATA_DIR at a folder that has it."
    )


def ensure_cifar100(root: Path, download: bool = True) -> Path:
    """Return the extracted `cifar-100-python` folder, extracting or downloading as needed."""
    root = Path(root).expanduser()
    if all((root / f).is_file() for f in SPLIT_FILES):
        return root  # the user pointed at the extracted folder itself
    folder = root / FOLDER
    if folder.is_dir():
        missing = [f for f in SPLIT_FILES if not (folder / f).is_file()]
        if missing:
            raise DataError(f"{folder} lacks {', '.join(missing)}: delete it and extract {ARCHIVE} again")
        return folder
    archive = root / ARCHIVE
    if archive.is_file():
        if not check_integrity(str(archive), ARCHIVE_MD5):
            raise DataError(f"{archive} fails its md5 check ({ARCHIVE_MD5}): partial or corrupt, delete it")
        extract_archive(str(archive), str(root))
        return ensure_cifar100(root, download=False)
    if not root.is_dir() and not download:
        raise DataError(f"data dir {root} does not exist; create it with CIFAR-100 in it, or allow download")
    if not download:
        found = sorted(p.name for p in root.iterdir())[:6]
        raise DataError(f"data dir {root} does not hold CIFAR-100: it needs {FOLDER}/ (with {', '.join(SPLIT_FILES)}) "
                        f"or {ARCHIVE}, and has {found or 'nothing'}; fix the layout or allow download")
    try:
        download_and_extract_archive(URL, str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)
    except (OSError, RuntimeError, tarfile.TarError) as e:  # URLError is an OSError
        raise DataError(_offline_message(root, f"{type(e).__name__}: {e}")) from None
    return ensure_cifar100(root, download=False)


class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR pickles hold only dicts, lists, strings and numpy arrays: refuse anything else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing: extract {ARCHIVE} again") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path} is truncated or corrupt ({e or type(e).__name__}): delete {path.parent} and extract {ARCHIVE} again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-100 pickle (holds {type(obj).__name__}, not a dict)")
    return obj


def _require(path: Path, d: dict, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise DataError(f"{path} is not a CIFAR-100 pickle: missing keys {missing}")


def read_split(folder: Path, name: str) -> Split:
    """Read and validate `train` or `test` into uint8 images and int64 fine and coarse labels."""
    path = Path(folder) / name
    d = _read_pickle(path)
    _require(path, d, ("data", "fine_labels", "coarse_labels"))
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    fine = np.asarray(d["fine_labels"], dtype=np.int64)
    coarse = np.asarray(d["coarse_labels"], dtype=np.int64)
    for key, labels, high in (("fine_labels", fine, NUM_CLASSES), ("coarse_labels", coarse, NUM_SUPERCLASSES)):
        if labels.shape != (len(data),):
            raise DataError(f"{path}: '{key}' has {labels.size} entries for {len(data)} images")
        if labels.size and (labels.min() < 0 or labels.max() >= high):
            raise DataError(f"{path}: '{key}' out of range [0, {high - 1}] (min {labels.min()}, max {labels.max()})")
    images = torch.from_numpy(data.reshape(-1, *IMAGE_SHAPE).copy())
    return Split(images, torch.from_numpy(fine), torch.from_numpy(coarse))


def read_meta(folder: Path) -> tuple[list[str], list[str]]:
    path = Path(folder) / "meta"
    d = _read_pickle(path)
    _require(path, d, ("fine_label_names", "coarse_label_names"))
    fine, coarse = list(d["fine_label_names"]), list(d["coarse_label_names"])
    if len(fine) != NUM_CLASSES or len(coarse) != NUM_SUPERCLASSES:
        raise DataError(f"{path}: expected {NUM_CLASSES} class and {NUM_SUPERCLASSES} superclass names, got {len(fine)} and {len(coarse)}")
    return fine, coarse


def digest(*splits: Split) -> str:
    h = hashlib.sha256()
    for s in splits:
        for t in (s.images, s.labels, s.coarse):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def load_cifar100(root: Path, download: bool = True) -> Cifar100:
    folder = ensure_cifar100(root, download)
    train, test = read_split(folder, "train"), read_split(folder, "test")
    classes, superclasses = read_meta(folder)
    return Cifar100(train, test, classes, superclasses, digest(train, test), str(folder))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/val indices; every class's val share is within one image of val_fraction.

    sklearn's stratified splitters need at least one val image per class, which tiny test sets lack.
    Each image gets a key = (its rank within its class + a per-class offset) / class size, in a
    seeded shuffle; the smallest keys go to val, so every class is cut at the same quantile.
    """
    labels = np.asarray(labels)
    n_val = int(round(len(labels) * val_fraction))
    if not 0 < n_val < len(labels):
        raise DataError(f"val_fraction {val_fraction} leaves an empty split of {len(labels)} images")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    key = np.empty(len(labels))
    for c in np.unique(labels):
        members = order[labels[order] == c]
        key[members] = (np.arange(len(members)) + rng.random()) / len(members)
    ranked = np.argsort(key, kind="stable")
    return np.sort(ranked[n_val:]), np.sort(ranked[:n_val])


def load_images(paths: list[str | Path]) -> np.ndarray:
    """Image files of any size and mode as uint8 RGB (N, 32, 32, 3), the way the models take them."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append(np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC), dtype=np.uint8))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{p} is not a readable image ({type(e).__name__}): use PNG or JPEG files") from None
    return np.stack(out)


# --- pretrained weights -----------------------------------------------------------------------

def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save; `{"state_dict": ...}` and `{"model": ...}` wrappers too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pretrained weights {path} do not exist; pass 'imagenet', 'none' or a state-dict file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise DataError(f"pretrained weights {path} are not a readable state dict ({type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DataError(f"pretrained weights {path} are not a state dict of tensors")
    return obj


def imagenet_resnet18_state() -> dict[str, torch.Tensor]:
    """torchvision's IMAGENET1K_V1 weights, from the torch hub cache or the network."""
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except (OSError, RuntimeError) as e:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise DataError(
            f"ImageNet ResNet-18 weights are not cached at {cache} and could not be downloaded "
            f"({type(e).__name__}). Fetch {weights.url} and put it there, or pass --pretrained PATH "
            f"or --pretrained none"
        ) from None
