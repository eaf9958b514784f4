"""MLflow run lifecycles: start or adopt a run, always end it, resume it, nest sweeps under it.

Every way out of a `with` block ends the run: FINISHED, FAILED (exception: the error in a tag and
the traceback in error.txt) or KILLED (Ctrl-C / SIGTERM). No run is left RUNNING.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.exceptions import MlflowException

from .checkpoint import FOLDER, LAST, load, run_dir
from .config import TrainConfig
from .evaluate import Evaluation
from .tracking import MlflowTracker, write_evaluation


@functools.cache  # a sweep tags every child with it: ask git once per process
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


class TrackingError(RuntimeError):
    """The tracking store cannot do what was asked; the message is one line for the user."""


def check_tracking_server(timeout: float = 5.0) -> None:
    """Fail fast on an unreachable server: MLflow's own retries would take minutes to give up."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        reason = getattr(e, "reason", None) or e
        hint = " (a 403 means the server's --allowed-hosts lacks this host)" if "403" in str(e) else ""
        raise TrackingError(f"tracking server {uri} is unreachable: {reason}{hint}; start it (`docker compose up` "
                            "or `cifar-exp server`) or set MLFLOW_TRACKING_URI to a running one") from None


def _quietly(action) -> None:
    """Best effort while a run is already failing: never hide the original error behind a tracking one."""
    try:
        action()
    except Exception as e:  # the store may be the thing that failed
        print(f"warning: could not record the failure in MLflow ({type(e).__name__})", file=sys.stderr)


def experiment_id(name: str) -> str:
    """The experiment's id, created if missing, and safe when processes race to create it.

    Not mlflow.set_experiment: a process that loses that race gets the experiment back but does not
    make it active, and its run lands in Default (seen here with 4 concurrent trainings; also
    ergodicio/adept#292).
    """
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage != "active":
        raise TrackingError(f"experiment {name!r} is deleted; restore it (mlflow experiments restore "
                            f"--experiment-id {exp.experiment_id}) or choose another --experiment-name")
    return exp.experiment_id


@contextmanager
def tracked_run(experiment_name: str | None = None, run_name: str | None = None, tags: dict | None = None,
                run_id: str | None = None, nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start a run (or continue `run_id`, or adopt the run `mlflow run` made) and always end it.

    `nested`: a child of the active run, in its experiment (a sweep's parent).

    FINISHED on success; KILLED on Ctrl-C or SIGTERM; FAILED on an exception, with the error in the
    `error` tag and the traceback as error.txt. Queued asynchronous metrics are flushed first.
    """
    if nested:
        parent = mlflow.active_run()
        run = mlflow.start_run(run_name=run_name, tags=tags, nested=True, experiment_id=parent.info.experiment_id)
    elif run_id is None and os.environ.get(MLFLOW_RUN_ID.name):
        # Launched by `mlflow run`: its run lives in the experiment that command chose.
        run = mlflow.start_run(tags=tags)
        if run_name:
            mlflow.set_tag("mlflow.runName", run_name)
    elif run_id is not None:
        run = mlflow.start_run(run_id=run_id, tags=tags)
    else:
        eid = experiment_id(experiment_name) if experiment_name else None
        run = mlflow.start_run(run_name=run_name, tags=tags, experiment_id=eid)
    status = RunStatus.FAILED
    try:
        yield run
        status = RunStatus.FINISHED
    except KeyboardInterrupt as e:
        status = RunStatus.KILLED
        reason = f"interrupted: {e}" if str(e) else "interrupted (Ctrl-C or SIGTERM)"
        _quietly(lambda: mlflow.set_tag("error", reason))
        raise
    except BaseException as e:
        reason, trace = f"{type(e).__name__}: {e}"[:5000], traceback.format_exc()
        _quietly(lambda: mlflow.set_tag("error", reason))
        _quietly(lambda: mlflow.log_text(trace, "error.txt"))
        raise
    finally:
        _quietly(mlflow.flush_async_logging)
        mlflow.end_run(RunStatus.to_string(status))


@contextmanager
def _training(run_id: str, experiment_name: str) -> Iterator[MlflowTracker]:
    """Tag a stopped run with the command that resumes it; drop the local copies once all is uploaded."""
    tracker = MlflowTracker(run_id, experiment_name)
    try:
        yield tracker
    except BaseException:
        if (tracker.workdir / FOLDER / LAST).exists():
            _quietly(lambda: mlflow.set_tag("resume_command", f"cifar-exp train --resume {run_id}"))
        raise
    if not tracker.upload_failures:
        shutil.rmtree(tracker.workdir, ignore_errors=True)


def _commit_tags() -> dict[str, str]:
    commit = _git_commit()
    return {"mlflow.source.git.commit": commit} if commit else {}


@contextmanager
def mlflow_run(cfg: TrainConfig, nested: bool = False) -> Iterator[MlflowTracker]:
    """A training run: the config as params and as config.yaml, tags for family and commit."""
    tags = {"model_family": cfg.model, **_commit_tags()}
    with tracked_run(cfg.experiment_name, default_run_name(cfg), tags, nested=nested) as run:
        experiment = mlflow.get_experiment(run.info.experiment_id).name
        cfg = cfg.model_copy(update={"experiment_name": experiment})  # differs only under `mlflow run`
        _log_params_once(mlflow.get_run(run.info.run_id), cfg.to_params())
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.yaml")
        with _training(run.info.run_id, experiment) as tracker:
            yield tracker


@contextmanager
def sweep_run(experiment_name: str, run_name: str, grid: dict[str, str]) -> Iterator[tuple[str, str]]:
    """The parent run of a sweep, with its grid as params; yields (run id, experiment name)."""
    with tracked_run(experiment_name, run_name, {"run_kind": "sweep", **_commit_tags()}) as run:
        mlflow.log_params(grid)
        yield run.info.run_id, mlflow.get_experiment(run.info.experiment_id).name  # `mlflow run` may choose it


def log_sweep_summary(rows: list[dict]) -> None:
    """One row per child (run id, config values, test metrics) as sweep/children.csv of the parent."""
    import pandas as pd

    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "sweep/children.csv")
    mlflow.log_metrics({"children_finished": sum(r["status"] == "FINISHED" for r in rows),
                        "children_failed": sum(r["status"] != "FINISHED" for r in rows)})


@dataclass
class ResumePoint:
    run_id: str
    experiment_name: str
    state: dict  # the last checkpoint
    dataset_digest: str | None
    resumed: int  # times resumed before


def find_run(run_id: str, error: type[Exception], hint: str, prefix: str = ""):
    """The run, or `error` naming the id, the store and what to do about it."""
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise error(f"{prefix}run id {run_id!r} not found in {mlflow.get_tracking_uri()}; {hint}") from None


def load_resume_point(run_id: str) -> ResumePoint:
    """The run and its last checkpoint: the local copy if this machine has one, else the run's artifact."""
    client = MlflowClient()
    run = find_run(run_id, TrackingError, "copy the id from the run's resume_command tag", "--resume: ")
    if run.info.status == "FINISHED":
        raise TrackingError(f"--resume: run {run_id} already FINISHED; resume continues KILLED or FAILED runs "
                            "(start a new run to train more)")
    last = run_dir(run_id) / FOLDER / LAST
    if not last.exists():
        try:
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=FOLDER, dst_path=str(run_dir(run_id)))
        except Exception:  # nothing uploaded, or not reachable: the check below says so
            pass
    if not last.exists():
        raise TrackingError(f"--resume: run {run_id} has no checkpoint (it stopped before saving one); start a new run")
    return ResumePoint(run_id, client.get_experiment(run.info.experiment_id).name, load(last),
                       run.data.tags.get("dataset_digest"), int(run.data.tags.get("resumed", "0")))


@contextmanager
def resumed_run(point: ResumePoint) -> Iterator[MlflowTracker]:
    """Continue the run itself, so its metric history stays one unbroken series."""
    launcher = os.environ.pop(MLFLOW_RUN_ID.name, None)
    if launcher and launcher != point.run_id:  # `mlflow run -e resume` made a run of its own; point it at ours
        client = MlflowClient()
        client.set_tag(launcher, "resumes_run_id", point.run_id)
        client.set_tag(launcher, "mlflow.note.content", f"This launch resumed run {point.run_id}; its results are there.")
    with tracked_run(run_id=point.run_id) as run:
        for tag in ("resume_command", "error"):
            if tag in run.data.tags:  # a run killed with SIGKILL has neither, and deleting a missing tag raises
                MlflowClient().delete_tag(point.run_id, tag)
        mlflow.set_tag("resumed", str(point.resumed + 1))
        with _training(run.info.run_id, point.experiment_name) as tracker:
            yield tracker


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
    with ctx as run, tempfile.TemporaryDirectory() as tmp:
        for folder in write_evaluation(ev, Path(tmp)):
            mlflow.log_artifacts(str(folder), folder.name)
        mlflow.log_metrics(ev.metrics)
        return run.info.run_id
