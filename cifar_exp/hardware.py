"""Devices, seeds and precision: what the loop asks of the hardware."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from .config import TrainConfig


def pick_device(preference: str = "auto") -> torch.device:
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the GPU has it; fp16 (with loss scaling) on older GPUs; full precision elsewhere."""
    if device.type != "cuda" or not enabled:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool):
    dtype = amp_dtype(device, enabled)
    return torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)


def maybe_compile(net: nn.Module, cfg: TrainConfig) -> nn.Module:
    """torch.compile when asked; a graph that fails to compile runs eagerly instead of stopping the run."""
    if not cfg.compile:
        return net
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    return torch.compile(net)
