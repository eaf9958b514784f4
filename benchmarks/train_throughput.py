"""Training throughput in one process, on CIFAR-sized synthetic data.

(a) pure model steps on one pre-loaded, pre-normalized batch (the ceiling);
(b) our full epoch: device-resident batches, per-batch crop/flip/normalize, and the epoch's
    metrics sent through a real MLflow tracker (sqlite, asynchronous) and flushed;
(c) the usual torchvision pipeline: a PIL Dataset with transforms and a DataLoader.

Prints images/s for each and the ratios (b)/(a) time and (c)/(b) time.
Usage: python benchmarks/train_throughput.py [--images 10000] [--width 64] [--workers 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifar_exp import data as D
from cifar_exp import train as T
from cifar_exp.config import TrainConfig
from cifar_exp.models import MEAN, STD, Preprocess, build_model
from cifar_exp.tracking import MlflowTracker, mlflow


class PilCifar(Dataset):
    """What torchvision.datasets.CIFAR100 does per sample: a PIL image, then transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.tf = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(Image.fromarray(self.images[i])), int(self.labels[i])


def fresh(cfg: TrainConfig):
    torch.manual_seed(0)
    net = build_model("cnn", width=cfg.width).to(memory_format=torch.channels_last)  # as train.run does
    opt = T.build_optimizer(net, cfg)
    return net, opt, T.build_scheduler(opt, cfg, 10**6 // cfg.epochs)


def warm_up(net, opt, sched, x, y, n: int = 3) -> None:
    """First calls allocate buffers and pick kernels; keep them out of every timing."""
    for _ in range(n):
        step(net, opt, sched, x, y)


def step(net, opt, sched, x, y) -> None:
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def report(name: str, seconds: float, images: int) -> None:
    print(f"{name:38s} {seconds:7.2f} s  {images / seconds:8.1f} img/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for (c); this box has 2 cores")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (a), (b), (c); the fastest of each counts")
    args = ap.parse_args()
    cfg = TrainConfig(width=args.width, batch_size=args.batch_size, device="cpu", warmup_epochs=0)
    n, bs = args.images, args.batch_size
    steps = n // bs
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, n)
    split = D.Split(torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                    torch.from_numpy(labels % 20))
    # (a) gets the data already normalized, in order, in the layout the loop feeds (channels_last)
    floats = Preprocess(32)(split.images).contiguous(memory_format=torch.channels_last)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cnn width {args.width}, "
          f"{n} images, batch {bs}, {steps} steps per mode, best of {args.repeats}", flush=True)
    x, y = floats[:bs], split.labels[:bs]
    prep, loss_fn, cpu = Preprocess(32), torch.nn.CrossEntropyLoss(), torch.device("cpu")
    loader = DataLoader(PilCifar(nhwc, labels), batch_size=bs, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)

    def pure() -> None:
        net, opt, sched = fresh(cfg)
        warm_up(net, opt, sched, x, y)
        t = time.perf_counter()
        for i in range(steps):
            step(net, opt, sched, floats[i * bs : (i + 1) * bs], split.labels[i * bs : (i + 1) * bs])
        return time.perf_counter() - t

    def ours(tracker) -> float:
        net, opt, sched = fresh(cfg)
        warm_up(net, opt, sched, x, y)
        batches = D.DeviceBatches(split, bs, cpu, train=True, seed=0)
        t = time.perf_counter()
        stats = T.train_one_epoch(net, prep, batches, opt, sched, loss_fn, cpu, cfg)
        tracker.log_metrics({"train_loss": stats["train_loss"]}, step=0)
        mlflow.flush_async_logging()
        return time.perf_counter() - t

    def classic() -> float:
        net, opt, sched = fresh(cfg)
        warm_up(net, opt, sched, x, y)
        t = time.perf_counter()
        for xb, yb in loader:
            step(net, opt, sched, xb, yb)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
        mlflow.set_experiment("bench")
        with mlflow.start_run() as run:
            tracker = MlflowTracker(run.info.run_id, "bench")
            for r in range(args.repeats):  # interleaved, so a slow spell of the machine hits every mode
                times["a"].append(pure())
                times["b"].append(ours(tracker))
                times["c"].append(classic())
                print(f"round {r + 1}: " + "  ".join(f"({k}) {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    a, b, c = (min(times[k]) for k in "abc")
    seen = steps * bs
    report("(a) pure model steps", a, seen)
    report("(b) our epoch + tracking", b, seen)
    report(f"(c) PIL + DataLoader({args.workers} workers)", c, seen)
    print(f"(b)/(a) time = {b / a:.3f}   (target <= 1.05)")
    print(f"(c)/(b) time = {c / b:.3f}")


if __name__ == "__main__":
    main()
