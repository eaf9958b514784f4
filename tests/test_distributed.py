"""torchrun on CPU: two gloo processes make one run, like one process with the same global batch."""

import signal

import pytest
from conftest import Proc, run_cli
from fakedata import write_fake_cifar100
from mlflow import MlflowClient

from cifar_exp import pipeline as P
from cifar_exp.data import load_cifar100

pytestmark = pytest.mark.slow
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "train_images")


def _history(c: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


def test_ranks_take_disjoint_equal_shards_of_each_epoch(data_root):
    import torch

    split = load_cifar100(data_root, download=False).train
    shards = [P.DeviceBatches(split, 16, torch.device("cpu"), train=True, seed=3, rank=r, world=2) for r in (0, 1)]
    whole = P.DeviceBatches(split, 32, torch.device("cpu"), train=True, seed=3)
    assert len(shards[0]) == len(shards[1]) == len(whole) == 12  # same steps, same images per epoch
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(3 * 100_003))
    for r, shard in enumerate(shards):
        idx = torch.cat([i for i in shard._plan(0)[0]])
        assert torch.equal(idx, perm[r::2][:192])  # DistributedSampler's rank::world split, drop_last
    seen = [set(torch.cat(s._plan(0)[0]).tolist()) for s in shards]
    assert not seen[0] & seen[1]


def test_two_gloo_processes_make_one_run_close_to_one_process(data_root, tracking_uri):
    base = ["train", "--data-dir", str(data_root), "--download", "false", "--device", "cpu", "--width", "8",
            "--epochs", "2", "--log-model", "false", "--experiment-name", "ddp"]
    one = run_cli(*base, "--batch-size", "32", "--lr", "0.05", "--run-name", "one")
    assert one.returncode == 0, one.stderr
    two = run_cli(*base, "--batch-size", "16", "--lr", "0.025", "--nproc-per-node", "2", "--run-name", "two")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("run ") == 1 and two.stdout.count("epoch 2/2") == 1  # rank 1 says nothing
    c = MlflowClient(tracking_uri)
    runs = {r.info.run_name: r for r in c.search_runs([c.get_experiment_by_name("ddp").experiment_id])}
    assert set(runs) == {"one", "two"}  # rank 1 created no run
    r1, r2 = runs["one"], runs["two"]
    assert r2.info.status == "FINISHED"
    assert (r2.data.tags["world_size"], r2.data.tags["global_batch_size"], r2.data.tags["effective_lr"]) == ("2", "32", "0.05")
    for key in EPOCH_METRICS:
        assert [s for s, _ in _history(c, r2.info.run_id, key)] == [0, 1], key  # each epoch once
    assert _history(c, r2.info.run_id, "train_images") == _history(c, r1.info.run_id, "train_images") == [(0, 352), (1, 352)]
    lrs = [[v for _, v in _history(c, r.info.run_id, "lr")] for r in (r1, r2)]
    assert lrs[1] == pytest.approx(lrs[0])  # lr x 2 processes = the single process's schedule
    for key in ("train_loss", "val_loss"):  # same global batch and lr; only per-rank BatchNorm statistics differ
        for (_, a), (_, b) in zip(_history(c, r1.info.run_id, key), _history(c, r2.info.run_id, key)):
            assert abs(a - b) < 0.1 * a, key
    assert 0 <= r2.data.metrics["test_accuracy"] <= 1


def test_sigterm_under_torchrun_then_resume_on_two_processes(tmp_path, tracking_uri):
    write_fake_cifar100(tmp_path, train_per_class=10, test_per_class=2)
    proc = Proc("train", "--data-dir", str(tmp_path), "--download", "false", "--device", "cpu", "--width", "8",
                "--epochs", "3", "--batch-size", "16", "--log-model", "false", "--nproc-per-node", "2")
    run_id = proc.wait_for("run ").split()[1]
    proc.wait_for("epoch 1/3")
    proc.p.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks
    code, out = proc.finish()
    assert code != 0 and f"ended KILLED. Resume it with: cifar-exp train --resume {run_id}" in out
    c = MlflowClient(tracking_uri)
    assert c.get_run(run_id).info.status == "KILLED"
    resumed = run_cli("train", "--resume", run_id, "--nproc-per-node", "2")
    assert resumed.returncode == 0, resumed.stderr
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history(c, run_id, "train_images") == [(0, 896), (1, 896), (2, 896)]  # nothing counted twice or lost
    for key in EPOCH_METRICS:
        assert [s for s, _ in _history(c, run_id, key)] == [0, 1, 2], key
