import hashlib
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakedata import CLASSES, FINE_TO_COARSE, SUPERCLASSES, make_images, write_fake_cifar100, write_split

from cifar_exp import data as D
from cifar_exp import pipeline as P


def test_loader_shapes_dtypes_labels_and_names(data_root):
    ds = D.load_cifar100(data_root, download=False)
    assert ds.train.images.shape == (400, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (100, 3, 32, 32)
    assert ds.train.labels.dtype == torch.int64 and ds.train.coarse.dtype == torch.int64
    assert ds.classes == CLASSES and ds.superclasses == SUPERCLASSES
    assert ds.fine_to_coarse == FINE_TO_COARSE
    assert torch.equal(ds.train.coarse, torch.tensor(FINE_TO_COARSE)[ds.train.labels])
    # Pixels land where the pickle row says: channel-first 3072 bytes per image.
    row = make_images(np.repeat(np.arange(100), 4), seed=1)[5]
    assert torch.equal(ds.train.images[5].flatten(), torch.from_numpy(row))
    assert ds.source.endswith("cifar-100-python") and len(ds.digest) == 16


def test_accepts_the_extracted_folder_itself(data_root):
    assert D.ensure_cifar100(data_root / "cifar-100-python", download=False) == data_root / "cifar-100-python"


def test_digest_depends_on_content(tmp_path, data_root):
    a = D.load_cifar100(data_root, download=False).digest
    write_fake_cifar100(tmp_path, train_per_class=4, test_per_class=1)
    assert D.load_cifar100(tmp_path, download=False).digest == a
    write_split(tmp_path / "cifar-100-python" / "test", np.repeat(np.arange(100), 1), seed=99)
    assert D.load_cifar100(tmp_path, download=False).digest != a


def test_offline_without_data_names_url_and_place(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(D, "download_and_extract_archive", offline)
    with pytest.raises(D.DataError) as e:
        D.ensure_cifar100(tmp_path, download=True)
    msg = str(e.value)
    assert D.URL in msg and "cifar-100-python.tar.gz" in msg and str(tmp_path) in msg and "URLError" in msg


def test_download_off_and_missing_dir(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.ensure_cifar100(tmp_path / "nope", download=False)
    (tmp_path / "cifar100").mkdir()  # extracted under another name, one level too deep
    with pytest.raises(D.DataError, match=r"does not hold CIFAR-100: it needs cifar-100-python/ \(with train, "
                                          r"test, meta\) or cifar-100-python.tar.gz, and has \['cifar100'\]"):
        D.ensure_cifar100(tmp_path, download=False)


def _make_archive(tmp_path):
    src = tmp_path / "src"
    write_fake_cifar100(src, train_per_class=2, test_per_class=1)
    dest = tmp_path / "dest"
    dest.mkdir()
    archive = dest / D.ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    return dest, hashlib.md5(archive.read_bytes()).hexdigest()


def test_local_archive_is_md5_checked_then_extracted(tmp_path, monkeypatch):
    dest, md5 = _make_archive(tmp_path)
    with pytest.raises(D.DataError, match="md5"):
        D.ensure_cifar100(dest, download=False)  # the real md5 does not match our fake archive
    monkeypatch.setattr(D, "ARCHIVE_MD5", md5)
    folder = D.ensure_cifar100(dest, download=False)
    assert folder == dest / "cifar-100-python" and len(D.read_split(folder, "train")) == 200


def test_missing_file_in_folder(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(D.DataError, match="lacks meta"):
        D.ensure_cifar100(tmp_path, download=False)


def test_truncated_pickle(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    blob = (folder / "train").read_bytes()
    (folder / "train").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(D.DataError, match="truncated or corrupt"):
        D.load_cifar100(tmp_path, download=False)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"fine_labels": [100] * 400}, r"'fine_labels' out of range \[0, 99\]"),
        ({"coarse_labels": [-1] * 400}, r"'coarse_labels' out of range \[0, 19\]"),
        ({"fine_labels": [0] * 10}, "'fine_labels' has 10 entries for 400 images"),
        ({"data": np.zeros((400, 100), np.uint8)}, r"must be uint8 \(N, 3072\)"),
        ({"data": np.zeros((400, 3072), np.float32)}, r"must be uint8 \(N, 3072\)"),
    ],
)
def test_structure_is_validated(tmp_path, overrides, fragment):
    folder = write_fake_cifar100(tmp_path)
    write_split(folder / "train", np.repeat(np.arange(100), 4), seed=1, **overrides)
    with pytest.raises(D.DataError, match=fragment):
        D.read_split(folder, "train")


def test_missing_keys_and_wrong_meta(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    with open(folder / "train", "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8)}, f)
    with pytest.raises(D.DataError, match="missing keys"):
        D.read_split(folder, "train")
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["a"], "coarse_label_names": []}, f)
    with pytest.raises(D.DataError, match="expected 100 class and 20 superclass names"):
        D.read_meta(folder)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_code_are_refused(tmp_path):
    folder = write_fake_cifar100(tmp_path)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": _Evil()}, f)
    with pytest.raises(D.DataError, match="unexpected object builtins.print"):
        D.read_meta(folder)


def test_split_is_stratified_deterministic_and_disjoint():
    labels = np.repeat(np.arange(100), 10)
    tr, va = D.stratified_split(labels, 0.1, seed=0)
    assert len(va) == 100 and len(tr) == 900
    assert np.array_equal(np.bincount(labels[va], minlength=100), np.ones(100))
    assert set(tr).isdisjoint(va) and len(set(tr) | set(va)) == 1000
    tr2, va2 = D.stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(va, va2) and np.array_equal(tr, tr2)
    assert not np.array_equal(va, D.stratified_split(labels, 0.1, seed=1)[1])


def test_split_with_uneven_classes_is_within_one_image():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 1003)
    _, va = D.stratified_split(labels, 0.25, seed=3)
    counts, sizes = np.bincount(labels[va], minlength=7), np.bincount(labels, minlength=7)
    assert len(va) == round(1003 * 0.25)
    assert np.all(np.abs(counts - sizes * 0.25) <= 1.0 + 1e-9)


def _position_image() -> torch.Tensor:
    """Channel 0 holds row+1, channel 1 column+1, so any crop or flip can be read back."""
    rows = torch.arange(1, 33).view(32, 1).expand(32, 32)
    cols = torch.arange(1, 33).view(1, 32).expand(32, 32)
    return torch.stack([rows, cols, torch.full((32, 32), 7)]).to(torch.uint8)


def test_crop_and_flip_do_what_they_claim():
    img = _position_image()
    out = P.random_crop_flip(img.expand(400, 3, 32, 32).contiguous(), torch.Generator().manual_seed(0))
    assert out.shape == (400, 3, 32, 32) and out.dtype == torch.uint8
    # Every legal outcome of RandomCrop(32, padding=4) + HorizontalFlip; each is unique on this image.
    padded = F.pad(img, (4, 4, 4, 4))
    candidates = {}
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy : dy + 32, dx : dx + 32]
            candidates[(dy, dx, False)], candidates[(dy, dx, True)] = crop, crop.flip(2)
    outcomes = []
    for o in out:
        matches = [k for k, c in candidates.items() if torch.equal(o, c)]
        assert len(matches) == 1
        outcomes.append(matches[0])
    assert {f for *_, f in outcomes} == {True, False}
    assert len({(dy, dx) for dy, dx, _ in outcomes}) > 60  # of 81 offsets
    assert 150 < sum(f for *_, f in outcomes) < 250  # p = 0.5


def test_augmentation_is_seeded():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = P.random_crop_flip(x, torch.Generator().manual_seed(1))
    b = P.random_crop_flip(x, torch.Generator().manual_seed(1))
    c = P.random_crop_flip(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_device_batches_cover_each_epoch_and_repeat_per_seed(data_root):
    split = D.load_cifar100(data_root, download=False).train
    batches = P.DeviceBatches(split, 64, torch.device("cpu"), train=True, seed=0)
    assert len(batches) == 400 // 64
    labels = torch.cat([y for _, y in batches])
    assert len(labels) == 6 * 64 and len(set(labels.tolist())) > 90
    first = [x.clone() for x, _ in batches]
    again = [x for x, _ in P.DeviceBatches(split, 64, torch.device("cpu"), train=True, seed=0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    batches.set_epoch(1)
    assert not torch.equal(first[0], next(iter(batches))[0])
    evals = P.DeviceBatches(split, 64, torch.device("cpu"), train=False)
    assert len(evals) == 7 and torch.equal(torch.cat([x for x, _ in evals]), split.images)


def test_state_dict_file_errors(tmp_path):
    with pytest.raises(D.DataError, match="do not exist"):
        D.read_state_dict(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(D.DataError, match="not a readable state dict"):
        D.read_state_dict(bad)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, wrapped)
    assert torch.equal(D.read_state_dict(wrapped)["w"], torch.ones(2))


def test_imagenet_weights_offline_error(monkeypatch, tmp_path):
    from torchvision.models import ResNet18_Weights

    def offline(self, *a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(D.DataError) as e:
        D.imagenet_resnet18_state()
    assert "resnet18-f37072fd.pth" in str(e.value) and str(tmp_path / "checkpoints") in str(e.value)
