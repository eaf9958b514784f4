"""Training throughput in one process, on CIFAR-sized synthetic data.

(a) pure model steps on one pre-loaded, pre-normalized batch (the ceiling);
(b) our full epoch: device-resident batches, per-batch crop/flip/normalize, and the epoch's
    metrics sent through a real MLflow tracker (sqlite, asynchronous) and flushed;
(c) our DataLoader path (--loader dataloader): the same batches, streamed by DataLoader workers;
(d) the usual torchvision pipeline: a PIL Dataset with transforms and a DataLoader.

Prints images/s for each and the ratios to (b).
Usage: python benchmarks/throughput.py [--model cnn|resnet18] [--images 10000] [--width 64] [--workers 0]
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
from cifar_exp import pipeline as P
from cifar_exp import train as T
from cifar_exp.config import TrainConfig
from cifar_exp.hardware import autocast
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
    dev = T.pick_device(cfg.device)
    net = build_model(cfg.model, width=cfg.width).to(dev, memory_format=torch.channels_last)  # as train.run does
    opt = T.build_optimizer(net, cfg)
    return net, opt, T.build_scheduler(opt, cfg, 10**6 // cfg.epochs)


def warm_up(net, opt, sched, x, y, n: int = 3) -> None:
    """First calls allocate buffers and pick kernels; keep them out of every timing."""
    for _ in range(n):
        step(net, opt, sched, x, y)


def step(net, opt, sched, x, y) -> None:
    with autocast(x.device, True):  # as the loop runs it: bf16 on CUDA, full precision elsewhere
        logits = net(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def report(name: str, seconds: float, images: int) -> None:
    print(f"{name:38s} {seconds:7.2f} s  {images / seconds:8.1f} img/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--model", choices=["cnn", "resnet18"], default="cnn")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    ap.add_argument("--input-size", type=int, default=32, help="resnet18: the side it trains at (224 on a GPU)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for (c) and (d); this box has 2 cores")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every mode; the fastest of each counts")
    args = ap.parse_args()
    cfg = TrainConfig(model=args.model, width=args.width, batch_size=args.batch_size, device=args.device, warmup_epochs=0,
                      pretrained="none", input_size=args.input_size if args.model == "resnet18" else 32)
    dev = T.pick_device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n, bs = args.images, args.batch_size
    steps = n // bs
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, n)
    split = D.Split(torch.from_numpy(nhwc).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                    torch.from_numpy(labels % 20))
    # (a) gets the data already normalized, in order, in the layout the loop feeds (channels_last)
    prep = Preprocess(cfg.image_size).to(dev)
    floats = prep(split.images[: 4 * args.batch_size].to(dev)).contiguous(memory_format=torch.channels_last)
    what = f"cnn width {args.width}" if args.model == "cnn" else f"resnet18 at {cfg.image_size} px"
    print(f"{dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {what}, "
          f"{n} images, batch {bs}, {steps} steps per mode, best of {args.repeats}", flush=True)
    labels_dev = split.labels.to(dev)
    x, y = floats[:bs], labels_dev[:bs]
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = DataLoader(PilCifar(nhwc, labels), batch_size=bs, shuffle=True, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0)

    def pure() -> None:
        net, opt, sched = fresh(cfg)
        warm_up(net, opt, sched, x, y)
        t = time.perf_counter()
        for i in range(steps):  # a fixed set of 4 pre-normalized batches, cycled: no data work at all
            j = i % 4
            step(net, opt, sched, floats[j * bs : (j + 1) * bs], labels_dev[j * bs : (j + 1) * bs])
        sync()
        return time.perf_counter() - t

    def ours(tracker, loader: str = "device") -> float:
        net, opt, sched = fresh(cfg)
        warm_up(net, opt, sched, x, y)
        batches = P.make_batches(split, bs, dev, train=True, seed=0, loader=loader, workers=args.workers)
        t = time.perf_counter()
        stats = T.train_one_epoch(net, prep, batches, opt, sched, loss_fn, dev, cfg)
        tracker.log_metrics({"train_loss": stats.loss_sum / stats.seen}, step=0)
        mlflow.flush_async_logging()
        return time.perf_counter() - t

    def loader_only() -> float:
        batches = P.DeviceBatches(split, bs, dev, train=True, seed=0)
        t = time.perf_counter()
        for images, _ in batches:
            prep(images)
        sync()
        return time.perf_counter() - t

    def classic() -> float:
        net, opt, sched = fresh(cfg)
        warm_up(net, opt, sched, x, y)
        t = time.perf_counter()
        for xb, yb in loader:
            xb = torch.nn.functional.interpolate(xb.to(dev), size=cfg.image_size) if cfg.image_size != 32 else xb.to(dev)
            step(net, opt, sched, xb.contiguous(memory_format=torch.channels_last), yb.to(dev))
        sync()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": [], "l": []}
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/bench.db")
        mlflow.set_experiment("bench")
        with mlflow.start_run() as run:
            tracker = MlflowTracker(run.info.run_id, "bench")
            for r in range(args.repeats):  # interleaved, so a slow spell of the machine hits every mode
                times["a"].append(pure())
                times["b"].append(ours(tracker))
                times["c"].append(ours(tracker, "dataloader"))
                times["d"].append(classic())
                times["l"].append(loader_only())
                print(f"round {r + 1}: " + "  ".join(f"({k}) {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    a, b, c, d, l = (min(times[k]) for k in "abcdl")
    seen = steps * bs
    report("(l) device-resident loader alone", l, seen)
    report("(a) pure model steps", a, seen)
    report("(b) our epoch, device-resident + tracking", b, seen)
    report(f"(c) our epoch, DataLoader({args.workers} workers)", c, seen)
    report(f"(d) PIL + DataLoader({args.workers} workers)", d, seen)
    print(f"(b)/(a) time = {b / a:.3f}   (target <= 1.05)")
    print(f"(c)/(b) time = {c / b:.3f}   (d)/(b) time = {d / b:.3f}")


if __name__ == "__main__":
    main()
