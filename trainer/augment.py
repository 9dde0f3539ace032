"""Differentiable augmentation for GAN discriminators (after Zhao et al., "Differentiable
Augmentation for Data-Efficient GAN Training", NeurIPS 2020).

D sees every image, real or generated, through the same random transformations, and G's
gradients flow back through them. D then cannot memorise the few real images a short run shows
it, and G is not pushed towards the augmentations, since real images are augmented alike.
Written from the paper's description of its three transformations:

- ``color``: brightness (add U(−0.5, 0.5)), saturation (scale the deviation from the pixel's
  channel mean by U(0, 2)), contrast (scale the deviation from the image mean by U(0.5, 1.5));
- ``translation``: shift by up to 1/8 of the height and width, zeros coming in;
- ``cutout``: zero a rectangle of half the height and width at a random place.

Each image draws its own parameters. Images are the project's ImageNet-normalised tensors; the
colour transformations work on [0, 1] pixels, as in the paper.
"""
from __future__ import annotations

import torch
from torch import Tensor

from reidgen.core.images import denormalize, normalize

POLICIES = ("color", "translation", "cutout")


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"color,translation,cutout"`` → its names, checked; ``""`` → none."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ValueError(f"DiffAugment policy {policy!r}: unknown {', '.join(unknown)}; expected a comma-separated "
                         f"subset of {', '.join(POLICIES)}")
    return names


def _uniform(x: Tensor, low: float, high: float) -> Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * (high - low) + low


def color(x: Tensor) -> Tensor:
    """x: [0, 1] pixels."""
    x = x + _uniform(x, -0.5, 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _uniform(x, 0.0, 2.0) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def _shift_indices(length: int, shift: Tensor) -> Tensor:
    """(B, length) source index of each output position after a shift, −1 where zeros come in."""
    source = torch.arange(length, device=shift.device).unsqueeze(0) - shift.unsqueeze(1)
    return torch.where((source >= 0) & (source < length), source, torch.full_like(source, -1))


def translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Per image, an integer shift in [−ratio·size, ratio·size] along each axis, zero fill."""
    b, _, h, w = x.shape
    dy = torch.randint(-int(h * ratio), int(h * ratio) + 1, (b,), device=x.device)
    dx = torch.randint(-int(w * ratio), int(w * ratio) + 1, (b,), device=x.device)
    rows, cols = _shift_indices(h, dy), _shift_indices(w, dx)
    # Pad one zero row/column at index −1's place, then gather (differentiable in x).
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
    rows, cols = rows % (h + 1), cols % (w + 1)  # −1 → the zero padding
    index = (rows.unsqueeze(2) * (w + 1) + cols.unsqueeze(1)).view(b, 1, h * w).expand(-1, x.shape[1], -1)
    return padded.flatten(2).gather(2, index).view_as(x)


def cutout(x: Tensor, ratio: float = 0.5) -> Tensor:
    """Per image, zero a (ratio·h)×(ratio·w) rectangle centred anywhere (clipped at the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(-(ch // 2), h - ch // 2 + 1, (b, 1, 1), device=x.device)
    left = torch.randint(-(cw // 2), w - cw // 2 + 1, (b, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


class DiffAugment:
    """The augmentation D's inputs go through: ``augment(images)`` applies the policy's
    transformations in the paper's order (colour, translation, cutout), fresh parameters per call
    and per image; an empty policy returns the images as they are."""

    def __init__(self, policy: str = "color,translation,cutout"):
        self.names = parse_policy(policy)

    def __call__(self, images: Tensor) -> Tensor:
        if not self.names:
            return images
        x = images
        if "color" in self.names:
            x = normalize(color(denormalize(x)))
        if "translation" in self.names:
            x = translation(x)
        if "cutout" in self.names:
            x = cutout(x)
        return x
