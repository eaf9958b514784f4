"""Optimizer, lr schedule and batch mixing, built from the config."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

from .config import TrainConfig
from .data import NUM_CLASSES
from .models import head_parameter_names


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """Under torchrun, `batch_size` is per process, so the global batch is world_size x batch_size and
    the lr grows with it (the linear scaling rule, Goyal et al. 2017); the warmup keeps the start gentle."""
    return cfg.lr * world_size


def build_optimizer(net: nn.Module, cfg: TrainConfig, world_size: int = 1) -> torch.optim.SGD:
    """SGD at `scaled_lr`; a pretrained backbone trains at lr x backbone_lr_scale so fine-tuning does not wreck it."""
    lr = scaled_lr(cfg, world_size)
    head = head_parameter_names(net)
    scale = cfg.backbone_lr_scale if cfg.model == "resnet18" and cfg.pretrained != "none" else 1.0
    groups = [
        {"params": [p for n, p in net.named_parameters() if n in head], "lr": lr},
        {"params": [p for n, p in net.named_parameters() if n not in head], "lr": lr * scale},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per batch, so warmup and decay are smooth at any epoch count."""
    S = torch.optim.lr_scheduler
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "onecycle":
        peaks = [g["lr"] for g in opt.param_groups]
        return S.OneCycleLR(opt, max_lr=peaks, total_steps=total, pct_start=max(warmup, 1) / total)
    if cfg.schedule == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=max(total - warmup, 1))
    else:
        main = S.MultiStepLR(opt, [m * steps_per_epoch - warmup for m in cfg.milestone_epochs()], cfg.gamma)
    if warmup == 0:
        return main
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.01, total_iters=warmup), main], milestones=[warmup])


def build_mixer(cfg: TrainConfig):
    """torchvision's batch MixUp/CutMix (one of the two per batch when both are on)."""
    mixes = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=NUM_CLASSES))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=NUM_CLASSES))
    return v2.RandomChoice(mixes) if mixes else None
