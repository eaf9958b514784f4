"""Devices, seeds and precision: what the loop asks of the hardware."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job; one process is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_preference: str = "auto") -> Dist:
    """Join torchrun's process group (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = pick_device(device_preference).type == "cuda"
        if cuda:
            torch.cuda.set_device(local)  # "cuda" now means this process's own GPU
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local)


def current() -> Dist:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max) numbers over all ranks; float64 so image counts stay exact."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def agreed(should_stop, device: torch.device):
    """A stop request seen by any rank stops every rank after the same batch (else they would deadlock)."""
    return lambda: all_reduce([float(should_stop())], device, "max")[0] > 0
