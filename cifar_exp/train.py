"""The training loop: plain, explicit, and returning its results. It talks to a Tracker, never to mlflow."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from . import checkpoint as C
from . import data as D
from . import pipeline as P
from .config import ConfigError, TrainConfig
from .evaluate import TSNE_POINTS, evaluate, softmax, stratified_subsample
from .hardware import agreed, all_reduce, amp_dtype, autocast, current, maybe_compile, pick_device, seed_everything
from .models import (
    ImageClassifier, Preprocess, WeightsMismatch, build_model, count_parameters, load_backbone, penultimate_features,
)
from .optim import build_mixer, build_optimizer, build_scheduler

if TYPE_CHECKING:
    from .tracking import Tracker


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # one dict of metrics per epoch
    best_epoch: int
    test_metrics: dict[str, float]  # prefixed test_*
    model: nn.Module  # the best weights, as the served ImageClassifier, on the CPU
    model_uri: str | None = None
    checkpoint_dir: Path | None = None
    extras: dict = field(default_factory=dict)


def build_net(cfg: TrainConfig, num_classes: int = D.NUM_CLASSES) -> nn.Module:
    net = build_model(cfg.model, num_classes, cfg.width, cfg.stem)
    if cfg.model == "resnet18" and cfg.pretrained != "none":
        state = D.imagenet_resnet18_state() if cfg.pretrained == "imagenet" else D.read_state_dict(cfg.pretrained)
        try:
            load_backbone(net, state)
        except WeightsMismatch as e:
            raise D.DataError(f"pretrained {cfg.pretrained}: {e}") from None
    return net


@dataclass
class EpochProgress:
    """Totals of the epoch in progress; a checkpoint taken mid-epoch carries them."""

    batches: int = 0  # optimizer steps done this epoch
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    lr: float | None = None  # the lr at the epoch's first step, the one logged


def train_one_epoch(net, prep, batches, opt, sched, loss_fn, device, cfg: TrainConfig, mixer=None, bar=None,
                    progress: EpochProgress | None = None, should_stop: Callable[[], bool] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> EpochProgress:
    """Train from `progress.batches` to the end of the epoch, or until `should_stop()` after a batch."""
    p = progress or EpochProgress()
    if p.lr is None:
        p.lr = opt.param_groups[0]["lr"]
    net.train()
    start = time.perf_counter()
    # Accumulate on the device: a .item() per batch would sync the GPU every step.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for images, labels in batches.iterate(p.batches):
        x = prep(images)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = labels
        if mixer is not None:
            x, target = mixer(x, labels)  # soft targets; accuracy still counts the original label
        with autocast(device, cfg.amp):
            logits = net(x)
        loss = loss_fn(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():  # fp16 only: scale the loss so small gradients survive
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        p.seen += len(labels)
        p.batches += 1
        if bar is not None:
            bar.update(1)
        if should_stop is not None and should_stop():
            break
    p.loss_sum += loss_sum.item()
    p.correct += int(correct.item())
    p.seconds += time.perf_counter() - start
    if not math.isfinite(p.loss_sum):
        raise FloatingPointError("training loss became NaN or inf; lower --lr")
    return p


@torch.no_grad()
def predict_logits(net, prep, batches, device, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    outs, labels = [], []
    for images, y in batches:
        with autocast(device, cfg.amp):
            outs.append(net(prep(images)).float().cpu())
        labels.append(y.cpu())
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def _val_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    t = torch.from_numpy(logits)
    y = torch.from_numpy(labels)
    top5 = t.topk(min(5, t.shape[1]), dim=1).indices
    return {
        "val_loss": nn.functional.cross_entropy(t, y).item(),
        "val_accuracy": (top5[:, 0] == y).float().mean().item(),
        "val_top5_accuracy": (top5 == y[:, None]).any(1).float().mean().item(),
    }


def _progress(total: int, done: int, desc: str):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=desc, leave=False, dynamic_ncols=True)


@dataclass
class Prepared:
    """Everything that can fail on bad input, done before any run is created."""

    data: D.Cifar100
    train: D.Split
    val: D.Split
    net: nn.Module


def prepare(cfg: TrainConfig, data: D.Cifar100 | None = None) -> Prepared:
    """Load data and weights and check they fit the config; raises DataError or ConfigError."""
    seed_everything(cfg.seed, cfg.deterministic)  # before the net exists, so its init is seeded
    data = data or D.load_cifar100(cfg.data_path, cfg.download)
    train_idx, val_idx = D.stratified_split(data.train.labels.numpy(), cfg.val_fraction, cfg.seed)
    train, val = data.train.subset(train_idx), data.train.subset(val_idx)
    if cfg.batch_size > len(train):
        raise ConfigError(f"batch_size: {cfg.batch_size} is larger than the training split ({len(train)} images)")
    return Prepared(data, train, val, build_net(cfg))


class Interrupted(KeyboardInterrupt):
    """Training stopped on request (SIGINT/SIGTERM) after saving a checkpoint to resume from."""


def run(cfg: TrainConfig, tracker: "Tracker", prepared: Prepared | None = None, workdir: Path | None = None,
        resume: dict | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train (or continue the checkpoint `resume`), test the best epoch, and report it all to `tracker`.

    Checkpoints go to `workdir`/checkpoints after every epoch. When `should_stop()` turns true, the
    current batch finishes, a checkpoint is saved and `Interrupted` is raised. Under torchrun every
    rank trains on its shard; only rank 0 writes checkpoints, reports and tests.
    """
    p = prepared or prepare(cfg)
    data, train_split, val_split = p.data, p.train, p.val
    device = pick_device(cfg.device)
    dist = current()
    if dist.world > 1 and should_stop is not None:
        should_stop = agreed(should_stop, device)
    if resume is None:
        tracker.log_dataset(data, {"train": train_split, "validation": val_split, "test": data.test})

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    net = p.net.to(device)
    if cfg.channels_last:  # NHWC convolutions: faster on CUDA tensor cores and, measured here, on CPU too
        net = net.to(memory_format=torch.channels_last)
    # `model` runs the steps (DDP across ranks, compiled); `net` holds the weights that are saved.
    model = net
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    model = maybe_compile(model, cfg)
    evaluator = model if dist.world == 1 else net  # ranks evaluate alone: no collective calls there
    prep = Preprocess(cfg.image_size).to(device)
    batches = partial(P.make_batches, device=device, seed=cfg.seed, loader=cfg.loader, workers=cfg.workers,
                      rank=dist.rank, world=dist.world)
    train_batches = batches(train_split, cfg.batch_size, train=True)
    val_batches = batches(val_split, cfg.batch_size * 2, train=False)
    opt = build_optimizer(net, cfg, dist.world)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device, cfg.amp) == torch.float16)
    sched = build_scheduler(opt, cfg, len(train_batches))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    mixer = build_mixer(cfg)

    ckpt_dir = Path(workdir or tempfile.mkdtemp(prefix="cifar_exp-")) / C.FOLDER
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    next_epoch, progress, history, best_acc, best_epoch = 0, EpochProgress(), [], -1.0, -1
    if resume is not None:
        sched = C.restore(resume, net, opt, sched, cfg.epochs, lambda: build_scheduler(opt, cfg, len(train_batches)))
        if resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        next_epoch, progress, history = resume["next_epoch"], EpochProgress(**resume["progress"]), list(resume["history"])
        if not dist.main:  # the saved totals are global already; the sum over ranks must count them once
            progress = EpochProgress(batches=progress.batches, lr=progress.lr)
        best_acc, best_epoch = resume["best_val_accuracy"], resume["best_epoch"]
        logged = tracker.logged_steps()
        for step, m in enumerate(history):  # a kill between checkpoint and log_metrics leaves one unlogged
            if step not in logged:
                tracker.log_metrics(m, step=step)

    def save_last(next_epoch: int) -> None:
        C.save(ckpt_dir / C.LAST, config=cfg.model_dump(mode="json"), next_epoch=next_epoch, progress=asdict(progress),
               model=net.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), rng=C.rng_state(),
               scaler=scaler.state_dict(),
               history=history, best_val_accuracy=best_acc, best_epoch=best_epoch)

    train_start = time.perf_counter()
    for epoch in range(next_epoch, cfg.epochs):
        train_batches.set_epoch(epoch)
        bar = _progress(len(train_batches), progress.batches, f"epoch {epoch + 1}/{cfg.epochs}")
        progress = train_one_epoch(model, prep, train_batches, opt, sched, loss_fn, device, cfg, mixer, bar,
                                   progress, should_stop, scaler)
        if bar is not None:
            bar.close()
        if dist.world > 1:  # every rank saw its own shard: the epoch's totals are the sums
            loss_sum, correct, seen = all_reduce([progress.loss_sum, progress.correct, progress.seen], device)
            progress = replace(progress, loss_sum=loss_sum, correct=int(correct), seen=int(seen),
                               seconds=all_reduce([progress.seconds], device, "max")[0])
        if progress.batches < len(train_batches):  # stopped mid-epoch: keep the partial epoch too
            if dist.main:
                save_last(epoch)
                tracker.log_checkpoint(ckpt_dir / C.LAST)
            raise Interrupted(f"stopped in epoch {epoch + 1}/{cfg.epochs} after batch {progress.batches}/{len(train_batches)}")
        metrics = {
            "train_loss": progress.loss_sum / progress.seen, "train_accuracy": progress.correct / progress.seen,
            **_val_metrics(*predict_logits(evaluator, prep, val_batches, device, cfg)),
            "lr": progress.lr, "epoch_seconds": progress.seconds, "images_per_second": progress.seen / progress.seconds,
            "train_images": progress.seen,
        }
        history.append(metrics)
        improved = metrics["val_accuracy"] > best_acc
        if improved:
            best_acc, best_epoch = metrics["val_accuracy"], epoch
            if dist.main:
                C.save(ckpt_dir / C.BEST, epoch=epoch, config=cfg.model_dump(mode="json"), model=net.state_dict())
        progress = EpochProgress()
        if dist.main:
            save_last(epoch + 1)
            # Logged after the checkpoint is saved, so no epoch is ever logged twice (resume logs what is missing).
            tracker.log_metrics(metrics, step=epoch)
            for name in ([C.BEST] if improved else []) + [C.LAST]:
                tracker.log_checkpoint(ckpt_dir / name)
            print(f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
        if should_stop is not None and should_stop():  # every rank asks: under torchrun it is a collective call
            raise Interrupted(f"stopped after epoch {epoch + 1}/{cfg.epochs}")

    if not dist.main:
        return TrainResult(history, best_epoch, {}, net)
    net.load_state_dict(C.load(ckpt_dir / C.BEST, device)["model"])
    test_batches = batches(data.test, cfg.batch_size * 2, train=False)
    logits, labels = predict_logits(evaluator, prep, test_batches, device, cfg)
    probs = softmax(logits)
    sample = stratified_subsample(labels, TSNE_POINTS, cfg.seed)
    images = data.test.images[torch.from_numpy(sample)].to(device)
    net.eval()
    with autocast(device, cfg.amp):
        features = penultimate_features(nn.Sequential(prep, net), images.split(cfg.batch_size * 2)).numpy()
    ev = evaluate(probs, labels, data.classes, data.superclasses, data.fine_to_coarse,
                  features, labels[sample], history, cfg.seed)
    test = {**ev.metrics, "best_epoch": float(best_epoch), "training_seconds": sum(h["epoch_seconds"] for h in history),
            "wall_seconds": time.perf_counter() - train_start, "parameter_count": float(count_parameters(net))}
    served = ImageClassifier(net.to("cpu", memory_format=torch.contiguous_format), cfg.image_size).eval()
    uri = None
    if cfg.log_model:
        uri = tracker.log_model(served, data.test.images[:2].permute(0, 2, 3, 1).numpy(), _model_metadata(cfg, data))
    tracker.log_evaluation(ev)
    tracker.log_summary(test)
    print("test " + " ".join(f"{k}={v:.4g}" for k, v in test.items()), flush=True)
    return TrainResult(history, best_epoch, test, served, uri, ckpt_dir,
                       {"test_logits": logits, "test_labels": labels, "evaluation": ev})


def _model_metadata(cfg: TrainConfig, data: D.Cifar100) -> dict:
    """Travels inside the MLmodel file, so predictions turn into names without the dataset."""
    return {
        "cifar_exp_model": cfg.model,
        "input": "uint8 RGB images, shape (N, 32, 32, 3)",
        "output": f"probabilities, shape (N, {len(data.classes)})",
        "class_names": data.classes,
        "superclass_names": data.superclasses,
        "fine_to_coarse": data.fine_to_coarse,
        "input_size": cfg.image_size,
        "dataset_digest": data.digest,
    }
