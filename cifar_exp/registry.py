"""Finding and loading logged cifar_exp models by URI or run id."""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


class ModelError(LookupError):
    """A model that cannot be found or used; the message says which and why."""


@dataclass
class LoadedModel:
    uri: str
    module: torch.nn.Module  # raw uint8 (N, 32, 32, 3) -> probabilities (N, C)
    metadata: dict
    source_run_id: str | None
    model_id: str | None


def _first_line(e: Exception) -> str:
    return str(getattr(e, "message", e)).strip().splitlines()[0][:300]


def model_uri_for_run(run_id: str) -> str:
    """The model a training run logged."""
    from .runs import find_run

    client = MlflowClient()
    run = find_run(run_id, ModelError, "is MLFLOW_TRACKING_URI the store that has it?")
    if uri := run.data.tags.get("model_uri"):
        return uri
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    if not models:
        raise ModelError(f"run {run_id} logged no model (was it trained with --log-model false?)")
    return f"models:/{models[0].model_id}"


def load(uri: str) -> LoadedModel:
    """Load a cifar_exp model with its metadata; refuses models that are not ours."""
    try:
        info = mlflow.models.get_model_info(uri)
        module = mlflow.pytorch.load_model(uri)
    except (MlflowException, OSError) as e:
        raise ModelError(f"no loadable model at {uri}: {_first_line(e)}") from None
    metadata = info.metadata or {}
    if "cifar_exp_model" not in metadata or "class_names" not in metadata:
        raise ModelError(f"{uri} is not a cifar_exp model (its MLmodel metadata lacks cifar_exp_model and class_names)")
    source = getattr(info, "run_id", None)
    return LoadedModel(uri, module, metadata, source, getattr(info, "model_id", None))


# --- the registry: versions, aliases, promotion --------------------------------------------------

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Registration:
    name: str
    version: int
    aliases: list[str]
    previous_champion: int | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_aliases(name: str, aliases: dict[str, int]) -> None:
    """Point several aliases at versions, all or nothing: a failure restores the ones already moved."""
    client = MlflowClient()
    before = {a: _alias_version(client, name, a) for a in aliases}
    moved: list[str] = []
    try:
        for alias, version in aliases.items():
            client.set_registered_model_alias(name, alias, str(version))
            moved.append(alias)
    except Exception:
        for alias in moved:
            old = before[alias]
            if old is None:
                client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, old.version)
        raise


def register(model_uri: str, name: str, family: str, metrics: dict[str, float], run_id: str) -> Registration:
    """Register a trained model as a new version of `name`; `challenger`, and `champion` if it beats the champion.

    It takes the champion alias when there is no champion yet or when its test accuracy is strictly higher.
    """
    client = MlflowClient()
    tags = {"model_family": family, "source_run_id": run_id,
            "test_accuracy": f"{metrics['test_accuracy']:.6f}", "test_macro_f1": f"{metrics['test_macro_f1']:.6f}"}
    mv = mlflow.register_model(model_uri, name, tags=tags)
    champion = _alias_version(client, name, CHAMPION)
    new_acc = metrics["test_accuracy"]
    promote_it = champion is None or new_acc > float(champion.tags.get("test_accuracy", "-inf"))
    aliases = {CHALLENGER: int(mv.version)} | ({CHAMPION: int(mv.version)} if promote_it else {})
    set_aliases(name, aliases)
    return Registration(name, int(mv.version), sorted(aliases), None if champion is None else int(champion.version))


def promote(name: str, version: int, alias: str = CHAMPION) -> None:
    client = MlflowClient()
    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise ModelError(f"model {name!r} has no version {version}") from None
    set_aliases(name, {alias: version})


def list_versions(name: str) -> list[dict]:
    """Every version of `name`, newest first, with aliases and the metrics it was registered with."""
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise ModelError(f"no registered model named {name!r}") from None
    aliases: dict[int, list[str]] = {}
    for alias, version in model.aliases.items():  # search results leave aliases out on some stores
        aliases.setdefault(int(version), []).append(alias)
    versions = client.search_model_versions(f"name = '{name}'")
    rows = []
    for v in sorted(versions, key=lambda v: -int(v.version)):
        rows.append({
            "version": int(v.version), "aliases": sorted(aliases.get(int(v.version), [])),
            "family": v.tags.get("model_family", ""),
            "test_accuracy": float(v.tags["test_accuracy"]) if "test_accuracy" in v.tags else None,
            "test_macro_f1": float(v.tags["test_macro_f1"]) if "test_macro_f1" in v.tags else None,
            "run_id": v.run_id or v.tags.get("source_run_id", ""),
        })
    return rows


# --- prediction -------------------------------------------------------------------------------

def check_images(images: np.ndarray) -> np.ndarray:
    """The served models take uint8 RGB (N, 32, 32, 3); say exactly what is wrong otherwise."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise ValueError(f"images must have shape (N, 32, 32, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 RGB values 0..255, got dtype {images.dtype}")
    return images


def predict(model: LoadedModel, images: np.ndarray, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) per image."""
    x = torch.from_numpy(check_images(images).copy())
    with torch.no_grad():
        probs = model.module(x).float().numpy()
    names = model.metadata["class_names"]
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    return [[(names[c], float(probs[i, c])) for c in row] for i, row in enumerate(top)]
