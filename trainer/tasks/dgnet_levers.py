"""The reconstruction losses DG-Net training can add to converge faster (issue 22), each off in
the paper preset and weighted by a `LossWeights` field when on:

- `PerceptualLoss` (``perc``): L1 between frozen ImageNet feature maps (EfficientNet-Lite0, three
  scales) of a reconstruction and its real image. Pixel L1 alone is satisfied by a blurred
  average; feature distances ask for edges and textures.
- `identity_loss` (``id_recon``): 1 − cosine between the teacher's embeddings of a reconstruction
  and of its real image, so that G keeps what makes the person recognisable. It trains against
  the teacher, which therefore can no longer judge identity on its own: `reidgen quality --judge`
  takes an independent model for that.

Both apply to the self reconstruction G(a_i, s_i) and the same-identity one G(a_pos, s_i), whose
target is x_i too. The real images' side is computed without gradient; the generated side passes
gradients to G (and E_s) through frozen networks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from generator_service.models.frozen_features import FrozenPyramid

PERCEPTUAL_LEVELS = 3  # strides 4, 8 and 16: textures to parts; stride 32 is little more than identity


class PerceptualLoss(nn.Module):
    """Mean over feature levels of the L1 distance between the frozen features of two image sets."""

    def __init__(self, levels: int = PERCEPTUAL_LEVELS):
        super().__init__()
        self.features = FrozenPyramid(levels=levels)

    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        """``generated`` holds one or more reconstructions of each of ``real``'s images, in blocks of
        len(real) (self, then positive reconstructions): the real features are computed once."""
        with torch.no_grad():
            targets = self.features(real)
        blocks = _blocks(generated, real)
        return sum(F.l1_loss(g.float(), t.float().repeat(blocks, 1, 1, 1))
                   for g, t in zip(self.features(generated), targets)) / len(targets)


def identity_loss(teacher, generated: Tensor, real: Tensor) -> Tensor:
    """Mean of 1 − cos(teacher(generated_i), teacher(real_i)): 0 when each image looks like its
    real one to the teacher. ``generated`` in blocks of len(real), as for `PerceptualLoss`."""
    with torch.no_grad():
        target = teacher.embed(real)
    target = target.repeat(_blocks(generated, real), 1)
    return (1 - F.cosine_similarity(teacher.embed(generated), target, dim=1)).mean()


def _blocks(generated: Tensor, real: Tensor) -> int:
    if len(generated) % len(real):
        raise ValueError(f"{len(generated)} generated images are not whole blocks of the {len(real)} real ones")
    return len(generated) // len(real)
