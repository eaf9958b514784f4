"""Sweeps: a grid of child runs under one parent run, validated up front, grouped by compare."""

import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cifar_exp import compare as C
from cifar_exp.cli import main
from cifar_exp.config import ConfigError
from cifar_exp.sweep import expand, parse_axis


def test_axes_and_grid():
    assert parse_axis("lr=0.05, 0.1") == ("lr", ["0.05", "0.1"])
    assert parse_axis("label-smoothing=0,0.1") == ("label_smoothing", ["0", "0.1"])
    with pytest.raises(ConfigError, match=r"--param 'lr': write NAME=V1,V2"):
        parse_axis("lr")
    with pytest.raises(ConfigError, match="--param lrr: unknown config key"):
        parse_axis("lrr=1")
    with pytest.raises(ConfigError, match="--param seed: use --seeds for this axis"):
        parse_axis("seed=1,2")
    grid = expand({"epochs": 3}, ["cnn", "resnet18"], [0, 1], {"lr": ["0.05", "0.1"]})
    assert len(grid) == 8 and {(c.model, c.seed, c.lr) for c in grid} == {
        (m, s, lr) for m in ("cnn", "resnet18") for s in (0, 1) for lr in (0.05, 0.1)}
    assert all(c.epochs == 3 for c in grid)
    with pytest.raises(ConfigError, match=r"lr: Input should be greater than 0 \(got '-1'\)"):
        expand({}, ["cnn"], [0], {"lr": ["0.1", "-1"]})


def _main(args, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["cifar-exp", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


@pytest.mark.slow
def test_two_models_two_seeds_under_one_parent(data_root, tracking_uri, monkeypatch, capsys, tmp_path):
    code = _main(["sweep", "--models", "cnn,resnet18", "--seeds", "0,1", "--data-dir", str(data_root),
                  "--download", "false", "--device", "cpu", "--width", "8", "--batch-size", "32", "--epochs", "1",
                  "--pretrained", "none", "--input-size", "32", "--log-model", "false", "--experiment-name", "sw",
                  "--name", "grid"], monkeypatch)
    out = capsys.readouterr().out
    assert code == 0, out
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("sw").experiment_id
    (parent,) = c.search_runs([exp], "tags.run_kind = 'sweep'")
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED" and parent.info.run_name == "grid"
    assert parent.data.params == {"models": "cnn,resnet18", "seeds": "0,1"}
    assert parent.data.metrics == {"children_finished": 4.0, "children_failed": 0.0}
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{pid}'")
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert {(r.data.params["model"], r.data.params["seed"]) for r in children} == {
        ("cnn", "0"), ("cnn", "1"), ("resnet18", "0"), ("resnet18", "1")}
    table = Path(c.download_artifacts(pid, "sweep/children.csv", str(tmp_path))).read_text().splitlines()
    assert table[0].startswith("run_id,model,seed,status") and len(table) == 5
    assert f"cifar-exp compare --experiment-name sw --sweep {pid}" in out

    result = C.compare("sw", sweep=pid, with_stats=False)
    assert len(result.runs) == 4  # the parent is not ranked
    assert sorted(result.groups["n"]) == [2, 2] and set(result.groups["family"]) == {"cnn", "resnet18"}
    with pytest.raises(C.CompareError, match="no FINISHED training runs"):
        C.compare("sw", sweep="0" * 32, with_stats=False)


def test_a_bad_grid_value_stops_before_any_run(data_root, tracking_uri, monkeypatch, capsys):
    code = _main(["sweep", "--models", "cnn,vgg", "--seeds", "0", "--data-dir", str(data_root)], monkeypatch)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "Error: model: Input should be 'cnn' or 'resnet18' (got 'vgg')"
    c = MlflowClient(tracking_uri)
    assert not c.search_runs([e.experiment_id for e in c.search_experiments()])


@pytest.mark.slow
def test_mlflow_run_sweep_entry_point_nests_under_the_launch(data_root, tracking_uri, tmp_path):
    import os
    import subprocess

    from conftest import ROOT

    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "sweep", "--env-manager", "local",
           "--experiment-name", "mlsweep", "-P", "models=cnn", "-P", "seeds=0,1", "-P", "epochs=1",
           "-P", f"data_dir={data_root}", "-P", "device=cpu"]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("mlsweep").experiment_id
    (parent,) = c.search_runs([exp], "tags.run_kind = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.tags.get("mlflow.project.entryPoint") == "sweep"
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert all(r.info.status == "FINISHED" and r.data.params["experiment_name"] == "mlsweep" for r in children)
