"""Issue 3: tables, figures, predictions, features, and `cifar-exp evaluate` on a trained model."""

import io
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import run_cli
from mlflow import MlflowClient
from PIL import Image

from cifar_exp import train as T
from cifar_exp.evaluate import confused_pairs, evaluate, per_class_table, predictions_record, softmax, stratified_subsample
from cifar_exp.models import ImageClassifier, build_model, penultimate_features

CLASSES = ["a", "b", "c", "d"]


def test_confused_pairs_are_counted_and_ordered():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    pred = np.array([1, 1, 0, 0, 2, 3, 3, 3, 2, 2])
    t = confused_pairs(labels, pred, CLASSES, [0, 0, 1, 1], top=3)
    # counts: (c->d) 3, (a->b) 2, (d->c) 2, (b->a) 1, (b->c) 1; ties go by true then predicted index
    assert t.values.tolist() == [["c", "d", 3, True], ["a", "b", 2, True], ["d", "c", 2, True]]
    assert len(confused_pairs(labels, labels, CLASSES, [0, 0, 1, 1])) == 0


def test_per_class_table_and_predictions():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = np.full((8, 4), 0.1)
    probs[np.arange(8), [0, 1, 1, 1, 2, 3, 3, 0]] = 0.7
    t = per_class_table(probs, labels, CLASSES, np.array([0.5, 0.6, 0.7, 0.8]))
    assert t["class"].tolist() == CLASSES and t["support"].tolist() == [2, 2, 2, 2]
    assert t["recall"].tolist() == pytest.approx([0.5, 1.0, 0.5, 0.5])
    assert t["precision"].tolist() == pytest.approx([0.5, 2 / 3, 1.0, 0.5])
    rec = predictions_record(probs, labels)
    assert rec["pred"].tolist() == [0, 1, 1, 1, 2, 3, 3, 0] and rec["true"].tolist() == labels.tolist()
    assert rec["top5"].shape == (8, 4) and (rec["top5"][:, 0] == rec["pred"]).all()
    assert rec["p_true"].tolist() == pytest.approx([0.7, 0.1, 0.7, 0.7, 0.7, 0.1, 0.7, 0.1])


def test_stratified_subsample():
    labels = np.repeat(np.arange(10), [50] * 9 + [3])
    idx = stratified_subsample(labels, 100, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10] * 9 + [3]
    assert np.array_equal(idx, stratified_subsample(labels, 100, seed=0))


def _png(fig) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_figures_are_real_pngs_of_the_expected_size():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(100), 10)
    logits = rng.normal(0, 1, (1000, 100))
    logits[np.arange(1000), labels] += 2.5
    sample = stratified_subsample(labels, 300, 0)
    feats = rng.normal(0, 1, (len(sample), 64)) + labels[sample, None] % 20
    history = [{"train_loss": 3.0, "val_loss": 3.5, "train_accuracy": 0.2, "val_accuracy": 0.15},
               {"train_loss": 2.0, "val_loss": 2.5, "train_accuracy": 0.4, "val_accuracy": 0.35}]
    ev = evaluate(softmax(logits), labels, [f"c{i}" for i in range(100)], [f"s{i}" for i in range(20)],
                  [i % 20 for i in range(100)], feats, labels[sample], history)
    sizes = {"confusion_matrix.png": (1500, 1400), "superclass_confusion.png": (1000, 900), "roc.png": (800, 700),
             "tsne.png": (1100, 800), "training_curves.png": (1200, 450)}
    assert set(ev.figures) == set(sizes)
    for name, fig in ev.figures.items():
        img = _png(fig)
        assert img.format == "PNG" and img.size == sizes[name], name
        pixels = np.asarray(img.convert("L"), dtype=float)
        assert pixels.std() > 10 and (pixels < 250).mean() > 0.02, f"{name} looks blank"
    assert ev.metrics["test_within_superclass_error_chance"] == pytest.approx(4 / 99)
    assert len(ev.tables["per_class.csv"]) == 100 and len(ev.tables["confused_pairs.csv"]) == 20


def test_features_of_eager_and_exported_models_agree():
    torch.manual_seed(0)
    served = ImageClassifier(build_model("cnn", width=8), 32).eval()
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    eager = penultimate_features(served, [x[:2], x[2:]])
    assert eager.shape == (4, 512)  # the input of the last Linear, after the hidden layer
    exported = torch.export.export(served, (x,), dynamic_shapes=[{0: torch.export.Dim.AUTO}]).module()
    assert torch.allclose(penultimate_features(exported, [x]), eager, atol=1e-5)
    assert torch.allclose(exported(x), served(x), atol=1e-6)  # the original graph is untouched


def test_training_logs_the_evaluation_into_its_run(tiny_cfg, tmp_path):
    from conftest import RecordingTracker

    recorder = RecordingTracker(render=True)
    result = T.run(tiny_cfg(epochs=2), recorder, workdir=tmp_path / "ck")
    (ev,) = recorder.evaluations
    assert set(ev.figures) == {"confusion_matrix.png", "superclass_confusion.png", "roc.png", "tsne.png",
                               "training_curves.png"}
    assert ev.predictions["true"].tolist() == result.extras["test_labels"].tolist()
    assert recorder.summary["test_accuracy"] == ev.metrics["test_accuracy"]
    assert all(png.startswith(b"\x89PNG") for png in ev.figures.values())


@pytest.mark.slow
def test_evaluate_command_on_a_trained_model(tmp_path, data_root, tracking_uri):
    r = run_cli("train", "--data-dir", str(data_root), "--epochs", "1", "--width", "16", "--batch-size", "32",
                "--device", "cpu", "--download", "false", "--experiment-name", "ev")
    assert r.returncode == 0, r.stderr
    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("ev")
    (train_run,) = c.search_runs([exp.experiment_id])
    arts = {a.path for a in c.list_artifacts(train_run.info.run_id, "plots")}
    assert arts == {f"plots/{n}" for n in ("confusion_matrix.png", "superclass_confusion.png", "roc.png", "tsne.png",
                                             "training_curves.png")}
    npz = np.load(c.download_artifacts(train_run.info.run_id, "evaluation/predictions.npz", str(tmp_path)))
    assert npz["top5"].shape == (100, 5) and set(npz.files) == {"true", "pred", "top5", "p_true"}
    uri = train_run.data.tags["model_uri"]

    r = run_cli("evaluate", "--model-uri", uri, "--data-dir", str(data_root), "--download", "false",
                env={"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    assert r.returncode == 0, r.stderr
    assert f"{uri} on 100 test images: accuracy=" in r.stdout
    new_id = r.stdout.strip().splitlines()[-1].split()[-1]
    new = c.get_run(new_id)
    assert new.info.status == "FINISHED" and new.info.experiment_id == exp.experiment_id
    assert new.data.tags["source_run_id"] == train_run.info.run_id and new.data.tags["evaluation_of_model"] == uri
    assert new.data.metrics["test_accuracy"] == pytest.approx(train_run.data.metrics["test_accuracy"], abs=0.011)
    assert new.data.metrics["test_macro_auc"] == pytest.approx(train_run.data.metrics["test_macro_auc"], abs=0.01)
    assert {a.path for a in c.list_artifacts(new_id, "plots")} >= {"plots/tsne.png", "plots/roc.png"}

    # --run-id finds the run's model; --into-source-run logs there instead of a new run.
    r = run_cli("evaluate", "--run-id", train_run.info.run_id, "--data-dir", str(data_root), "--download", "false",
                "--into-source-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(train_run.info.run_id)
    assert len(c.search_runs([exp.experiment_id])) == 2
    assert c.get_run(train_run.info.run_id).info.status == "FINISHED"


def _log_foreign_models(tracking_uri):
    """A plain model, and a cifar_exp-labelled one with 10 outputs, logged straight through mlflow."""
    code = """
import mlflow, torch, numpy as np
from cifar_exp.models import ImageClassifier, build_model
x = np.zeros((2, 32, 32, 3), dtype=np.uint8)
mlflow.set_experiment("foreign")
with mlflow.start_run():
    plain = mlflow.pytorch.log_model(torch.nn.Flatten(), name="plain", input_example=x)
    ten = ImageClassifier(build_model("cnn", num_classes=10, width=8)).eval()
    bad = mlflow.pytorch.log_model(ten, name="ten", input_example=x,
                                   metadata={"cifar_exp_model": "cnn", "class_names": [str(i) for i in range(100)]})
print(plain.model_uri, bad.model_uri)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.slow
def test_evaluate_bad_input(tracking_uri, data_root):
    common = ["--data-dir", str(data_root), "--download", "false"]
    r = run_cli("evaluate", "--run-id", "0123456789abcdef", *common)
    assert r.returncode == 2 and "run id '0123456789abcdef' not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("evaluate", "--model-uri", "models:/m-doesnotexist", *common)
    assert r.returncode == 2 and r.stderr.startswith("Error: no loadable model at models:/m-doesnotexist")
    r = run_cli("evaluate", *common)
    assert r.returncode == 2 and "exactly one of --model-uri and --run-id" in r.stderr
    plain, ten = _log_foreign_models(tracking_uri)
    r = run_cli("evaluate", "--model-uri", plain, *common)
    assert r.returncode == 2 and "is not a cifar_exp model" in r.stderr
    r = run_cli("evaluate", "--model-uri", ten, *common)
    assert r.returncode == 2 and "outputs (10,) per image, expected 100 class probabilities" in r.stderr
    assert "Traceback" not in r.stderr
