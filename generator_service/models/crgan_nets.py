"""CR-GAN networks: the dual-conditional generator, the domain discriminator D_d and the camera
classifier D_cam. (The identity classifier D_id is the baseline re-id network, `ReidNet`.)

The paper gives the design, not the layer counts (its supplementary is not available); the
choices below are written down in `CRGANConfig` and can be changed there:

- identity pathway θ_S and context pathway θ_T: two separate conv stacks (7×7 then 3×3, no
  normalisation), on X_S and on the person-masked target X'_T = X_T ∘ (1 − M_T);
- depth-wise concatenation, then a U-Net: ``depth`` down-sampling residual blocks (no norm),
  ``bottleneck_blocks`` residual blocks, ``depth`` up-sampling residual blocks with instance
  norm and skip connections from the encoder levels;
- two heads: the residual map X_R (3 channels, the normalised image space) and the context
  mask X_C (1 channel, sigmoid); X_G = X_R ∘ X_C + X_S ∘ (1 − X_C);
- D_d: Gaussian-noise input layer (training only), PatchGAN of 4×4 convolutions, LSGAN;
- D_cam: five layers, four stride-2 conv-BN-ReLU and a linear classifier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass(frozen=True)
class CRGANConfig:
    image_size: tuple[int, int] = (256, 128)
    base_channels: int = 64          # width of each pathway; the U-Net doubles it per level
    depth: int = 3                   # down/up-sampling residual blocks
    bottleneck_blocks: int = 2
    dual_condition: bool = True      # False: the "w/o dual condition" ablation (X_S only)
    dis_channels: int = 64
    dis_layers: int = 3              # stride-2 layers of the PatchGAN
    dis_noise_std: float = 0.1       # Gaussian-noise input layer of D_d (normalised image units)
    cam_channels: tuple[int, ...] = (32, 64, 128, 256)

    def __post_init__(self) -> None:
        h, w = self.image_size
        if h % 2 ** self.depth or w % 2 ** self.depth:
            raise ValueError(f"image_size {self.image_size} must be divisible by 2**depth = {2 ** self.depth}")


CRGAN_PRESETS = {
    "paper": CRGANConfig(),
    "small": CRGANConfig(image_size=(128, 64), base_channels=32, depth=3, bottleneck_blocks=2,
                         dis_channels=32, cam_channels=(16, 32, 64, 128)),
}


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


class DownBlock(nn.Module):
    """Residual block halving the resolution; no normalisation (keeps the inputs' style)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), _lrelu(), nn.Conv2d(cout, cout, 3, 1, 1))
        self.skip = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.body(x) + self.skip(x), 0.2)


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm: bool):
        super().__init__()
        norm_layer = (lambda: nn.InstanceNorm2d(channels, affine=True)) if norm else nn.Identity
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1), norm_layer(), _lrelu(),
                                  nn.Conv2d(channels, channels, 3, 1, 1), norm_layer())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class UpBlock(nn.Module):
    """Upsample ×2, concatenate the encoder's skip, residual block with instance norm."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin + cskip, cout, 3, 1, 1), nn.InstanceNorm2d(cout, affine=True), _lrelu(),
            nn.Conv2d(cout, cout, 3, 1, 1), nn.InstanceNorm2d(cout, affine=True))
        self.skip = nn.Conv2d(cin + cskip, cout, 1)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = torch.cat([F.interpolate(x, scale_factor=2, mode="nearest"), skip], dim=1)
        return F.leaky_relu(self.body(x) + self.skip(x), 0.2)


def _pathway(c: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, c, 7, 1, 3), _lrelu(), nn.Conv2d(c, c, 3, 1, 1), _lrelu())


class ContextGenerator(nn.Module):
    """G(X_S, X'_T) → (X_G, X_R, X_C). Images are normalised tensors B×3×H×W."""

    def __init__(self, cfg: CRGANConfig = CRGAN_PRESETS["paper"]):
        super().__init__()
        self.cfg = cfg
        c = cfg.base_channels
        self.identity_path = _pathway(c)
        self.context_path = _pathway(c) if cfg.dual_condition else None
        widths = [c * (2 if cfg.dual_condition else 1)] + [c * 2 ** (i + 1) for i in range(cfg.depth)]
        self.down = nn.ModuleList(DownBlock(widths[i], widths[i + 1]) for i in range(cfg.depth))
        self.bottleneck = nn.Sequential(*[ResBlock(widths[-1], norm=False) for _ in range(cfg.bottleneck_blocks)])
        self.up = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i]) for i in reversed(range(cfg.depth)))
        self.to_residual = nn.Conv2d(widths[0], 3, 3, 1, 1)
        self.to_mask = nn.Conv2d(widths[0], 1, 3, 1, 1)

    def forward(self, source: Tensor, masked_target: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = self.identity_path(source)
        if self.context_path is not None:
            if masked_target is None:
                raise ValueError("the dual-conditional generator needs the masked target image")
            h = torch.cat([h, self.context_path(masked_target)], dim=1)
        skips = []
        for block in self.down:
            skips.append(h)
            h = block(h)
        h = self.bottleneck(h)
        for block, skip in zip(self.up, reversed(skips)):
            h = block(h, skip)
        residual, context_mask = self.to_residual(h), torch.sigmoid(self.to_mask(h))
        return compose(residual, context_mask, source), residual, context_mask


def compose(residual: Tensor, context_mask: Tensor, source: Tensor) -> Tensor:
    """X_G = X_R ∘ X_C + X_S ∘ (1 − X_C): the context mask chooses where to change the source."""
    return residual * context_mask + source * (1 - context_mask)


def mask_person(target: Tensor, person_mask: Tensor) -> Tensor:
    """X'_T = X_T ∘ (1 − M_T): the target's context with its person removed (0 = mean colour)."""
    return target * (1 - person_mask)


class DomainDiscriminator(nn.Module):
    """D_d: Gaussian noise on the input while training, then a PatchGAN (LSGAN targets 1/0)."""

    def __init__(self, cfg: CRGANConfig = CRGAN_PRESETS["paper"]):
        super().__init__()
        self.noise_std = cfg.dis_noise_std
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.dis_channels, 4, 2, 1), _lrelu()]
        c = cfg.dis_channels
        for _ in range(cfg.dis_layers - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.InstanceNorm2d(2 * c, affine=True), _lrelu()]
            c *= 2
        layers += [nn.Conv2d(c, 2 * c, 4, 1, 1), nn.InstanceNorm2d(2 * c, affine=True), _lrelu(),
                   nn.Conv2d(2 * c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.noise_std > 0:
            x = x + self.noise_std * torch.randn_like(x)
        return self.net(x)


class CameraClassifier(nn.Module):
    """D_cam: a light five-layer CNN predicting the target domain's camera."""

    def __init__(self, num_cameras: int, cfg: CRGANConfig = CRGAN_PRESETS["paper"]):
        super().__init__()
        layers, cin = [], 3
        for c in cfg.cam_channels:
            layers += [nn.Conv2d(cin, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_cameras)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))
