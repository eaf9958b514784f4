"""The tracking layer: the only module that imports mlflow.

The training loop sees a `Tracker`; `mlflow_run` opens an MLflow run and yields one. Every way out of
the `with` block ends the run: FINISHED, FAILED (exception, with the error in a tag) or KILLED
(Ctrl-C / SIGTERM). No run is left RUNNING.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import warnings
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
from mlflow.entities import RunStatus
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.models import infer_signature

from .config import TrainConfig
from .data import Cifar100, Split, digest
from .evaluate import Evaluation


class Tracker(Protocol):
    """What the training loop reports. Tests use an in-memory one; production uses MlflowTracker."""

    def log_dataset(self, data: Cifar100, splits: Mapping[str, Split]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_summary(self, metrics: Mapping[str, float]) -> None: ...
    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None: ...
    def log_model(self, model: torch.nn.Module, input_example: np.ndarray, metadata: dict) -> str | None: ...
    def log_evaluation(self, ev: Evaluation) -> None: ...


class MlflowTracker:
    """Sends the loop's reports to the active MLflow run."""

    def __init__(self, run_id: str, experiment_name: str):
        self.run_id, self.experiment_name = run_id, experiment_name
        self.model_id: str | None = None

    def log_dataset(self, data: Cifar100, splits: Mapping[str, Split]) -> None:
        mlflow.set_tag("dataset_digest", data.digest)
        for context, split in splits.items():
            with warnings.catch_warnings():
                # MLflow registers its local-file source under two schemes and warns that a path is
                # ambiguous between them; both are the same class.
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                ds = mlflow.data.from_numpy(
                    split.images.numpy(), targets=split.labels.numpy(), source=data.source,
                    name=f"cifar100-{context}", digest=digest(split),
                )
            mlflow.log_input(ds, context=context)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        # Asynchronous: the loop never waits on a remote server; mlflow_run flushes at the end.
        mlflow.log_metrics(dict(metrics), step=step, synchronous=False)

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        # Linked to the LoggedModel too, so the model page shows how it scored.
        mlflow.log_metrics(dict(metrics), model_id=self.model_id)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        mlflow.log_artifacts(str(local_dir), artifact_path)

    def log_evaluation(self, ev: Evaluation) -> None:
        log_evaluation(ev)

    def log_model(self, model: torch.nn.Module, input_example: np.ndarray, metadata: dict) -> str:
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=input_example,  # batch of 2: pt2 export keeps the batch dimension dynamic
            signature=infer_signature(input_example, output),
            metadata=metadata,
            # Explicit requirements skip mlflow's inference, which reloads the model in a subprocess.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
        self.model_id = info.model_id
        mlflow.set_tag("model_uri", info.model_uri)
        return info.model_uri


def log_evaluation(ev: Evaluation) -> None:
    """Figures under plots/, tables and per-image predictions under evaluation/ of the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "plots").mkdir()
        (root / "evaluation").mkdir()
        for name, fig in ev.figures.items():
            fig.savefig(root / "plots" / name)
            plt.close(fig)
        for name, table in ev.tables.items():
            table.to_csv(root / "evaluation" / name, index=False)
        np.savez_compressed(root / "evaluation" / "predictions.npz", **ev.predictions)
        mlflow.log_artifacts(str(root / "plots"), "plots")
        mlflow.log_artifacts(str(root / "evaluation"), "evaluation")


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def default_run_name(cfg: TrainConfig) -> str:
    return cfg.run_name or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def _same_value(logged: str, ours: str) -> bool:
    """`mlflow run` logs -P values as typed and shell-quoted: `1e-1` for our 0.1, `''` for ""."""
    try:
        logged = " ".join(shlex.split(logged))
        return float(logged) == float(ours)
    except ValueError:
        return logged == ours


def _log_params_once(run: mlflow.ActiveRun, params: dict[str, str]) -> None:
    """Log the params the run lacks. MLflow params are immutable, and `mlflow run` already logged its -P values."""
    existing = run.data.params
    conflicts = sorted(k for k, v in params.items() if k in existing and not _same_value(existing[k], v))
    if conflicts:
        mlflow.set_tag("param_conflicts", ", ".join(conflicts))
    new = {k: v for k, v in params.items() if k not in existing}
    if new:
        mlflow.log_params(new)


@contextmanager
def tracked_run(experiment_name: str | None = None, run_name: str | None = None, tags: dict | None = None,
                run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start a run (or continue `run_id`, or adopt the run `mlflow run` made) and always end it.

    FINISHED on success; FAILED on an exception, with the error in the `error` tag; KILLED on Ctrl-C or
    SIGTERM. Queued asynchronous metrics are flushed before the status changes.
    """
    if run_id is None and os.environ.get(MLFLOW_RUN_ID.name):
        # Launched by `mlflow run`: its run lives in the experiment that command chose.
        run = mlflow.start_run(tags=tags)
        if run_name:
            mlflow.set_tag("mlflow.runName", run_name)
    elif run_id is not None:
        run = mlflow.start_run(run_id=run_id, tags=tags)
    else:
        if experiment_name:
            mlflow.set_experiment(experiment_name)
        run = mlflow.start_run(run_name=run_name, tags=tags)
    status = RunStatus.FAILED
    try:
        yield run
        status = RunStatus.FINISHED
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        mlflow.set_tag("error", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except BaseException as e:
        mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
        raise
    finally:
        mlflow.flush_async_logging()
        mlflow.end_run(RunStatus.to_string(status))


@contextmanager
def mlflow_run(cfg: TrainConfig) -> Iterator[MlflowTracker]:
    """A training run: the config as params and as config.yaml, tags for family and commit."""
    tags = {"model_family": cfg.model}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    with tracked_run(cfg.experiment_name, default_run_name(cfg), tags) as run:
        experiment = mlflow.get_experiment(run.info.experiment_id).name
        cfg = cfg.model_copy(update={"experiment_name": experiment})  # differs only under `mlflow run`
        _log_params_once(mlflow.get_run(run.info.run_id), cfg.to_params())
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.yaml")
        yield MlflowTracker(run.info.run_id, experiment)


def log_reevaluation(ev: Evaluation, model_uri: str, source_run_id: str | None, into_source_run: bool = False,
                     experiment_name: str | None = None) -> str:
    """Log an evaluation of a logged model into a new run tagged with its source, or into the source run."""
    if into_source_run:
        if source_run_id is None:
            raise ValueError("the model has no source run to log into")
        ctx = tracked_run(run_id=source_run_id)
    else:
        if experiment_name is None and source_run_id is not None:
            experiment_name = mlflow.get_experiment(mlflow.get_run(source_run_id).info.experiment_id).name
        tags = {"evaluation_of_model": model_uri, "source_run_id": source_run_id or "", "run_kind": "evaluation"}
        ctx = tracked_run(experiment_name or "cifar100", f"eval-{model_uri.rsplit('/', 1)[-1]}", tags)
    with ctx as run:
        log_evaluation(ev)
        mlflow.log_metrics(ev.metrics)
        return run.info.run_id
