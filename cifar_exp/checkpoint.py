"""Checkpoints that resume a run exactly: weights, optimizer, schedule, RNG states, history.

Everything is stored as tensors, numbers and strings, so `torch.load(weights_only=True)` reads it
and no pickle of arbitrary objects is ever needed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

LAST, BEST = "last.pt", "best.pt"


def runs_home() -> Path:
    """Where checkpoints live locally (and stay if an upload fails): $CIFAR_EXP_HOME/runs."""
    return Path(os.environ.get("CIFAR_EXP_HOME") or "~/.cache/cifar_exp").expanduser() / "runs"


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, **state) -> None:
    """Write atomically: a kill mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)
