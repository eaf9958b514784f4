import pytest
import torch
from torchvision.models import resnet18
from torchvision.transforms import v2

from cifar_exp import data as D
from cifar_exp.models import (
    MAX_CNN_PARAMS, MEAN, STD, ImageClassifier, Preprocess, build_model, count_parameters, load_backbone,
)
from cifar_exp.train import build_net


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_output_shape(name):
    net = build_model(name, width=16).eval()
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, 100)


def test_cnn_parameter_bound_at_max_width():
    from cifar_exp.config import TrainConfig

    widest = TrainConfig.model_fields["width"].metadata[-1].le
    assert count_parameters(build_model("cnn", width=widest)) <= MAX_CNN_PARAMS
    assert count_parameters(build_model("cnn", width=16)) < count_parameters(build_model("cnn", width=32))


def test_pretrained_from_path_loads_the_saved_weights(tmp_path, tiny_cfg):
    imagenet_like = resnet18(num_classes=1000)  # a 1000-class head, as in the ImageNet file
    torch.nn.init.normal_(imagenet_like.conv1.weight, 3.0)
    path = tmp_path / "r18.pt"
    torch.save(imagenet_like.state_dict(), path)
    net = build_net(tiny_cfg(model="resnet18", pretrained=str(path)))
    for k, v in imagenet_like.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(net.state_dict()[k], v), k
    assert net.fc.out_features == 100
    fresh = build_net(tiny_cfg(model="resnet18", pretrained="none"))
    assert not torch.equal(fresh.conv1.weight, imagenet_like.conv1.weight)


def test_pretrained_wrong_architecture(tmp_path, tiny_cfg):
    path = tmp_path / "cnn.pt"
    torch.save(build_model("cnn").state_dict(), path)
    with pytest.raises(D.DataError, match="weights do not fit ResNet: missing 120"):
        build_net(tiny_cfg(model="resnet18", pretrained=str(path)))


def test_load_backbone_rejects_wrong_shapes():
    other = resnet18(num_classes=100)
    state = other.state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(ValueError, match=r"wrong shape 1 \[conv1.weight\]"):
        load_backbone(resnet18(num_classes=100), state)


def test_preprocess_matches_torchvision_normalize_and_resizes():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ref = v2.Normalize(MEAN, STD)(x.float() / 255)
    assert torch.allclose(Preprocess(32)(x), ref, atol=1e-5)
    assert Preprocess(64)(x).shape == (2, 3, 64, 64)


def test_image_classifier_takes_raw_nhwc_uint8():
    net = build_model("cnn", width=16).eval()
    clf = ImageClassifier(net, 32).eval()
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    probs = clf(x)
    assert probs.shape == (4, 100) and torch.allclose(probs.sum(1), torch.ones(4))
    expected = net(Preprocess(32)(x.permute(0, 3, 1, 2))).softmax(1)
    assert torch.allclose(probs, expected, atol=1e-6)
