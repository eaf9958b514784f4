from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakedata.py

from fakedata import write_fake_cifar100  # noqa: E402

from cifar_exp.config import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def runs_home(tmp_path, monkeypatch) -> Path:
    """Local run folders (checkpoints) under tmp_path, for this process and the CLI processes it starts."""
    home = tmp_path / "cifar_exp_home"
    monkeypatch.setenv("CIFAR_EXP_HOME", str(home))
    return home / "runs"


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A synthetic CIFAR-100 (400 train, 100 test images) in the real pickle layout."""
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar100(root, train_per_class=4, test_per_class=1)
    return root


@pytest.fixture
def tiny_cfg(data_root, tmp_path):
    """A config that trains in about a second on CPU."""

    def make(**kw) -> TrainConfig:
        base = dict(model="cnn", width=16, epochs=2, batch_size=32, lr=0.05, data_dir=str(data_root),
                    download=False, device="cpu", experiment_name="test", seed=0)
        return TrainConfig(**{**base, **kw})

    return make


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store under tmp_path, for in-process and subprocess use."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts in ./mlruns of the working directory
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    reset_mlflow_state()
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    reset_mlflow_state()
    mlflow.set_tracking_uri(None)


def reset_mlflow_state() -> None:
    """mlflow.set_experiment writes MLFLOW_EXPERIMENT_ID into os.environ; keep it from leaking across tests."""
    import mlflow.tracking.fluent as fluent

    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        os.environ.pop(var, None)
    fluent._active_experiment_id = None


class RecordingTracker:
    """The Tracker interface in memory: the loop is tested without MLflow."""

    def __init__(self, render: bool = False):
        self.render = render  # drawing the figures costs seconds; the evaluation tests turn it on
        self.datasets, self.metrics, self.summary, self.checkpoints, self.models = {}, [], {}, [], []
        self.evaluations = []

    def log_dataset(self, data, splits: Mapping) -> None:
        self.datasets = {k: len(v) for k, v in splits.items()}

    def log_metrics(self, metrics, step: int) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_summary(self, metrics) -> None:
        self.summary.update(metrics)

    def log_checkpoint(self, path) -> None:
        self.checkpoints.append(Path(path).name)

    def logged_steps(self) -> set[int]:
        return {step for step, _ in self.metrics}

    def log_evaluation(self, ev) -> None:
        # Render and close the figures, as the MLflow tracker does, so none stay open.
        import io

        import matplotlib.pyplot as plt

        for name, fig in list(ev.figures.items()):
            if self.render:
                buf = io.BytesIO()
                fig.savefig(buf, format="png")
                ev.figures[name] = buf.getvalue()
            plt.close(fig)
        self.evaluations.append(ev)

    def log_model(self, model, input_example, metadata) -> str:
        self.models.append((model, input_example, metadata))
        return "memory:/model"


@pytest.fixture
def recorder() -> RecordingTracker:
    return RecordingTracker()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`cifar-exp ARGS` in a fresh process, through the installed console script."""
    exe = Path(sys.executable).parent / "cifar-exp"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cifar_exp"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


class Proc:
    """A `cifar-exp` process whose merged output is read line by line as it comes."""

    def __init__(self, *args: str, env: dict | None = None):
        exe = Path(sys.executable).parent / "cifar-exp"
        self.p = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self._q.put(line) for line in self.p.stdout], daemon=True).start()

    def wait_for(self, text: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                assert self.p.poll() is None, f"exited {self.p.returncode} before {text!r}:\n" + "".join(self.lines)
                continue
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {timeout}s:\n" + "".join(self.lines))

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.p.wait(timeout)
        time.sleep(0.2)
        while not self._q.empty():
            self.lines.append(self._q.get())
        return code, "".join(self.lines)
