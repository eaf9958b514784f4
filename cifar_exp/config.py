"""The one training config: CLI flags, MLproject parameters and logged params all come from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATA_DIR_ENV = "CIFAR_EXP_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/cifar_exp/data"
# Resolution each model gets when input_size is 0: the ImageNet stem of ResNet-18 leaves a 1x1
# map at layer4 on 32x32 inputs, which is why the source report stalled near 58%.
AUTO_INPUT_SIZE = {"cnn": 32, "resnet18": 224}
# What may differ when a run is resumed: more epochs, or the same data found elsewhere.
RESUMABLE_CHANGES = ("epochs", "data_dir")


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


class TrainConfig(BaseModel):
    """Everything that defines a training run. `model_dump()` is what gets logged and checkpointed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # what to train
    model: Literal["cnn", "resnet18"] = Field("cnn", description="architecture")
    width: int = Field(64, ge=8, le=64, description="cnn: channels of the first block (doubles twice); 64 = 3.3M params")
    pretrained: str = Field(
        "imagenet", description="resnet18 weights: 'imagenet', 'none', or a path to a state-dict file"
    )
    stem: Literal["imagenet", "cifar"] = Field(
        "imagenet", description="resnet18 stem: imagenet (7x7/2 conv + max-pool) or cifar (3x3/1 conv, no pool; needs pretrained none)"
    )
    input_size: int = Field(
        0, ge=0, le=512, description="side in pixels the model sees; 0 = 32 for cnn, 224 for resnet18"
    )
    # optimisation
    epochs: int = Field(30, ge=1, description="passes over the training split")
    batch_size: int = Field(128, ge=1, description="images per optimizer step")
    lr: float = Field(0.1, gt=0, description="peak learning rate of the new layers")
    backbone_lr_scale: float = Field(
        0.1, gt=0, le=1, description="resnet18 pretrained backbone lr = lr x this"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, description="L2 penalty (SGD weight_decay)")
    schedule: Literal["cosine", "multistep", "onecycle"] = Field("cosine", description="lr schedule")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warmup (cosine, multistep; onecycle's rise)")
    milestones: str = Field(
        "", description="multistep: comma-separated epochs where lr x gamma; empty = 50%,75% of epochs"
    )
    gamma: float = Field(0.1, gt=0, le=1, description="multistep decay factor")
    # regularisation
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    mixup_alpha: float = Field(0.0, ge=0, description="MixUp Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, description="CutMix Beta(alpha, alpha); 0 = off")
    # data
    data_dir: str = Field(
        "", description=f"folder holding CIFAR-100; empty = ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR}"
    )
    download: bool = Field(True, description="download CIFAR-100 when it is missing")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the 50k training images held out")
    loader: Literal["device", "dataloader"] = Field(
        "device", description="device: the dataset lives on the device; dataloader: streamed by DataLoader workers (same batches)"
    )
    workers: int = Field(2, ge=0, description="DataLoader worker processes (loader dataloader)")
    # reproducibility and hardware
    seed: int = Field(0, ge=0, description="seeds python, numpy and torch")
    deterministic: bool = Field(False, description="deterministic kernels (slower)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="auto = cuda > mps > cpu")
    amp: bool = Field(True, description="mixed precision on CUDA: bf16, or fp16 with loss scaling where bf16 is missing")
    channels_last: bool = Field(True, description="NHWC memory layout (faster convolutions on GPU and CPU)")
    tf32: bool = Field(True, description="TF32 matmuls and convolutions on Ampere+ GPUs")
    compile: bool = Field(False, description="torch.compile the model (falls back to eager if it fails)")
    # tracking
    experiment_name: str = Field("cifar100", min_length=1, description="MLflow experiment")
    run_name: str = Field("", description="MLflow run name; empty = <model>-<timestamp>")
    log_model: bool = Field(True, description="log the best model as an MLflow LoggedModel")
    register_as: str = Field("", description="register the model as a new version of this name; empty = don't")

    @model_validator(mode="after")
    def _register_needs_model(self) -> "TrainConfig":
        if self.register_as and not self.log_model:
            raise ValueError("register_as: needs log_model true (there is no model to register)")
        return self

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, v: str) -> str:
        return v if v in ("imagenet", "none") else str(Path(v).expanduser())

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError("must be comma-separated positive epochs, e.g. '15,25'")
        return ",".join(parts)

    # "Auto" values stay as typed (0, ""), so the logged params equal what `mlflow run -P` logged;
    # the properties below resolve them.
    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if 0 < self.input_size < 32:
            raise ValueError("input_size: must be 0 (auto) or at least 32")
        if self.model == "cnn" and self.input_size not in (0, 32):
            raise ValueError("input_size: the cnn takes 32x32 images only (use 0 or 32)")
        if self.stem == "cifar" and self.model != "resnet18":
            raise ValueError("stem: only resnet18 has a choice of stem")
        if self.stem == "cifar" and self.pretrained != "none":
            raise ValueError("stem: the cifar stem has no pretrained weights; add --pretrained none")
        return self

    @property
    def image_size(self) -> int:
        return self.input_size or (32 if self.stem == "cifar" else AUTO_INPUT_SIZE[self.model])

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()

    def milestone_epochs(self) -> list[int]:
        if self.milestones:
            return [int(m) for m in self.milestones.split(",")]
        return [max(1, round(self.epochs * 0.5)), max(1, round(self.epochs * 0.75))]

    def to_params(self) -> dict[str, str]:
        """Flat string params for MLflow (values as a user would type them)."""
        return {k: _as_text(v) for k, v in self.model_dump(mode="json").items()}


def _as_text(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line meant for the user."""


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `field: message (got value)`."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown config key; allowed keys: {', '.join(TrainConfig.model_fields)}"
            lines.append(f"{field}: {msg}")
            continue
        # A model-level check names its own field at the start of the message.
        head, sep, rest = msg.partition(": ")
        if field == "config" and sep and head in TrainConfig.model_fields:
            field, msg = head, rest
        got = f" (got {e['input']!r})" if field != "config" and not isinstance(e["input"], dict) else ""
        lines.append(f"{field}: {msg}{got}")
    return "; ".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of config fields."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"config file {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of config keys, got {type(data).__name__}")
    return data


def given_values(path: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """What the user set: the config file's keys, then overrides (None means 'not given')."""
    values = read_config_file(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def make_config(values: dict[str, Any]) -> TrainConfig:
    """TrainConfig(**values), with a one-line ConfigError for anything invalid."""
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < config file < overrides (None means 'not given'); raises ConfigError."""
    return make_config(given_values(path, **overrides))
