"""Pure model factories: architectures and the raw-image wrapper that gets served. No I/O."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

MEAN = (0.5071, 0.4865, 0.4409)  # CIFAR-100 training-set channel statistics
STD = (0.2673, 0.2564, 0.2762)
MAX_CNN_PARAMS = 5_000_000


def _block(c_in: int, c_out: int) -> nn.Sequential:
    conv = lambda i, o: [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]  # noqa: E731
    return nn.Sequential(*conv(c_in, c_out), *conv(c_out, c_out), nn.MaxPool2d(2))


class ScratchCNN(nn.Module):
    """The report's scratch network: three conv-BN-ReLU-pool blocks, then fully connected layers.

    Width 64 gives 64-128-256 channels and 3.3M parameters; the head sees the 4x4 map, not a
    global average, as the report's network did.
    """

    def __init__(self, num_classes: int = 100, width: int = 64, hidden: int = 512, dropout: float = 0.3):
        super().__init__()
        w = width
        self.features = nn.Sequential(_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(4 * w * 4 * 4, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(name: str, num_classes: int = 100, width: int = 64, stem: str = "imagenet") -> nn.Module:
    """A freshly initialised network; pretrained weights go in with `load_backbone`."""
    if name == "cnn":
        return ScratchCNN(num_classes, width)
    if name == "resnet18":
        net = resnet18(num_classes=num_classes)
        if stem == "cifar":  # 3x3 stride-1 conv and no max-pool: a 32x32 image still has a 4x4 map at layer4
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net
    raise ValueError(f"unknown model {name!r}; choose cnn or resnet18")


def head_parameter_names(model: nn.Module) -> set[str]:
    """Parameters that are new for the task and train at the full lr."""
    prefix = "fc." if hasattr(model, "fc") else "head."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


class WeightsMismatch(ValueError):
    pass


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy every non-head weight from `state` (e.g. ImageNet ResNet-18); returns tensors loaded.

    The 1000-class head of an ImageNet checkpoint is dropped; anything else that does not fit
    means the file is for another architecture.
    """
    head = head_parameter_names(model)
    body = {k: v for k, v in state.items() if k not in head}
    own = {k: v for k, v in model.state_dict().items() if k not in head}
    missing = sorted(set(own) - set(body))
    unexpected = sorted(set(body) - set(own))
    bad_shape = sorted(k for k in set(own) & set(body) if own[k].shape != body[k].shape)
    if missing or unexpected or bad_shape:
        show = lambda ks: ", ".join(ks[:3]) + (" ..." if len(ks) > 3 else "")  # noqa: E731
        raise WeightsMismatch(
            f"weights do not fit {type(model).__name__}: missing {len(missing)} [{show(missing)}], "
            f"unexpected {len(unexpected)} [{show(unexpected)}], wrong shape {len(bad_shape)} [{show(bad_shape)}]"
        )
    model.load_state_dict(body, strict=False)
    return len(body)


class Preprocess(nn.Module):
    """uint8 NCHW -> normalized float at the model's input size. Training and serving share it."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("inv_std", 1 / (torch.tensor(STD).view(1, 3, 1, 1) * 255))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) * self.inv_std
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


class ImageClassifier(nn.Module):
    """The served model: raw uint8 images (N, 32, 32, 3) in, class probabilities (N, C) out."""

    def __init__(self, net: nn.Module, size: int = 32):
        super().__init__()
        self.preprocess = Preprocess(size)
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.preprocess(images.permute(0, 3, 1, 2)))
        return logits.float().softmax(dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def penultimate_features(model: nn.Module, batches) -> torch.Tensor:
    """The input of the model's final linear layer (the features t-SNE shows), for each batch.

    Works on eager modules (a hook on the last nn.Linear) and on the graphs torch.export produced for
    a logged model (the graph is cut at the last aten.linear).
    """
    if isinstance(model, torch.fx.GraphModule):
        model = _cut_before_last_linear(model)
        return torch.cat([model(x).float().cpu() for x in batches])
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_pre_hook(lambda _m, args: seen.append(args[0].float().cpu()))
    try:
        for x in batches:
            model(x)
    finally:
        handle.remove()
    return torch.cat(seen)


def _cut_before_last_linear(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    import copy

    gm = copy.deepcopy(gm)
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]
    if not linears:
        raise ValueError("the model graph has no linear layer to take features from")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((linears[-1].args[0],),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
