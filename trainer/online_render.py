"""Cross-domain fine-tuning feed: every source batch is rendered into the contexts of random
target images by a CR-GAN generator, on the fly (nothing is stored).

Target images come in their own seeded stream, keyed by the training step, so a resumed
fine-tuning run renders exactly the same images.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from generator_service.checkpoint import resolve_checkpoint
from generator_service.crgan import ContextRenderer
from generator_service.masks import build_mask_provider, ensure_masks
from reidgen.market import scan_split
from trainer.data import MaskedImageDataset, endless_batches, epoch_loader
from trainer.samplers import RandomBatchSampler


def crgan_mask_cache(crgan_checkpoint: str, train_config: dict, target: str) -> Path | None:
    """The CR-GAN run's own cache of the target's person masks, when fine-tuning renders into the
    same target data set (same provider, same files): thousands of masks, minutes of CPU not to redo."""
    if Path(train_config["target"]).resolve() != Path(target).resolve():
        return None
    root = Path(train_config["mask_cache"]) if train_config["mask_cache"] else \
        resolve_checkpoint(crgan_checkpoint).resolve().parent.parent / "masks"  # RUN/checkpoints/last.pt → RUN/masks
    return root / "target" if (root / "target").is_dir() else None


class RenderFeed:
    def __init__(self, crgan_checkpoint: str, target: str, device: torch.device, batch_size: int, seed: int,
                 workers: int, start_step: int, mask_cache: str | Path, progress: bool = True):
        self.renderer = ContextRenderer(crgan_checkpoint, device)
        cfg = self.renderer.train_config
        opts = {"model_path": cfg["mask_model"]} if cfg["mask_model"] and cfg["masks"] in ("pose", "selfie") else {}
        provider = build_mask_provider(cfg["masks"], **opts)
        items = scan_split(target, "train")
        cache, done = ensure_masks(provider, items, crgan_mask_cache(crgan_checkpoint, cfg, target) or mask_cache,
                                   progress=progress)
        kept = set(done)
        items = [it for it in items if it.path in kept]
        self.dataset = MaskedImageDataset(items, cache, self.renderer.image_size, [-1] * len(items), [-1] * len(items))
        self.sampler = RandomBatchSampler(len(items), batch_size, seed + 11)
        self.device, self.workers = device, workers
        self.stream = endless_batches(lambda s: epoch_loader(self.dataset, s, workers, device),
                                      [self.sampler], start_step)

    def __call__(self, source: torch.Tensor) -> torch.Tensor:
        """Render a batch of source images (at the re-id model's size) into target contexts."""
        ((target, mask, _, _, ok),) = next(self.stream)
        target, mask = target.to(self.device), mask.to(self.device)
        if not bool(ok.all()):  # an unreadable target image: borrow a readable one's context
            good = ok.nonzero().flatten().to(self.device)
            pick = good[torch.arange(len(ok), device=self.device) % len(good)]
            target, mask = target[pick], mask[pick]
        size = self.renderer.image_size
        reid_size = tuple(source.shape[-2:])
        x = source if reid_size == size else F.interpolate(source, size=size, mode="bilinear", align_corners=False)
        n = len(x)
        rendered, _ = self.renderer.render(x, target[:n], mask[:n])
        if reid_size != size:
            rendered = F.interpolate(rendered, size=reid_size, mode="bilinear", align_corners=False)
        return rendered
