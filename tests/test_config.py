import json

import pytest

from cifar_exp.config import ConfigError, TrainConfig, load_config


def test_defaults_follow_the_brief():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.val_fraction) == (0.1, 0.9, 5e-4, 0.1)
    assert cfg.experiment_name == "cifar100"
    assert cfg.image_size == 32 and TrainConfig(model="resnet18").image_size == 224


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        ({"model": "vgg"}, "model", "'cnn' or 'resnet18'"),
        ({"lr": 0}, "lr", "greater than 0"),
        ({"lr": -0.1}, "lr", "greater than 0"),
        ({"epochs": 0}, "epochs", "greater than or equal to 1"),
        ({"val_fraction": 1.0}, "val_fraction", "less than 1"),
        ({"val_fraction": 0}, "val_fraction", "greater than 0"),
        ({"schedule": "step"}, "schedule", "'cosine', 'multistep' or 'onecycle'"),
        ({"milestones": "10,x"}, "milestones", "comma-separated positive epochs"),
        ({"input_size": 64}, "input_size", "cnn takes 32x32"),
        ({"width": 200}, "width", "less than or equal to 64"),
        ({"learning_rate": 0.1}, "learning_rate", "unknown config key"),
    ],
)
def test_bad_values_name_field_and_allowed_values(overrides, field, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(**overrides)
    msg = str(e.value)
    assert msg.startswith(f"{field}: ") and fragment in msg and "\n" not in msg


def test_file_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: resnet18\nlr: 0.05\nepochs: 3\n")
    cfg = load_config(f, lr=0.01, epochs=None)  # None = flag not given
    assert (cfg.model, cfg.lr, cfg.epochs) == ("resnet18", 0.01, 3)
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"batch_size": 64}))
    assert load_config(j).batch_size == 64


@pytest.mark.parametrize("text, fragment", [("model: [cnn\n", "not valid YAML"), ("- 1\n- 2\n", "must be a mapping")])
def test_malformed_file(tmp_path, text, fragment):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(f)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "nope.yaml")


def test_dump_round_trips_and_params_are_strings(tmp_path):
    cfg = TrainConfig(model="resnet18", nesterov=True, milestones="5, 8")
    assert TrainConfig(**cfg.model_dump()) == cfg
    params = cfg.to_params()
    assert params["nesterov"] == "true" and params["milestones"] == "5,8" and params["lr"] == "0.1"
    assert set(params) == set(TrainConfig.model_fields)


def test_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR_EXP_DATA_DIR", str(tmp_path))
    assert TrainConfig().data_path == tmp_path
    assert TrainConfig(data_dir="/x/y").data_path.as_posix() == "/x/y"


def test_milestones_default_to_half_and_three_quarters():
    assert TrainConfig(epochs=40).milestone_epochs() == [20, 30]
    assert TrainConfig(epochs=40, milestones="10,35").milestone_epochs() == [10, 35]
