"""One training run from start to end: torchrun ranks, resume, the MLflow run, the loop, signals.

The CLI parses and prints; this module does the work in between, so every way of starting a run
(train, resume, torchrun ranks, sweeps) goes through the same checks.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

from .checkpoint import resume_config
from .config import TrainConfig


class StopOnSignal:
    """First SIGINT/SIGTERM: finish the batch, save a checkpoint, end the run KILLED. A second: stop at once."""

    def __init__(self, echo: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
        self.signum: int | None = None
        self.echo = echo

    def __enter__(self) -> "StopOnSignal":
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise KeyboardInterrupt(f"{name} again: stopped at once")
        self.signum = signum
        self.echo(f"\n{name}: finishing this batch and saving a checkpoint (send it again to stop at once)")

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def relaunch_under_torchrun(n: int, argv: list[str]) -> NoReturn:
    """`train --nproc-per-node N ...` becomes `torchrun --standalone --nproc-per-node N -m cifar_exp train ...`."""
    args, skip = [], False
    for a in argv:
        if skip or a.startswith("--nproc-per-node="):
            skip = False
            continue
        skip = a == "--nproc-per-node"
        if not skip:
            args.append(a)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={n}", "-m", "cifar_exp", *args])


@dataclass
class Plan:
    """Everything checked before a run exists: a bad value, data dir or run id stops here."""

    cfg: TrainConfig
    dist: Any  # hardware.Dist
    prepared: Any  # train.Prepared
    point: Any = None  # runs.ResumePoint, on rank 0 when resuming
    state: dict | None = None  # the checkpoint to continue, on every rank
    run_id: str | None = None  # known once the run has started
    extra_tags: dict = field(default_factory=dict)


def plan(cfg: TrainConfig, given: dict[str, Any], resume_id: str | None) -> Plan:
    """Join torchrun's group, find the checkpoint to resume, load data and weights.

    Raises ConfigError, DataError or TrackingError with a one-line message.
    """
    from . import runs
    from . import train as T
    from .data import DataError
    from .hardware import init_distributed
    from .optim import scaled_lr

    dist = init_distributed(cfg.device)
    point, state = None, None
    if dist.main:  # only rank 0 talks to MLflow
        runs.check_tracking_server()
        if resume_id:
            point = runs.load_resume_point(resume_id)
            state = point.state
    if dist.world > 1 and resume_id:
        import torch.distributed

        shared = [state]
        torch.distributed.broadcast_object_list(shared, src=0)
        state = shared[0]
    if state is not None:
        cfg = resume_config(state, given, resume_id)
    prepared = T.prepare(cfg)
    if point is not None and point.dataset_digest not in (None, prepared.data.digest):
        raise DataError(f"data_dir: {cfg.data_path} holds a different dataset (digest {prepared.data.digest}) "
                        f"than run {resume_id} trained on ({point.dataset_digest})")
    tags = {}
    if dist.world > 1:
        tags = {"world_size": str(dist.world), "global_batch_size": str(dist.world * cfg.batch_size),
                "effective_lr": str(scaled_lr(cfg, dist.world))}
    return Plan(cfg, dist, prepared, point, state, resume_id, tags)


def execute(p: Plan, stop: StopOnSignal, echo: Callable[[str], None] = print):
    """Run the plan; returns the TrainResult on rank 0 and None on the other ranks.

    `p.run_id` is set as soon as the MLflow run exists, for messages about a run that stopped.
    """
    from . import runs, tracking
    from . import train as T
    from .hardware import finish_distributed

    if not p.dist.main:
        T.run(p.cfg, tracking.SilentTracker(), p.prepared, None, p.state, stop)
        finish_distributed()
        return None
    with runs.resumed_run(p.point) if p.point else runs.mlflow_run(p.cfg) as tracker:
        p.run_id = tracker.run_id
        echo(f"run {p.run_id} in experiment '{tracker.experiment_name}'"
             + (f", resumed at epoch {p.state['next_epoch'] + 1}" if p.state else ""))
        if p.extra_tags:
            tracking.set_tags(p.extra_tags)
        result = T.run(p.cfg, tracker, p.prepared, tracker.workdir, p.state, stop)
    finish_distributed()
    return result
