"""Grid sweeps: every combination trains as a child run under one parent MLflow run, one after another."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from .config import ConfigError, TrainConfig, make_config


def parse_axis(text: str) -> tuple[str, list[str]]:
    """`lr=0.05,0.1` -> ("lr", ["0.05", "0.1"]), naming the problem when it is not that."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not values.strip():
        raise ConfigError(f"--param {text!r}: write NAME=V1,V2 (e.g. lr=0.05,0.1)")
    if name not in TrainConfig.model_fields:
        raise ConfigError(f"--param {name}: unknown config key; allowed keys: {', '.join(TrainConfig.model_fields)}")
    if name in ("model", "seed"):
        raise ConfigError(f"--param {name}: use --{name}s for this axis")
    return name, [v.strip() for v in values.split(",") if v.strip()]


def expand(base: dict[str, Any], models: list[str], seeds: list[int], axes: dict[str, list[str]]) -> list[TrainConfig]:
    """Every combination, validated before anything runs (a bad value stops the sweep at once)."""
    configs = []
    for model, seed, *values in itertools.product(models, seeds, *axes.values()):
        configs.append(make_config({**base, "model": model, "seed": seed, **dict(zip(axes, values))}))
    return configs


def run_sweep(configs: list[TrainConfig], experiment_name: str, name: str, grid: dict[str, str],
              should_stop: Callable[[], bool] | None = None, echo: Callable[[str], None] = print) -> tuple[str, str, list[dict]]:
    """Train each config as a child of one parent run; returns (parent run id, experiment, one row per child).

    A child that fails ends FAILED and the sweep goes on; the parent then ends FAILED, naming them.
    Ctrl-C / SIGTERM stops the current child (KILLED, resumable) and the sweep.
    """
    from . import train as T
    from .runs import log_sweep_summary, mlflow_run, sweep_run

    rows: list[dict] = []
    data = {}
    with sweep_run(experiment_name, name, grid) as (parent_id, experiment_name):
        echo(f"sweep {parent_id}: {len(configs)} runs in experiment '{experiment_name}'")
        for i, cfg in enumerate(configs, 1):
            cfg = cfg.model_copy(update={"experiment_name": experiment_name})
            row = {"model": cfg.model, "seed": cfg.seed, **{k: getattr(cfg, k) for k in grid if k in TrainConfig.model_fields}}
            prepared = T.prepare(cfg, data.get(cfg.data_path))  # the dataset is read once per folder
            data[cfg.data_path] = prepared.data
            tracker = None
            try:
                with mlflow_run(cfg, nested=True) as tracker:
                    echo(f"[{i}/{len(configs)}] run {tracker.run_id}: {cfg.model} seed {cfg.seed}")
                    result = T.run(cfg, tracker, prepared, tracker.workdir, should_stop=should_stop)
                rows.append({"run_id": tracker.run_id, **row, "status": "FINISHED", **result.test_metrics})
            except Exception as e:  # the child is FAILED with its traceback; the others still run
                run_id = tracker.run_id if tracker else ""
                rows.append({"run_id": run_id, **row, "status": "FAILED", "error": f"{type(e).__name__}: {e}"})
                echo(f"[{i}/{len(configs)}] run {run_id} FAILED: {type(e).__name__}: {e}")
        log_sweep_summary(rows)
        failed = [r["run_id"] for r in rows if r["status"] != "FINISHED"]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(rows)} runs failed: {', '.join(failed)}")
    return parent_id, experiment_name, rows
