"""A projected discriminator for DG-Net (after Sauer et al., "Projected GANs Converge Faster",
NeurIPS 2021): D judges images in the feature space of a frozen ImageNet network instead of in
pixels, which is what lets a GAN reach a given FID with far fewer images.

Written from the paper's description; structure of one forward:

1. frozen EfficientNet-Lite0 features at strides 4, 8, 16, 32 (`FrozenPyramid`);
2. cross-channel mixing (CCM): a fixed random 1×1 convolution per level widens its channels;
3. cross-scale mixing (CSM): top-down, each level adds the (upsampled, fixed random 1×1) mix of
   the level below it, so shallow levels also see deep features;
4. one small trainable patch discriminator per level (spectral-normalised strided convolutions),
   whose patch logits are summed over levels in a hinge loss.

Only step 4 learns. The random projections are drawn from a private generator (``seed``), so they
are the same in every run and the trainer's random streams are untouched; they are kept in the
state dict all the same, so a checkpoint is self-contained.

The interface is the multi-scale PatchGAN's (`d_loss`, `g_loss`), so the trainer uses either.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm

from generator_service.models.frozen_features import FrozenPyramid


def _fixed_conv(cin: int, cout: int, generator: torch.Generator) -> nn.Conv2d:
    """A 1×1 convolution with Kaiming-random weights that never train."""
    conv = nn.Conv2d(cin, cout, 1)
    with torch.no_grad():
        nn.init.kaiming_normal_(conv.weight, nonlinearity="linear", generator=generator)
        conv.bias.zero_()
    return conv.requires_grad_(False)


class PatchHead(nn.Module):
    """One level's discriminator: strided 4×4 conv blocks until the shorter side is 4 or less,
    then a 3×3 conv to one patch logit per position."""

    def __init__(self, cin: int, size: tuple[int, int], width: int):
        super().__init__()
        layers: list[nn.Module] = []
        h, w, ch = *size, cin
        while min(h, w) > 4:  # widths: width, then doubling up to 4 × width
            out = min(2 * ch, 4 * width) if layers else width
            layers += [spectral_norm(nn.Conv2d(ch, out, 4, 2, 1)), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            ch, h, w = out, h // 2, w // 2
        layers.append(spectral_norm(nn.Conv2d(ch, 1, 3, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ProjectedDiscriminator(nn.Module):
    """D on frozen, randomly projected ImageNet features: (B,3,H,W) → a list of patch-logit maps,
    one per feature level. ``width`` is the channel count of the shallowest mixed level (×2 per
    level down); ``scale`` resizes images before the feature network."""

    def __init__(self, image_size: tuple[int, int], width: int = 64, scale: float = 2.0, seed: int = 0):
        super().__init__()
        self.features = FrozenPyramid(levels=4, scale=scale)
        widths = [width * 2 ** i for i in range(len(self.features.channels))]
        generator = torch.Generator().manual_seed(seed)
        self.ccm = nn.ModuleList(_fixed_conv(c, w, generator) for c, w in zip(self.features.channels, widths))
        self.csm = nn.ModuleList(_fixed_conv(widths[i + 1], widths[i], generator) for i in range(len(widths) - 1))
        h, w = round(image_size[0] * scale), round(image_size[1] * scale)
        sizes = [(h // 2 ** (i + 2), w // 2 ** (i + 2)) for i in range(len(widths))]
        self.heads = nn.ModuleList(PatchHead(c, size, width) for c, size in zip(widths, sizes))

    def mixed(self, x: Tensor) -> list[Tensor]:
        """The projected features: CCM on every level, then CSM from the deepest level up."""
        levels = [ccm(f) for ccm, f in zip(self.ccm, self.features(x))]
        out = [levels[-1]]
        for i in range(len(levels) - 2, -1, -1):
            deeper = F.interpolate(out[0], size=levels[i].shape[-2:], mode="bilinear", align_corners=False)
            out.insert(0, levels[i] + self.csm[i](deeper))
        return out

    def forward(self, x: Tensor) -> list[Tensor]:
        return [head(f) for head, f in zip(self.heads, self.mixed(x))]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def d_loss(self, real: Tensor, fake: Tensor, r1_weight: float = 0.0) -> tuple[Tensor, Tensor]:
        """(hinge loss, 0): Projected GAN uses no gradient penalty, so ``r1_weight`` is ignored.
        ``fake`` is detached here: the D step must not push gradients into G."""
        loss = sum(F.relu(1 - r).mean() + F.relu(1 + f).mean()
                   for r, f in zip(self(real), self(fake.detach()), strict=True))
        return loss, loss.new_zeros(())

    def g_loss(self, fake: Tensor) -> Tensor:
        """Hinge loss of G: minus the mean patch logit, summed over levels."""
        return sum(-f.mean() for f in self(fake))
