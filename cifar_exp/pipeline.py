"""Training batches: shuffled, cropped and flipped per batch on the training device.

Two paths give the very same batches for a seed: `DeviceBatches` keeps the whole uint8 split on the
device (airbench-style: no workers, no PIL; the default), `LoaderBatches` streams it from pinned host
memory through a DataLoader, for data that does not fit on the device. Both draw the shuffle and the
crops of epoch e from one CPU generator seeded by (seed, e), so a resumed run sees the same batches
as an uninterrupted one, on any device.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from .data import Split

CROP_PADDING = 4  # pixels, RandomCrop(32, padding=4)


def _crop_flip_draws(b: int, generator: torch.Generator, pad: int = CROP_PADDING):
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator)
    flip = torch.rand(b, 1, generator=generator) < 0.5
    return dy, dx, flip


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = CROP_PADDING) -> torch.Tensor:
    """RandomCrop(size, padding=pad) and RandomHorizontalFlip, drawn per image, as one gather.

    The draws come from a CPU generator (a few bytes per image) and the gather runs where the images
    are. Works on uint8 so the batch moves a quarter of the bytes; the result is NHWC-strided (the
    layout channels_last wants), call .contiguous() for NCHW.
    """
    b, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy, dx, flip = (t.to(dev, non_blocking=True) for t in _crop_flip_draws(b, generator, pad))
    rows = dy + torch.arange(h, device=dev)
    cols = dx + torch.arange(w, device=dev)
    cols = torch.where(flip, cols.flip(1), cols)  # reading columns backwards is the flip
    batch = torch.arange(b, device=dev)[:, None, None]
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class _Batches:
    """The epoch plan both paths share: one permutation per epoch, full batches only when training."""

    def __init__(self, n: int, batch_size: int, device: torch.device, *, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.device, self.train, self.seed, self.epoch = n, batch_size, device, train, seed, 0
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return (self.n // self.world) // self.batch_size if self.train else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def _plan(self, start: int) -> tuple[list[torch.Tensor], torch.Generator | None]:
        """Index batches from `start` on, and the generator positioned for batch `start`'s crops."""
        bs = self.batch_size
        if not self.train:
            return list(torch.arange(self.n).split(bs))[start:], None
        key = self.seed * 100_003 + self.epoch
        g = torch.Generator().manual_seed(key)
        perm = torch.randperm(self.n, generator=g)
        if self.world > 1:  # DistributedSampler's split: each rank a disjoint, equal share of the one permutation
            perm = perm[: (self.n // self.world) * self.world][self.rank :: self.world]
            g = torch.Generator().manual_seed(key * 1_000 + self.rank)  # and crops of its own
        for _ in range(start):  # a resumed epoch: draw what the skipped batches drew, so the rest match
            _crop_flip_draws(bs, g)
        return [perm[i * bs : (i + 1) * bs] for i in range(start, len(self))], g  # drop_last: full batches

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class DeviceBatches(_Batches):
    """The split lives on the device; each batch is a gather there."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, *, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1):
        super().__init__(len(split), batch_size, device, train=train, seed=seed, rank=rank, world=world)
        self.images = split.images.to(device, non_blocking=True)
        self.labels = split.labels.to(device, non_blocking=True)

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches from batch `start` on, exactly as a full pass would yield them."""
        batches, g = self._plan(start)
        for idx in batches:
            if g is None:  # evaluation: consecutive images, a view and no copy
                yield self.images[idx[0] : idx[-1] + 1], self.labels[idx[0] : idx[-1] + 1]
                continue
            idx = idx.to(self.device, non_blocking=True)
            yield random_crop_flip(self.images[idx], g), self.labels[idx]


class LoaderBatches(_Batches):
    """The classic path: DataLoader workers gather batches in host memory, pinned for the copy."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, *, train: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, workers: int = 2):
        super().__init__(len(split), batch_size, device, train=train, seed=seed, rank=rank, world=world)
        self.dataset = TensorDataset(split.images, split.labels)
        self.workers = workers

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches, g = self._plan(start)
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG, and the
        # model's dropout and MixUp draws would then differ from the device path's.
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in batches], num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(self.seed))
        for images, labels in loader:
            images = images.to(self.device, non_blocking=True)
            yield (images if g is None else random_crop_flip(images, g)), labels.to(self.device, non_blocking=True)


def make_batches(split: Split, batch_size: int, device: torch.device, *, train: bool, seed: int = 0,
                 loader: str = "device", workers: int = 2, rank: int = 0, world: int = 1) -> _Batches:
    """Training batches are this rank's shard under torchrun; evaluation batches cover the whole split."""
    if not train:
        rank, world = 0, 1
    if loader == "dataloader":
        return LoaderBatches(split, batch_size, device, train=train, seed=seed, rank=rank, world=world, workers=workers)
    return DeviceBatches(split, batch_size, device, train=train, seed=seed, rank=rank, world=world)
