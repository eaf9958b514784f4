import numpy as np
import pytest
import torch
from fakedata import write_fake_cifar100

from cifar_exp import train as T
from cifar_exp.config import ConfigError, TrainConfig
from cifar_exp.models import build_model

EPOCH_KEYS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_top5_accuracy", "lr",
              "epoch_seconds", "images_per_second", "train_images"}


def test_run_reports_every_epoch_and_the_test_set(tiny_cfg, recorder, tmp_path):
    result = T.run(tiny_cfg(epochs=3), recorder, workdir=tmp_path / "ck")
    assert [s for s, _ in recorder.metrics] == [0, 1, 2]
    assert all(set(m) == EPOCH_KEYS for _, m in recorder.metrics)
    assert recorder.datasets == {"train": 360, "validation": 40, "test": 100}
    for k in ("test_accuracy", "test_top5_accuracy", "test_macro_f1", "test_macro_auc", "test_ece"):
        assert 0 <= recorder.summary[k] <= 1, k
    # Checkpointed every epoch: last.pt always, best.pt when validation accuracy improved.
    assert recorder.checkpoints.count("last.pt") == 3 and recorder.checkpoints[:2] == ["best.pt", "last.pt"]
    best = torch.load(tmp_path / "ck" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch
    val = [m["val_accuracy"] for _, m in recorder.metrics]
    assert val[result.best_epoch] == max(val)
    # The served model holds the best weights and maps raw images to probabilities.
    model, example, meta = recorder.models[0]
    assert example.shape == (2, 32, 32, 3) and example.dtype == np.uint8
    assert meta["class_names"][0] == "class_00" and len(meta["fine_to_coarse"]) == 100
    sd = model.net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in best["model"].items())
    probs = model(torch.from_numpy(example))
    assert torch.allclose(probs.sum(1), torch.ones(2))
    # Test accuracy in the summary is the best checkpoint's accuracy on the test images.
    acc = (result.extras["test_logits"].argmax(1) == result.extras["test_labels"]).mean()
    assert recorder.summary["test_accuracy"] == pytest.approx(acc)


def test_same_seed_same_result(tiny_cfg, recorder, tmp_path):
    from conftest import RecordingTracker

    a = T.run(tiny_cfg(epochs=1), recorder, workdir=tmp_path / "a")
    b = T.run(tiny_cfg(epochs=1), RecordingTracker(), workdir=tmp_path / "b")
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_cnn_learns_a_learnable_signal(tmp_path, recorder):
    write_fake_cifar100(tmp_path, train_per_class=40, test_per_class=10, classes=20)
    cfg = TrainConfig(model="cnn", width=16, epochs=6, batch_size=32, lr=0.05, data_dir=str(tmp_path),
                      download=False, device="cpu", warmup_epochs=0.5)
    result = T.run(cfg, recorder, workdir=tmp_path / "ck")
    val = [h["val_accuracy"] for h in result.history]
    assert val[0] < val[-1] and max(val) > 0.5  # chance is 1/20
    assert result.test_metrics["test_accuracy"] > 0.5
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_batch_larger_than_the_training_split(tiny_cfg):
    with pytest.raises(ConfigError, match=r"batch_size: 1000 is larger than the training split \(360 images\)"):
        T.prepare(tiny_cfg(batch_size=1000))


def _lrs(cfg, steps_per_epoch=10):
    opt = T.build_optimizer(build_model("cnn", width=8), cfg)
    sched = T.build_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(out)


def test_cosine_with_warmup():
    lrs = _lrs(TrainConfig(epochs=5, lr=0.1, warmup_epochs=1))
    assert lrs[0] == pytest.approx(0.001)  # LinearLR start_factor 0.01
    assert lrs[10] == pytest.approx(0.1) and lrs.max() == pytest.approx(0.1)
    assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) < 0)
    assert lrs[30] == pytest.approx(0.05 * (1 + np.cos(np.pi * 20 / 40)))  # cosine over 40 steps
    assert lrs[-1] < 0.001


def test_multistep():
    lrs = _lrs(TrainConfig(epochs=4, lr=0.1, schedule="multistep", warmup_epochs=0, milestones="2,3"))
    assert np.allclose(lrs[:20], 0.1) and np.allclose(lrs[20:30], 0.01) and np.allclose(lrs[30:], 0.001)


def test_onecycle_peaks_after_warmup():
    lrs = _lrs(TrainConfig(epochs=5, lr=0.1, schedule="onecycle", warmup_epochs=1))
    assert int(np.argmax(lrs)) in (9, 10) and lrs.max() == pytest.approx(0.1, rel=1e-3)
    assert lrs[0] < 0.01 and lrs[-1] < 1e-3


def test_backbone_gets_lower_lr_only_when_pretrained(tmp_path):
    pretrained = TrainConfig(model="resnet18", lr=0.1, backbone_lr_scale=0.1, pretrained=str(tmp_path / "w.pt"))
    opt = T.build_optimizer(build_model("resnet18"), pretrained)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == 512 * 100 + 100  # the new fc
    scratch = T.build_optimizer(build_model("resnet18"), TrainConfig(model="resnet18", pretrained="none"))
    assert [g["lr"] for g in scratch.param_groups] == pytest.approx([0.1, 0.1])
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4


def test_mixup_cutmix_make_soft_targets(tiny_cfg, recorder, tmp_path):
    mixer = T.build_mixer(TrainConfig(mixup_alpha=0.2, cutmix_alpha=1.0))
    x, y = mixer(torch.randn(8, 3, 32, 32), torch.arange(8))
    assert y.shape == (8, 100) and torch.allclose(y.sum(1), torch.ones(8))
    assert T.build_mixer(TrainConfig()) is None
    result = T.run(tiny_cfg(epochs=1, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1), recorder,
                   workdir=tmp_path / "ck")
    assert np.isfinite(result.history[0]["train_loss"])


def test_device_choice():
    assert T.pick_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert T.pick_device("auto").type == expected
