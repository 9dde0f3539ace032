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

- `BandStyleLoss` (``style``): the cross-identity image G(a_j, s_i) has no pixel target, only the
  identity and adversarial terms, which move colours slowly. This loss gives it one that does not
  depend on pose: the mean and standard deviation of each channel (pixels and the frozen feature
  maps, as AdaIN style transfer matches them) in horizontal bands must match those of x_j, the
  appearance source. Re-id crops are aligned head to feet, so the bands are roughly head,
  torso, legs and feet: a red top and blue trousers are asked for where they belong.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from generator_service.models.frozen_features import FrozenPyramid

PERCEPTUAL_LEVELS = 3  # strides 4, 8 and 16: textures to parts; stride 32 is little more than identity


STYLE_BANDS = 4  # head, torso, legs, feet in a 128×64 crop; the stride-16 map (8 rows) still has 2 per band


class PerceptualLoss(nn.Module):
    """Mean over feature levels of the L1 distance between the frozen features of two image sets."""

    def __init__(self, features: FrozenPyramid | None = None):
        super().__init__()
        self.features = features if features is not None else FrozenPyramid(levels=PERCEPTUAL_LEVELS)

    def forward(self, generated: Tensor, real: Tensor) -> Tensor:
        """``generated`` holds one or more reconstructions of each of ``real``'s images, in blocks of
        len(real) (self, then positive reconstructions): the real features are computed once."""
        with torch.no_grad():
            targets = self.features(real)
        blocks = _blocks(generated, real)
        return sum(F.l1_loss(g.float(), t.float().repeat(blocks, 1, 1, 1))
                   for g, t in zip(self.features(generated), targets)) / len(targets)


def band_statistics(x: Tensor, bands: int = STYLE_BANDS) -> Tensor:
    """Per image: the mean and standard deviation of each channel in each of ``bands`` horizontal
    stripes, as one (N, 2·C·bands) tensor."""
    if x.shape[2] < bands:
        raise ValueError(f"a map of {x.shape[2]} rows cannot be cut into {bands} bands")
    x = x.float()
    mean = F.adaptive_avg_pool2d(x, (bands, 1))
    var = (F.adaptive_avg_pool2d(x * x, (bands, 1)) - mean * mean).clamp_min(1e-6)
    return torch.cat([mean.flatten(1), var.sqrt().flatten(1)], 1)


class BandStyleLoss(nn.Module):
    """Mean over the pixels and the frozen feature levels of the L1 distance between the band
    statistics (`band_statistics`) of generated images and of their appearance sources."""

    def __init__(self, features: FrozenPyramid | None = None, bands: int = STYLE_BANDS):
        super().__init__()
        self.features = features if features is not None else FrozenPyramid(levels=PERCEPTUAL_LEVELS)
        self.bands = bands

    def _statistics(self, x: Tensor) -> list[Tensor]:
        return [band_statistics(level, self.bands) for level in [x, *self.features(x)]]

    def forward(self, generated: Tensor, source: Tensor) -> Tensor:
        if generated.shape != source.shape:
            raise ValueError(f"generated {tuple(generated.shape)} and sources {tuple(source.shape)} differ in shape")
        with torch.no_grad():
            targets = self._statistics(source)
        pairs = zip(self._statistics(generated), targets)
        return sum(F.l1_loss(g, t) for g, t in pairs) / len(targets)


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
