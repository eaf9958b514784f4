"""MLproject, conda.yaml and pyproject.toml agree with the config and with each other."""

import os
import re
import subprocess
import sys
import tomllib

import pytest
import yaml
from conftest import ROOT
from mlflow import MlflowClient

from cifar_exp.config import TrainConfig

# `mlflow run --experiment-name` picks the experiment of the run it creates; a -P could not move it.
NOT_IN_MLPROJECT = {"experiment_name"}


def _mlproject():
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_mlproject_train_has_a_typed_parameter_per_config_field():
    entry = _mlproject()["entry_points"]["train"]
    params = entry["parameters"]
    assert set(params) == set(TrainConfig.model_fields) - NOT_IN_MLPROJECT
    for name, spec in params.items():
        field = TrainConfig.model_fields[name]
        expected_type = {int: "int", float: "float"}.get(field.annotation, "string")
        assert spec["type"] == expected_type, name
        default = field.default
        if isinstance(default, bool):
            default = str(default).lower()
        assert spec["default"] == default, name
        flag = f"--{name.replace('_', '-')} {{{name}}}"
        assert flag in entry["command"], name
    assert entry["command"].startswith("python -m cifar_exp train")
    assert _mlproject()["conda_env"] == "conda.yaml"


def _names(reqs):
    return {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in reqs}


def test_conda_env_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _names(pip) == _names(project["dependencies"])
    assert f"python={sys.version_info.major}.{sys.version_info.minor}" in conda["dependencies"]


def test_torch_is_not_pinned_above_what_this_machine_has():
    deps = _names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert deps["torch"].endswith("<=2.14.1") and deps["torchvision"].endswith("<=0.29.1")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["cnn", "resnet18"])
def test_mlflow_run_train_entry_point(model, tmp_path, data_root, tracking_uri):
    cmd = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
           "--experiment-name", "proj", "-P", f"model={model}", "-P", "epochs=1", "-P", "width=16",
           "-P", "batch_size=32", "-P", "lr=5e-2", "-P", "input_size=32", "-P", "pretrained=none",
           "-P", f"data_dir={data_root}", "-P", "device=cpu", "-P", "download=false"]
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    c = MlflowClient(tracking_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("proj").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model"] == model and run.data.params["experiment_name"] == "proj"
    assert "param_conflicts" not in run.data.tags  # -P lr=5e-2 and our 0.05 agree
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val_accuracy")] == [0]
    assert "test_accuracy" in run.data.metrics and run.data.tags["model_uri"].startswith("models:/")


def test_readme_documents_every_parameter_and_command():
    readme = (ROOT / "README.md").read_text()
    for name in TrainConfig.model_fields:
        assert f"`--{name.replace('_', '-')}`" in readme, name
    from cifar_exp.cli import cli

    for command in cli.commands:
        assert f"cifar-exp {command}" in readme, command


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in readme and 'pip install --quiet -e ".[test]"' in ci
    assert "python -m pytest" in readme and "\npython -m pytest" in ci


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_loads_and_states_its_expectation(recipe):
    from cifar_exp.config import load_config

    cfg = load_config(recipe)
    text = recipe.read_text()
    assert cfg.model in ("cnn", "resnet18")
    assert re.search(r"^# (Expected test accuracy|Target): .*\d+%", text, re.M), "states the accuracy it aims at"
    assert "# Source: " in text and "NOT measured here" in text
    assert f"cifar-exp train --config recipes/{recipe.name}" in text
    assert f"recipes/{recipe.name}" in (ROOT / "README.md").read_text()


def test_there_is_a_recipe_per_model():
    from cifar_exp.config import load_config

    configs = [load_config(p) for p in (ROOT / "recipes").glob("*.yaml")]
    assert {(c.model, c.stem, c.pretrained) for c in configs} == {
        ("resnet18", "imagenet", "imagenet"), ("resnet18", "cifar", "none"), ("cnn", "imagenet", "imagenet")}
