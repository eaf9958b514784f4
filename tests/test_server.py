"""The team server for real: `cifar-exp server` on a fresh PostgreSQL database, artifacts proxied.

Needs PostgreSQL at 127.0.0.1:5432 (trust auth, user postgres). Without it these tests skip, unless
CIFAR_EXP_REQUIRE_SERVER_TESTS=1 (as .ci/run sets) makes them fail instead.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, Proc
from fakedata import write_fake_cifar100
from mlflow import MlflowClient

from cifar_exp.server import make_bucket

BIN = Path(sys.executable).parent
REQUIRED = os.environ.get("CIFAR_EXP_REQUIRE_SERVER_TESTS") == "1"
pytestmark = pytest.mark.slow
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "lr")


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason}, and CIFAR_EXP_REQUIRE_SERVER_TESTS=1 requires these tests")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **extra}


class Server:
    """`cifar-exp server` in its own process group, so stopping it stops its workers too."""

    def __init__(self, backend: str, artifacts: str, log: Path, **env: str):
        self.backend, self.artifacts, self.log, self.env = backend, artifacts, log, env
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_args: list[str] = []

    def start(self, timeout: float = 120) -> None:
        cmd = [str(BIN / "cifar-exp"), "server", "--backend-store-uri", self.backend, "--artifacts-destination",
               self.artifacts, "--port", str(self.port), "--workers", "2", *self.start_args]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=_env(**self.env), cwd=self.log.parent)  # basic_auth.db lands there
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                return
            except OSError:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                time.sleep(0.5)
        raise AssertionError(f"server not healthy in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def postgres_uri():
    """A fresh database for this module, dropped afterwards."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[test]')")
    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3",
                                autocommit=True)
    except psycopg.OperationalError as e:
        _unavailable(f"no PostgreSQL at 127.0.0.1:5432 ({str(e).strip().splitlines()[0]})")
    name = f"cifar_exp_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
    admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    admin.close()


@pytest.fixture(scope="module")
def server(postgres_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    s = Server(postgres_uri, str(root / "artifacts"), root / "server.log")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data_1000(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data1000")
    write_fake_cifar100(root, train_per_class=10, test_per_class=2)
    return root


def _steps(c: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_mlflow_run_logs_everything_through_the_server(server, data_root, tmp_path):
    uri = f"http://localhost:{server.port}"  # a Host header the server must allow
    cmd = [str(BIN / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local", "--experiment-name", "http",
           "-P", "model=cnn", "-P", "epochs=2", "-P", "width=16", "-P", "batch_size=32", "-P", f"data_dir={data_root}",
           "-P", "download=false", "-P", "device=cpu"]
    env = _env(MLFLOW_TRACKING_URI=uri)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("http").experiment_id])
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert (run.data.params["model"], run.data.params["epochs"], run.data.params["width"]) == ("cnn", "2", "16")
    for key in EPOCH_METRICS:
        assert _steps(c, rid, key) == [0, 1], key
    assert 0 <= run.data.metrics["test_accuracy"] <= 1
    png = Path(c.download_artifacts(rid, "plots/confusion_matrix.png", str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG")
    assert any(Path(server.artifacts).rglob("confusion_matrix.png"))  # stored by the server, not the client
    code = ("import json, numpy as np, mlflow; m = mlflow.pyfunc.load_model(%r); "
            "p = m.predict(np.zeros((3, 32, 32, 3), np.uint8)); print(json.dumps(list(p.shape)))") % run.data.tags["model_uri"]
    clean = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=clean)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [3, 100]


def test_artifacts_round_trip_through_s3(tmp_path, monkeypatch):
    moto = BIN / "moto_server"
    if not moto.exists():
        _unavailable("moto_server is not installed (pip install -e '.[test]')")
    port = _free_port()
    s3 = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for k, v in creds.items():
            monkeypatch.setenv(k, v)
        assert make_bucket("s3://cifar-exp-test/mlflow", endpoint, wait_seconds=30) == "bucket cifar-exp-test created"
        assert make_bucket("s3://cifar-exp-test/mlflow", endpoint) == "bucket cifar-exp-test exists"
        server = Server(f"sqlite:///{tmp_path / 'mlflow.db'}", "s3://cifar-exp-test/mlflow", tmp_path / "server.log",
                        MLFLOW_S3_ENDPOINT_URL=endpoint, **creds)
        server.start()
        for k in creds:
            monkeypatch.delenv(k)  # the client needs the tracking URI only
        try:
            c = MlflowClient(server.url)
            run = c.create_run(c.create_experiment("s3"))
            weights = tmp_path / "last.pt"
            weights.write_bytes(os.urandom(300_000))
            c.log_artifact(run.info.run_id, str(weights), "checkpoints")
            back = Path(c.download_artifacts(run.info.run_id, "checkpoints/last.pt", str(tmp_path / "back")))
            assert back.read_bytes() == weights.read_bytes()
        finally:
            server.stop()
        import boto3

        keys = [o["Key"] for o in boto3.client("s3", endpoint_url=endpoint, **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})
            .list_objects_v2(Bucket="cifar-exp-test")["Contents"]]
        assert any(k.startswith("mlflow/") and k.endswith("checkpoints/last.pt") for k in keys), keys
    finally:
        os.killpg(s3.pid, signal.SIGTERM)
        s3.wait(30)


def test_training_rides_out_a_server_restart(server, data_1000, tmp_path):
    proc = Proc("train", "--data-dir", str(data_1000), "--download", "false", "--device", "cpu", "--width", "8",
                "--batch-size", "32", "--epochs", "4", "--experiment-name", "outage",
                env={"MLFLOW_TRACKING_URI": server.url})
    run_id = proc.wait_for("run ").split()[1]
    proc.wait_for("epoch 1/4")
    server.stop()
    time.sleep(15)
    assert proc.p.poll() is None, "training ended while the server was down: " + "".join(proc.lines)
    server.start()
    code, out = proc.finish(timeout=600)
    assert code == 0, out
    assert "could not upload" not in out
    c = MlflowClient(server.url)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in EPOCH_METRICS:
        assert _steps(c, run_id, key) == [0, 1, 2, 3], key  # each epoch exactly once
    models = c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1 and run.data.tags["model_uri"] == f"models:/{models[0].model_id}"
    assert {a.path for a in c.list_artifacts(run_id, "checkpoints")} == {"checkpoints/last.pt", "checkpoints/best.pt"}


def test_four_trainings_at_once(server, data_root):
    procs = [Proc("train", "--data-dir", str(data_root), "--download", "false", "--device", "cpu", "--width", "8",
                  "--batch-size", "32", "--epochs", "2", "--log-model", "false", "--experiment-name", "together",
                  "--seed", str(seed), env={"MLFLOW_TRACKING_URI": server.url}) for seed in range(4)]
    outs = []
    for p in procs:
        code, out = p.finish(timeout=600)
        assert code == 0, out
        outs.append(out.splitlines()[0])
    c = MlflowClient(server.url)
    runs = c.search_runs([c.get_experiment_by_name("together").experiment_id])
    everywhere = [(r.info.experiment_id, r.info.run_name, r.info.status) for r in
                  c.search_runs([e.experiment_id for e in c.search_experiments()])]
    assert len(runs) == 4, (everywhere, outs)
    assert {r.data.params["seed"] for r in runs} == {"0", "1", "2", "3"}
    for r in runs:
        assert r.info.status == "FINISHED"
        for key in EPOCH_METRICS:
            assert _steps(c, r.info.run_id, key) == [0, 1], key
        assert "test_accuracy" in r.data.metrics


def test_an_unreachable_server_fails_before_loading_anything(data_root):
    dead = f"http://127.0.0.1:{_free_port()}"
    r = subprocess.run([str(BIN / "cifar-exp"), "train", "--data-dir", str(data_root), "--download", "false",
                        "--experiment-name", "never"], capture_output=True, text=True, timeout=120,
                       env=_env(MLFLOW_TRACKING_URI=dead))
    assert r.returncode == 2 and r.stderr.startswith(f"Error: tracking server {dead} is unreachable")


def test_basic_auth_mode_requires_a_password(tmp_path, monkeypatch):
    server = Server(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), tmp_path / "server.log",
                    MLFLOW_AUTH_ADMIN_PASSWORD="first-admin-pw", MLFLOW_FLASK_SERVER_SECRET_KEY="k" * 32)
    server.start_args = ["--basic-auth"]
    server.start()
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "first-admin-pw")
        c = MlflowClient(server.url)
        assert c.get_experiment(c.create_experiment("with-auth")).name == "with-auth"
    finally:
        server.stop()
