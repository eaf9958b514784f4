"""Checkpoints and resume, in process: stop anywhere, continue, and end exactly where an uninterrupted run ends."""

import random

import numpy as np
import pytest
import torch
from conftest import RecordingTracker

from cifar_exp import checkpoint as C
from cifar_exp import train as T
from cifar_exp.config import ConfigError


def _stop_after(n_calls: int):
    """A should_stop that turns true on its n-th call. It is asked after every batch and at every epoch's
    end; tiny_cfg has 11 batches per epoch, so calls 1-11 are epoch 1's batches, 12 its end, 13 epoch 2's first batch."""
    calls = iter(range(10**9))
    return lambda: next(calls) + 1 >= n_calls


def _final_weights(result: T.TrainResult) -> dict[str, torch.Tensor]:
    return result.model.net.state_dict()


@pytest.mark.parametrize("stop_at", [14, 24], ids=["mid-epoch", "epoch-boundary"])
def test_stopped_and_resumed_equals_uninterrupted(tiny_cfg, tmp_path, stop_at):
    cfg = tiny_cfg(epochs=3, deterministic=True, mixup_alpha=0.2)  # mixup: the global RNG must resume too
    whole = T.run(cfg, RecordingTracker(), workdir=tmp_path / "whole")

    rec = RecordingTracker()
    with pytest.raises(T.Interrupted):
        T.run(cfg, rec, workdir=tmp_path / "cut", should_stop=_stop_after(stop_at))
    state = C.load(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["next_epoch"], state["progress"]["batches"]) == ((1, 2) if stop_at == 14 else (2, 0))
    assert [s for s, _ in rec.metrics] == list(range(state["next_epoch"]))

    resumed = T.run(cfg, rec, T.prepare(cfg), workdir=tmp_path / "cut", resume=state)
    assert [s for s, _ in rec.metrics] == [0, 1, 2]  # every epoch once, no gap
    for a, b in zip(whole.history, resumed.history):
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
    for k, v in _final_weights(whole).items():
        torch.testing.assert_close(_final_weights(resumed)[k], v, rtol=1e-5, atol=1e-6)
    assert resumed.test_metrics["test_accuracy"] == whole.test_metrics["test_accuracy"]
    assert resumed.test_metrics["test_log_loss"] == pytest.approx(whole.test_metrics["test_log_loss"], rel=1e-5)


def test_resume_logs_an_epoch_the_kill_left_unlogged(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=3)
    rec = RecordingTracker()
    with pytest.raises(T.Interrupted):
        T.run(cfg, rec, workdir=tmp_path, should_stop=_stop_after(24))
    rec.metrics = [m for m in rec.metrics if m[0] != 1]  # as if killed between checkpoint and log_metrics
    T.run(cfg, rec, T.prepare(cfg), workdir=tmp_path, resume=C.load(tmp_path / "checkpoints" / "last.pt"))
    assert sorted(s for s, _ in rec.metrics) == [0, 1, 2]


def test_more_epochs_replans_the_schedule_from_where_it_stopped(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=2)
    with pytest.raises(T.Interrupted):
        T.run(cfg, RecordingTracker(), workdir=tmp_path, should_stop=_stop_after(12))
    state = C.load(tmp_path / "checkpoints" / "last.pt")
    longer = C.resume_config(state, {"epochs": 4}, "r1")
    rec = RecordingTracker()
    T.run(longer, rec, T.prepare(longer), workdir=tmp_path, resume=state)
    # The lr each epoch starts at is the 4-epoch schedule's, fast-forwarded by the 11 steps already taken.
    net = T.build_net(longer)
    opt = T.build_optimizer(net, longer)
    sched = T.build_scheduler(opt, longer, 11)
    expected = []
    for step in range(44):
        if step % 11 == 0:
            expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [s for s, _ in rec.metrics] == [0, 1, 2, 3]  # epoch 0 came from the checkpoint's history
    assert [m["lr"] for s, m in rec.metrics if s > 0] == pytest.approx(expected[1:])


def test_resume_config_allows_only_epochs_and_data_dir(tiny_cfg, tmp_path):
    cfg = tiny_cfg(epochs=2)
    with pytest.raises(T.Interrupted):
        T.run(cfg, RecordingTracker(), workdir=tmp_path, should_stop=_stop_after(13))  # in epoch 2
    state = C.load(tmp_path / "checkpoints" / "last.pt")
    assert C.resume_config(state, {}, "r1") == cfg
    moved = C.resume_config(state, {"data_dir": str(tmp_path), "epochs": 5}, "r1")
    assert (moved.data_dir, moved.epochs, moved.lr) == (str(tmp_path), 5, cfg.lr)
    with pytest.raises(ConfigError, match=r"^lr: run r1 was trained with 0.05, not 0.1; only epochs and data_dir may change"):
        C.resume_config(state, {"lr": 0.1}, "r1")
    with pytest.raises(ConfigError, match=r"^epochs: run r1 has already started epoch 2; give --epochs 2 or more"):
        C.resume_config(state, {"epochs": 1}, "r1")
    with pytest.raises(ConfigError, match=r"^lr: Input should be greater than 0"):
        C.resume_config(state, {"lr": -1}, "r1")


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    C.save(tmp_path / "s.pt", rng=C.rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.set_rng_state(C.load(tmp_path / "s.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_save_is_atomic(tmp_path, monkeypatch):
    C.save(tmp_path / "last.pt", epoch=1)

    def crash(obj, f):
        open(f, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        C.save(tmp_path / "last.pt", epoch=2)
    assert C.load(tmp_path / "last.pt") == {"epoch": 1}
