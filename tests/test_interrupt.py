"""Signals, crashes and failed uploads: every run ends accounted for, and resumes where it stopped."""

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import Proc, run_cli
from fakedata import write_fake_cifar100
from mlflow import MlflowClient

from cifar_exp import train as T
from cifar_exp import runs, tracking
from cifar_exp.cli import main

EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "lr")


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data1000")
    write_fake_cifar100(root, train_per_class=10, test_per_class=2)  # 900 train, 100 val, 200 test
    return root


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_sigterm_in_epoch_2_then_resume_equals_an_uninterrupted_run(bigger_data, tracking_uri, tmp_path):
    args = ["train", "--data-dir", str(bigger_data), "--download", "false", "--device", "cpu", "--width", "8",
            "--batch-size", "32", "--lr", "0.05", "--epochs", "4", "--deterministic", "true", "--log-model", "false"]
    whole = run_cli(*args, "--run-name", "whole")
    assert whole.returncode == 0, whole.stderr

    proc = Proc(*args, "--run-name", "cut")
    run_id = proc.wait_for("run ").split()[1]
    proc.wait_for("epoch 1/4")
    proc.p.send_signal(signal.SIGTERM)  # epoch 2 has just begun (28 batches of it to go)
    code, out = proc.finish()
    assert code == 143, out
    assert "SIGTERM: finishing this batch and saving a checkpoint" in out
    assert out.rstrip().endswith(f"ended KILLED. Resume it with: cifar-exp train --resume {run_id}")
    c = MlflowClient(tracking_uri)
    killed = c.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["resume_command"] == f"cifar-exp train --resume {run_id}"
    assert _steps(c, run_id, "val_accuracy") in ([0], [0, 1])  # stopped inside the run, before its end
    assert {a.path for a in c.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/last.pt"}

    resumed = run_cli("train", "--resume", run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert f"run {run_id} in experiment 'test'" in resumed.stdout or f"run {run_id}" in resumed.stdout
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "resume_command" not in run.data.tags and "error" not in run.data.tags and run.data.tags["resumed"] == "1"
    (ref,) = c.search_runs([run.info.experiment_id], "attributes.run_name = 'whole'")
    for key in EPOCH_METRICS:
        assert _steps(c, run_id, key) == [0, 1, 2, 3], key  # each epoch exactly once
        ours = [m.value for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]
        theirs = [m.value for m in sorted(c.get_metric_history(ref.info.run_id, key), key=lambda m: m.step)]
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), key
    for key in ("test_accuracy", "test_log_loss", "test_macro_f1"):
        assert run.data.metrics[key] == pytest.approx(ref.data.metrics[key], rel=1e-5), key
    weights = [torch.load(c.download_artifacts(r, "checkpoints/last.pt", str(tmp_path / r)), weights_only=True)["model"]
               for r in (run_id, ref.info.run_id)]
    for k, v in weights[1].items():
        torch.testing.assert_close(weights[0][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_second_sigint_stops_at_once_and_the_run_is_killed(bigger_data, tracking_uri):
    # Wide and large batches, so one batch takes seconds and "at once" is visible.
    proc = Proc("train", "--data-dir", str(bigger_data), "--download", "false", "--device", "cpu", "--width", "64",
                "--batch-size", "300", "--epochs", "4")
    run_id = proc.wait_for("run ").split()[1]
    time.sleep(1)
    proc.p.send_signal(signal.SIGINT)
    proc.wait_for("SIGINT: finishing this batch")
    proc.p.send_signal(signal.SIGINT)
    code, out = proc.finish()
    assert code == 130, out
    assert out.rstrip().endswith(f"SIGINT again: stopped at once; run {run_id} ended KILLED. "
                                 f"Resume it with: cifar-exp train --resume {run_id}")
    assert "epoch 1/4" not in out and "Traceback" not in out
    run = MlflowClient(tracking_uri).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted: SIGINT again: stopped at once"


def _cli(args: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["cifar-exp", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def test_exception_ends_failed_with_traceback_then_resume_finishes(data_root, tracking_uri, monkeypatch, capsys, tmp_path):
    real = T.predict_logits
    calls = []

    def fails_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(*a, **k)

    monkeypatch.setattr(T, "predict_logits", fails_in_epoch_2)
    args = ["train", "--data-dir", str(data_root), "--download", "false", "--device", "cpu", "--width", "16",
            "--batch-size", "32", "--epochs", "2", "--log-model", "false", "--experiment-name", "crash"]
    monkeypatch.setattr(sys, "argv", ["cifar-exp", *args])
    with pytest.raises(RuntimeError, match="injected failure"):
        main()
    err = capsys.readouterr().err
    c = MlflowClient(tracking_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("crash").experiment_id])
    run_id = run.info.run_id
    assert f"run {run_id} ended FAILED (traceback below and in its error.txt)" in err
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: injected failure"
    assert run.data.tags["resume_command"] == f"cifar-exp train --resume {run_id}"
    text = Path(c.download_artifacts(run_id, "error.txt", str(tmp_path))).read_text()
    assert text.startswith("Traceback") and "fails_in_epoch_2" in text and "RuntimeError: injected failure" in text

    monkeypatch.setattr(T, "predict_logits", real)
    assert _cli(["train", "--resume", run_id], monkeypatch) == 0
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert _steps(c, run_id, "val_loss") == [0, 1] and "test_accuracy" in run.data.metrics


def test_resume_refuses_a_finished_run_and_a_changed_config(data_root, tracking_uri, monkeypatch, capsys):
    args = ["train", "--data-dir", str(data_root), "--download", "false", "--device", "cpu", "--width", "16",
            "--batch-size", "32", "--epochs", "1", "--log-model", "false", "--experiment-name", "done"]
    assert _cli(args, monkeypatch) == 0
    c = MlflowClient(tracking_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("done").experiment_id])
    capsys.readouterr()
    assert _cli(["train", "--resume", run.info.run_id], monkeypatch) == 2
    assert capsys.readouterr().err == (f"Error: --resume: run {run.info.run_id} already FINISHED; resume continues "
                                       "KILLED or FAILED runs (start a new run to train more)\n")

    c.set_terminated(run.info.run_id, "KILLED")  # pretend it was stopped: its checkpoint is uploaded
    assert _cli(["train", "--resume", run.info.run_id, "--lr", "0.5"], monkeypatch) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after MLflow's download progress bar
    assert last_line == (f"Error: lr: run {run.info.run_id} was trained with 0.1, not 0.5; only epochs and data_dir "
                         "may change when resuming (start a new run to change more)")
    assert c.get_run(run.info.run_id).info.status == "KILLED"  # refused before the run was touched

    # A run with no error or resume_command tag (as after a SIGKILL) resumes without complaint.
    c.set_terminated(run.info.run_id, "KILLED")
    assert _cli(["train", "--resume", run.info.run_id, "--epochs", "2"], monkeypatch) == 0
    assert "warning" not in capsys.readouterr().err
    assert c.get_run(run.info.run_id).info.status == "FINISHED"


def test_upload_is_retried_then_kept_locally_with_the_command_to_send_it(tracking_uri, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tracking, "UPLOAD_RETRY_SECONDS", 0.01)
    real = mlflow.log_artifact
    attempts = []

    def flaky(path, artifact_path=None):
        attempts.append(path)
        if len(attempts) < 3:
            raise ConnectionError("server down")
        return real(path, artifact_path)

    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"weights")
    with runs.tracked_run("uploads") as run:
        tracker = tracking.MlflowTracker(run.info.run_id, "uploads", tmp_path)
        monkeypatch.setattr(mlflow, "log_artifact", flaky)
        assert tracker.upload(ckpt, "checkpoints") and len(attempts) == 3

        monkeypatch.setattr(mlflow, "log_artifact", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
        assert not tracker.upload(ckpt, "again")
    assert tracker.upload_failures == [str(ckpt)] and ckpt.exists()
    err = capsys.readouterr().err
    assert f"could not upload {ckpt} to run {run.info.run_id} after 3 tries (ConnectionError: down)" in err
    command = err.split("upload it later with: ")[1].strip()
    monkeypatch.setattr(mlflow, "log_artifact", real)
    argv = command.split()
    assert argv[:3] == ["mlflow", "artifacts", "log-artifact"]
    argv[0] = str(Path(sys.executable).parent / "mlflow")
    sent = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    assert sent.returncode == 0, sent.stderr
    names = {a.path for a in MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "again")}
    assert names == {"again/last.pt"}


def test_a_server_that_refuses_this_host_is_named(monkeypatch):
    class Forbidden(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: uri)
    try:
        with pytest.raises(runs.TrackingError, match=r"unreachable: Forbidden \(a 403 means the server's "
                                                         r"--allowed-hosts lacks this host\)"):
            runs.check_tracking_server()
    finally:
        server.shutdown()
