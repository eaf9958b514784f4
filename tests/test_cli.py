"""The `cifar-exp` command as a user runs it: fresh processes, a real sqlite MLflow store."""

import json
import subprocess
import sys

import pytest
from conftest import run_cli
from mlflow import MlflowClient

TINY = ["--width", "16", "--batch-size", "32", "--lr", "0.05", "--device", "cpu", "--download", "false"]


def _no_runs(uri: str) -> bool:
    c = MlflowClient(uri)
    return not c.search_runs([e.experiment_id for e in c.search_experiments()])


@pytest.mark.parametrize(
    "args, message",
    [  # every case is in test_bad_input.py (in process); these check a real process prints just the line
        (["--model", "vgg"], "Error: Invalid value for '--model': 'vgg' is not one of 'cnn', 'resnet18'."),
        (["--batch-size", "5000"], "Error: batch_size: 5000 is larger than the training split (360 images)"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run(args, message, data_root, tracking_uri):
    r = run_cli("train", "--data-dir", str(data_root), *TINY, *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr == message + "\n"
    assert _no_runs(tracking_uri)


def test_help_lists_every_config_field():
    from cifar_exp.config import TrainConfig

    r = run_cli("train", "--help")
    assert r.returncode == 0
    for name in TrainConfig.model_fields:
        assert f"--{name.replace('_', '-')}" in r.stdout


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "cifar_exp", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "0.1.0" in r.stdout


@pytest.mark.slow
def test_train_end_to_end_then_load_in_a_fresh_process(tmp_path, data_root, tracking_uri, runs_home):
    r = run_cli("train", "--data-dir", str(data_root), "--epochs", "2", "--experiment-name", "e2e",
                "--run-name", "tiny", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stdout and "test_accuracy=" in r.stdout
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("e2e")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    p = run.data.params
    assert (p["model"], p["epochs"], p["lr"], p["width"], p["momentum"]) == ("cnn", "2", "0.05", "16", "0.9")
    assert p["data_dir"] == str(data_root) and p["experiment_name"] == "e2e"
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "lr",
                "epoch_seconds", "images_per_second"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [0, 1], key
    for key in ("test_accuracy", "test_top5_accuracy", "test_macro_f1"):
        assert 0 <= run.data.metrics[key] <= 1
    tags = run.data.tags
    assert tags["model_family"] == "cnn" and len(tags["dataset_digest"]) == 16
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"cifar100-train", "cifar100-validation", "cifar100-test"}
    assert json.loads(inputs["cifar100-train"].dataset.profile)["features_shape"] == [360, 3, 32, 32]
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints"} <= artifacts
    assert {a.path for a in c.list_artifacts(run.info.run_id, "checkpoints")} == {"checkpoints/last.pt", "checkpoints/best.pt"}
    assert not (runs_home / run.info.run_id).exists()  # all uploaded, so the local copies are gone
    cfg_file = c.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert "lr: 0.05" in open(cfg_file).read()

    uri = tags["model_uri"]
    assert f"model: {uri}" in r.stdout and uri.startswith("models:/m-")
    model = c.get_logged_model(uri.removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id
    assert {m.key for m in model.metrics} >= {"test_accuracy", "test_macro_f1"}
    code = f"""
import json, numpy as np, mlflow
m = mlflow.pyfunc.load_model({uri!r})
x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
p = m.predict(x)
print(json.dumps({{"shape": list(p.shape), "sums": p.sum(1).tolist(), "min": float(p.min()),
                  "names": m.metadata.metadata["class_names"][:2]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
                              "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [5, 100] and res["min"] >= 0 and res["names"] == ["class_00", "class_01"]
    assert res["sums"] == pytest.approx([1.0] * 5, abs=1e-5)
