"""Issue 6: ranking, grouping, bootstrap, McNemar, formats, report and the comparison run."""

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from PIL import Image

from cifar_exp import compare as C

BASE = {"lr": "0.1", "epochs": "30", "batch_size": "128", "width": "64", "input_size": "0", "data_dir": "/data"}


def correct_array(n_right: int, n: int = 1000, offset: int = 0) -> np.ndarray:
    c = np.zeros(n, bool)
    c[(np.arange(n_right) + offset) % n] = True
    return c


def make_run(client, exp_id, family, seed, acc, start, correct=None, digest="d1", extra=None, metrics=None, **params):
    run = client.create_run(exp_id, start_time=start, run_name=f"{family}-{seed}")
    p = {**BASE, **params, "model": family, "seed": str(seed), "run_name": f"{family}-{seed}", **(extra or {})}
    m = {"test_accuracy": acc, "test_macro_f1": acc - 0.01, "test_macro_auc": 0.9, "test_top5_accuracy": acc + 0.2,
         "training_seconds": 100.0 * (2 if family == "resnet18" else 1),
         "parameter_count": 11.2e6 if family == "resnet18" else 3.3e6, **(metrics or {})}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, start, 0) for k, v in m.items() if v is not None]
                     + [Metric("val_accuracy", acc * (e + 1) / 3, start, e) for e in range(3)],
                     params=[Param(k, v) for k, v in p.items()],
                     tags=[RunTag("model_family", family), RunTag("dataset_digest", digest)])
    if correct is not None:
        with tempfile.TemporaryDirectory() as tmp:
            true = np.arange(len(correct)) % 100
            pred = np.where(correct, true, (true + 1) % 100)
            np.savez(Path(tmp) / "predictions.npz", true=true, pred=pred)
            client.log_artifact(run.info.run_id, str(Path(tmp) / "predictions.npz"), "evaluation")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@pytest.fixture
def exp(tracking_uri):
    client = MlflowClient(tracking_uri)
    return client, client.create_experiment("cmp")


@pytest.fixture
def two_families(exp):
    client, eid = exp
    ids = {
        "cnn0": make_run(client, eid, "cnn", 0, 0.50, 1000, correct_array(500)),
        "cnn1": make_run(client, eid, "cnn", 1, 0.60, 2000, correct_array(600)),
        "cnn2": make_run(client, eid, "cnn", 2, 0.70, 3000, correct_array(700)),
        "r18a": make_run(client, eid, "resnet18", 0, 0.80, 4000, correct_array(800), input_size="224"),
        "r18b": make_run(client, eid, "resnet18", 1, 0.80, 5000, correct_array(800), input_size="224"),
        "cnn_lr": make_run(client, eid, "cnn", 0, 0.40, 6000, correct_array(400), lr="0.05"),
    }
    return client, eid, ids


def test_rank_order_and_deterministic_ties(two_families):
    _, _, ids = two_families
    result = C.compare("cmp", with_stats=False)
    # r18a and r18b tie at 0.80: the earlier run first.
    assert list(result.runs["run_id"]) == [ids[k] for k in ("r18a", "r18b", "cnn2", "cnn1", "cnn0", "cnn_lr")]
    cheap_first = C.compare("cmp", metric="parameter_count", with_stats=False)
    assert list(cheap_first.runs["family"][:4]) == ["cnn"] * 4
    assert result.best["cnn"]["run_id"] == ids["cnn2"] and result.best["resnet18"]["run_id"] == ids["r18a"]


def test_groups_mean_std_n(two_families):
    _, _, ids = two_families
    g = C.compare("cmp", with_stats=False).groups
    rows = {(r.family, r.setting): r for r in g.itertuples()}
    cnn = rows[("cnn", "input_size=0 lr=0.1")]
    assert cnn.mean == pytest.approx(0.6) and cnn.std == pytest.approx(0.1) and cnn.n == 3
    assert cnn.best_run == ids["cnn2"]
    r18 = rows[("resnet18", "input_size=224 lr=0.1")]
    assert (r18.mean, r18.std, r18.n) == (pytest.approx(0.8), 0.0, 2)
    assert rows[("cnn", "input_size=0 lr=0.05")].n == 1
    assert list(g["family"]) == ["resnet18", "cnn", "cnn"]  # by mean


def test_bootstrap_ci_brackets_the_true_accuracy():
    correct = np.random.default_rng(1).random(10_000) < 0.63
    lo, hi = C.bootstrap_ci(correct)
    assert lo < correct.mean() < hi and 0.015 < hi - lo < 0.025  # 2 x 1.96 x sqrt(.63 x .37 / 10^4) = 0.019


def test_mcnemar_against_a_hand_computed_table():
    # 2x2 table: both right 50, only A right 15, only B right 5, both wrong 30
    a = np.array([1] * 50 + [1] * 15 + [0] * 5 + [0] * 30, bool)
    b = np.array([1] * 50 + [0] * 15 + [1] * 5 + [0] * 30, bool)
    t = C.mcnemar(a, b)
    assert (t["only_a_correct"], t["only_b_correct"]) == (15, 5)
    assert t["chi2"] == pytest.approx((15 - 5 - 1) ** 2 / 20)  # 4.05
    # exact: 2 x P(X <= 5), X ~ Bin(20, 1/2) = 2 x 21700 / 2^20
    assert t["p_value"] == pytest.approx(2 * 21700 / 2**20)


def test_statistics_and_sentence(two_families):
    result = C.compare("cmp")
    paired = result.stats["paired"]
    # cnn2 right on images 0..699, r18a on 0..799: only ResNet-18 right on 100, never the reverse.
    assert (paired["only_a_correct"], paired["only_b_correct"]) == (0, 100)
    assert paired["difference"] == pytest.approx(0.1)
    lo, hi = paired["difference_ci"]
    assert lo <= 0.1 <= hi
    assert result.stats["sentence"].startswith("ResNet-18 beats the scratch CNN by 10.0 points (95% CI ")
    assert "McNemar p=<0.0001" in result.stats["sentence"]
    for fam, acc in (("cnn", 0.7), ("resnet18", 0.8)):
        lo, hi = result.stats["ci"][fam]
        assert lo < acc < hi


def test_every_format_parses(two_families):
    result = C.compare("cmp")
    data = json.loads(C.render(result, "json"))
    assert data["metric"] == "test_accuracy" and len(data["runs"]) == 6 and "sentence" in data["statistics"]
    csv = pd.read_csv(io.StringIO(C.render(result, "csv")))
    assert list(csv["rank"]) == [1, 2, 3, 4, 5, 6] and csv["test_accuracy"].iloc[0] == 0.8
    md = C.render(result, "markdown")
    assert "| rank | run_id |" in md and "|---|" in md
    text = C.render(result, "text")
    assert "Runs ranked by test_accuracy" in text and "ResNet-18 beats the scratch CNN" in text


@pytest.mark.slow
def test_report_and_comparison_run(two_families, tmp_path, tracking_uri):
    client, eid, ids = two_families
    r = run_cli("compare", "--experiment-name", "cmp", "--report", str(tmp_path / "rep"), "--log")
    assert r.returncode == 0, r.stderr
    assert "ResNet-18 beats the scratch CNN by 10.0 points" in r.stdout
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert files == {"report.md", "runs.csv", "accuracy_by_family.png", "val_accuracy_curves.png", "accuracy_vs_cost.png"}
    for png in (tmp_path / "rep").glob("*.png"):
        img = Image.open(png)
        assert img.format == "PNG" and img.size[0] >= 700 and np.asarray(img.convert("L")).std() > 10
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "![accuracy_by_family.png](accuracy_by_family.png)" in report
    run_id = r.stderr.strip().splitlines()[-1].split()[-1]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.experiment_id == eid
    assert run.data.tags["run_kind"] == "comparison"
    assert set(run.data.tags["compared_runs"].split(",")) == set(ids.values())
    assert run.data.tags["best_runs"] == f"cnn:{ids['cnn2']},resnet18:{ids['r18a']}"
    assert {a.path for a in client.list_artifacts(run_id, "comparison")} >= {"comparison/report.md", "comparison/runs.csv"}
    # The comparison run is not itself ranked the next time.
    assert len(C.compare("cmp", with_stats=False).runs) == 6


def test_clear_messages(exp, tracking_uri):
    client, eid = exp
    with pytest.raises(C.CompareError, match="experiment 'nope' not found; experiments here: "):
        C.compare("nope")
    with pytest.raises(C.CompareError, match="no FINISHED training runs in experiment 'cmp'"):
        C.compare("cmp")
    a = make_run(client, eid, "cnn", 0, 0.5, 1000, correct_array(500))
    only = C.compare("cmp")
    assert only.stats["note"] == "only scratch CNN runs are present; train --model resnet18 to compare families"
    no_pred = make_run(client, eid, "resnet18", 0, 0.9, 2000, None)
    with pytest.raises(C.CompareError, match=f"run {no_pred} has no logged evaluation/predictions.npz"):
        C.compare("cmp")
    missing = make_run(client, eid, "cnn", 1, 0.6, 3000, correct_array(600), metrics={"test_macro_auc": None})
    with pytest.raises(C.CompareError, match=f"1 run\\(s\\) lack test_macro_auc: {missing}"):
        C.compare("cmp", metric="test_macro_auc", with_stats=False)
    assert a


def test_different_datasets_refuse_the_paired_test(exp):
    client, eid = exp
    make_run(client, eid, "cnn", 0, 0.5, 1000, correct_array(500), digest="aaa")
    make_run(client, eid, "resnet18", 0, 0.8, 2000, correct_array(800), digest="bbb")
    with pytest.raises(C.CompareError, match="tested on different data \\(dataset digests aaa and bbb\\)"):
        C.compare("cmp")


def test_filters(two_families):
    _, _, ids = two_families
    assert set(C.compare("cmp", family="cnn", with_stats=False).runs["family"]) == {"cnn"}
    got = C.compare("cmp", filter_string="params.lr = '0.05'", with_stats=False)
    assert list(got.runs["run_id"]) == [ids["cnn_lr"]]
    assert len(C.compare("cmp", since="1970-01-01T00:00:04", with_stats=False).runs) == 3  # starts 4000..6000 ms


def test_cli_errors(tracking_uri):
    r = run_cli("compare", "--experiment-name", "ghost")
    assert r.returncode == 2 and r.stderr.startswith("Error: experiment 'ghost' not found") and "Traceback" not in r.stderr
