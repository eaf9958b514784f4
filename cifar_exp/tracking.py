"""What the training loop reports to, and how it reaches MLflow (run lifecycles live in runs.py).

The loop sees a `Tracker`; `MlflowTracker` sends its reports to the active run, writing files
locally first and uploading them with retries. Together with runs.py, registry.py and compare.py
this is the MLflow-facing layer: nothing else imports mlflow.
"""

from __future__ import annotations

import shlex
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature

from .checkpoint import FOLDER, run_dir
from .data import Cifar100, Split, digest
from .evaluate import Evaluation

EPOCH_METRIC = "val_accuracy"  # logged once per epoch: its steps say which epochs are logged
UPLOAD_TRIES, UPLOAD_RETRY_SECONDS = 3, 2.0  # on top of MLflow's own HTTP retries


class Tracker(Protocol):
    """What the training loop reports. Tests use an in-memory one; production uses MlflowTracker."""

    def log_dataset(self, data: Cifar100, splits: Mapping[str, Split]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_summary(self, metrics: Mapping[str, float]) -> None: ...
    def log_checkpoint(self, path: Path) -> None: ...
    def logged_steps(self) -> set[int]: ...
    def log_model(self, model: torch.nn.Module, input_example: np.ndarray, metadata: dict) -> str | None: ...
    def log_evaluation(self, ev: Evaluation) -> None: ...


class SilentTracker:
    """For ranks other than 0 under torchrun: they train, and only rank 0 talks to MLflow."""

    run_id, experiment_name, workdir, upload_failures = "", "", None, []

    def log_dataset(self, data, splits) -> None: ...
    def log_metrics(self, metrics, step: int) -> None: ...
    def log_summary(self, metrics) -> None: ...
    def log_checkpoint(self, path: Path) -> None: ...
    def logged_steps(self) -> set[int]: return set()
    def log_model(self, model, input_example, metadata) -> None: ...
    def log_evaluation(self, ev) -> None: ...


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


class MlflowTracker:
    """Sends the loop's reports to the active MLflow run.

    Files are written under `workdir` first and uploaded from there with retries; whatever fails to
    upload stays there, and `upload_failures` says so.
    """

    def __init__(self, run_id: str, experiment_name: str, workdir: Path | None = None):
        self.run_id, self.experiment_name = run_id, experiment_name
        self.workdir = workdir or run_dir(run_id)
        self.model_id: str | None = None
        self.upload_failures: list[str] = []

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
        # Asynchronous: the loop never waits on a remote server; tracked_run flushes at the end.
        mlflow.log_metrics(dict(metrics), step=step, synchronous=False)

    def logged_steps(self) -> set[int]:
        return {m.step for m in MlflowClient().get_metric_history(self.run_id, EPOCH_METRIC)}

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        # Linked to the LoggedModel too, so the model page shows how it scored.
        mlflow.log_metrics(dict(metrics), model_id=self.model_id)

    def log_checkpoint(self, path: Path) -> None:
        # Same artifact name every epoch: the store keeps only the newest last.pt and best.pt.
        self.upload(path, FOLDER)

    def log_evaluation(self, ev: Evaluation) -> None:
        for folder in write_evaluation(ev, self.workdir):
            self.upload(folder, folder.name)

    def upload(self, local: Path, artifact_path: str) -> bool:
        """Upload a file or folder, retrying; on failure keep it and say where it is and how to send it."""
        send = mlflow.log_artifacts if local.is_dir() else mlflow.log_artifact
        for attempt in range(UPLOAD_TRIES):
            try:
                send(str(local), artifact_path)
                return True
            except Exception as e:  # any store error: S3, HTTP, disk
                error = e
                if attempt + 1 < UPLOAD_TRIES:
                    time.sleep(UPLOAD_RETRY_SECONDS * 2**attempt)
        self.upload_failures.append(str(local))
        print(f"warning: could not upload {local} to run {self.run_id} after {UPLOAD_TRIES} tries "
              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). It is kept there; "
              f"upload it later with: mlflow artifacts log-artifact{'s --local-dir' if local.is_dir() else ' --local-file'} "
              f"{shlex.quote(str(local))} --run-id {self.run_id} --artifact-path {artifact_path}", file=sys.stderr, flush=True)
        return False

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


def write_evaluation(ev: Evaluation, root: Path) -> list[Path]:
    """Figures to root/plots, tables and per-image predictions to root/evaluation; returns both folders."""
    plots, tables = root / "plots", root / "evaluation"
    plots.mkdir(parents=True, exist_ok=True)
    tables.mkdir(parents=True, exist_ok=True)
    for name, fig in ev.figures.items():
        fig.savefig(plots / name)
        plt.close(fig)
    for name, table in ev.tables.items():
        table.to_csv(tables / name, index=False)
    np.savez_compressed(tables / "predictions.npz", **ev.predictions)
    return [plots, tables]
