"""The two batch paths (device-resident and DataLoader) and the training options around them."""

import pytest
import torch
from conftest import RecordingTracker

from cifar_exp import data as D
from cifar_exp import pipeline as P
from cifar_exp import train as T
from cifar_exp.config import TrainConfig
from cifar_exp.models import build_model, count_parameters

CPU = torch.device("cpu")


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_path_gives_the_same_batches_as_the_device_path(data_root, workers):
    split = D.load_cifar100(data_root, download=False).train
    for epoch in (0, 3):
        dev = P.DeviceBatches(split, 48, CPU, train=True, seed=7)
        ldr = P.LoaderBatches(split, 48, CPU, train=True, seed=7, workers=workers)
        dev.set_epoch(epoch), ldr.set_epoch(epoch)
        a, b = list(dev), list(ldr)
        assert len(a) == len(b) == len(dev) == 400 // 48
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        # A resumed epoch: from batch 3 on, both paths still match the full pass.
        for (xa, _), (xb, _) in zip(a[3:], ldr.iterate(3)):
            assert torch.equal(xa, xb)
    evals = [P.make_batches(split, 64, CPU, train=False, loader=k) for k in ("device", "dataloader")]
    for e in evals:
        assert torch.equal(torch.cat([x for x, _ in e]), split.images)


def test_training_with_either_loader_gives_the_same_run(tiny_cfg, tmp_path):
    runs = [T.run(tiny_cfg(epochs=1, loader=k, workers=0), RecordingTracker(), workdir=tmp_path / k)
            for k in ("device", "dataloader")]
    assert runs[0].history[0]["train_loss"] == pytest.approx(runs[1].history[0]["train_loss"], rel=1e-6)
    assert runs[0].test_metrics["test_accuracy"] == runs[1].test_metrics["test_accuracy"]


def test_cifar_stem_keeps_resolution_and_needs_no_pretrained_weights():
    net = build_model("resnet18", 100, stem="cifar")
    feats = {}
    net.layer4.register_forward_hook(lambda m, i, o: feats.update(layer4=o.shape))  # returns None: output kept
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert feats["layer4"] == (2, 512, 4, 4)  # the ImageNet stem would leave 1x1
    assert count_parameters(net) < count_parameters(build_model("resnet18", 100))
    cfg = TrainConfig(model="resnet18", stem="cifar", pretrained="none")
    assert cfg.image_size == 32
    with pytest.raises(ValueError, match="stem: the cifar stem has no pretrained weights; add --pretrained none"):
        TrainConfig(model="resnet18", stem="cifar")
    with pytest.raises(ValueError, match="stem: only resnet18 has a choice of stem"):
        TrainConfig(model="cnn", stem="cifar")


@pytest.mark.slow
def test_compile_trains_and_saves_plain_weights(tiny_cfg, tmp_path):
    result = T.run(tiny_cfg(epochs=1, compile=True), RecordingTracker(), workdir=tmp_path)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod.") for k in best)  # the compiled wrapper's prefix stays out
    assert set(best) == set(result.model.net.state_dict())
