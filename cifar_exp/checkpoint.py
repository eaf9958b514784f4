"""Checkpoints that resume a run exactly: weights, optimizer, schedule, RNG states, history.

Everything is stored as tensors, numbers and strings, so `torch.load(weights_only=True)` reads it
and no pickle of arbitrary objects is ever needed.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig, make_config

LAST, BEST = "last.pt", "best.pt"
FOLDER = "checkpoints"  # locally under the run's workdir, and the run's artifact path


def runs_home() -> Path:
    """Where runs keep their files locally (and keep them if an upload fails): $CIFAR_EXP_HOME/runs."""
    return Path(os.environ.get("CIFAR_EXP_HOME") or "~/.cache/cifar_exp").expanduser() / "runs"


def run_dir(run_id: str) -> Path:
    return runs_home() / run_id


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def restore(state: dict, net: torch.nn.Module, opt: torch.optim.Optimizer, sched, epochs: int,
            replan: Callable[[], Any]):
    """Load a checkpoint into fresh objects; returns the scheduler to go on with.

    With more epochs than the run planned, `replan()` builds the new schedule, which is then
    fast-forwarded to the step where training stopped.
    """
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if state["config"]["epochs"] == epochs:
        sched.load_state_dict(state["scheduler"])
    else:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"]
        sched = replan()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()" is the point here
            for _ in range(state["scheduler"]["last_epoch"]):  # steps taken so far
                sched.step()
    set_rng_state(state["rng"])
    return sched


def resume_config(state: dict, given: dict[str, Any], run_id: str) -> TrainConfig:
    """The checkpoint's config with the user's epochs/data_dir; any other difference is refused."""
    saved = make_config(state["config"])
    merged = make_config({**state["config"], **given})
    for name in TrainConfig.model_fields:
        if name not in RESUMABLE_CHANGES and getattr(merged, name) != getattr(saved, name):
            raise ConfigError(
                f"{name}: run {run_id} was trained with {getattr(saved, name)!r}, not {getattr(merged, name)!r}; "
                f"only {' and '.join(RESUMABLE_CHANGES)} may change when resuming (start a new run to change more)"
            )
    done = state["next_epoch"] + (1 if state["progress"]["batches"] else 0)
    if merged.epochs < done:
        raise ConfigError(f"epochs: run {run_id} has already started epoch {done}; give --epochs {done} or more")
    return merged
