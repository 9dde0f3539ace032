"""Pictures of what DG-Net does: the swap grid (paper Fig. 1) and interpolation strips (Figs. 5, 9)."""
from __future__ import annotations

import torch
from PIL import Image

from generator_service.dgnet import DGNet
from generator_service.images import image_grid


@torch.inference_mode()
def swap_grid(model: DGNet, appearance: torch.Tensor, structure: torch.Tensor) -> Image.Image:
    """Rows: appearance providers (real images in the first column); columns: structure
    providers (real images in the first row); each cell G(a_row, s_col)."""
    generated = model.swap(appearance, structure, grid=True)
    rows: list[list[torch.Tensor | None]] = [[None] + list(structure)]
    for i, real in enumerate(appearance):
        rows.append([real] + list(generated[i]))
    return image_grid(rows)


@torch.inference_mode()
def interpolation_strip(model: DGNet, first: torch.Tensor, second: torch.Tensor, steps: int = 8) -> Image.Image:
    """Two rows: appearance interpolated (structure of ``first``), then structure interpolated
    (appearance of ``first``); the real images stand at both ends of each row."""
    rows = []
    for what in ("appearance", "structure"):
        mixed = model.interpolate(first[None], second[None], steps, what=what)
        rows.append([first] + list(mixed) + [second])
    return image_grid(rows)
