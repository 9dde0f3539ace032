"""Pictures of what the generators do: DG-Net's swap grid (paper Fig. 1) and interpolation strips
(Figs. 5, 9); CR-GAN's rendering grid (sources × target contexts)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from generator_service.models.dgnet import DGNet
from reidgen.core.images import decode_image, image_grid, normalize


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


@torch.inference_mode()
def render_grid(engine, model: str, sources: Sequence[str], targets: Sequence[str],
                context_masks: bool = False) -> Image.Image:
    """Rows: source persons (real images in the first column); columns: target images (real, in
    the first row); each cell is the row's person rendered into the column's context by the CR-GAN
    ``model`` of ``engine``. ``context_masks`` adds, under each row, the context masks X_C (white:
    where the rendering replaced the source)."""
    served = engine.models[model]
    source = torch.stack([served.image_tensor(decode_image(p)) for p in sources])
    pictures = [decode_image(p) for p in targets]
    target = torch.stack([served.image_tensor(im) for im in pictures])
    target_mask = torch.stack([served.mask_tensor(served.person_mask(im)) for im in pictures])
    s, t = len(sources), len(targets)
    rendered, masks = engine.render_batch(source.repeat_interleave(t, 0), target.repeat(s, 1, 1, 1),
                                          target_mask.repeat(s, 1, 1, 1), model=model)
    rows: list[list[torch.Tensor | None]] = [[None] + list(target)]
    for i in range(s):
        rows.append([source[i]] + list(rendered[i * t:(i + 1) * t]))
        if context_masks:
            rows.append([None] + [normalize(m) for m in masks[i * t:(i + 1) * t]])
    return image_grid(rows)
