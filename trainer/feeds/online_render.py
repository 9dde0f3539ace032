"""Cross-domain fine-tuning feed: every source batch is rendered into the contexts of random
target images by a CR-GAN generator, on the fly (nothing is stored).

The rendering goes through the inference engine and a `Synthesizer`, as every other generated
image does, and stays on the device. Target images come in their own seeded stream, keyed by the
training step, so a resumed fine-tuning run renders exactly the same images.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from generator_service.models.masks import ensure_masks, mask_provider_for
from reidgen.core.checkpoint import Checkpoint, run_folder
from reidgen.core.market import scan_split
from trainer.feeds.data import MaskedImageDataset, endless_batches, epoch_loader
from trainer.feeds.samplers import RandomBatchSampler


def crgan_mask_cache(crgan_checkpoint: str | Path, train_config: dict, target: str) -> Path | None:
    """The CR-GAN run's own cache of the target's person masks, when fine-tuning renders into the
    same target data set (same provider, same files): thousands of masks, minutes of CPU not to redo."""
    if Path(train_config["target"]).resolve() != Path(target).resolve():
        return None
    root = Path(train_config["mask_cache"]) if train_config["mask_cache"] else \
        run_folder(Path(crgan_checkpoint).resolve()) / "masks"  # RUN/checkpoints/last.pt → RUN/masks
    return root / "target" if (root / "target").is_dir() else None


class RenderFeed:
    def __init__(self, crgan_checkpoint: str, target: str, device: torch.device, batch_size: int, seed: int,
                 workers: int, start_step: int, mask_cache: str | Path, progress: bool = True):
        from generator_service.inference.engine import Engine
        from generator_service.inference.synthesis import Synthesizer

        ckpt = Checkpoint.read(crgan_checkpoint, "crgan")
        engine = Engine.from_checkpoint(ckpt, str(device))
        self.synthesizer = Synthesizer(engine, teacher=None)  # the re-id loss needs no soft labels
        self.image_size = self.synthesizer.model.image_size
        # The target masks come from the provider the generator was trained with, no stand-in.
        provider, _ = mask_provider_for(ckpt.train_config)
        items = scan_split(target, "train")
        cache, done = ensure_masks(provider, items, crgan_mask_cache(ckpt.path, ckpt.train_config, target)
                                   or mask_cache, progress=progress)
        kept = set(done)
        items = [it for it in items if it.path in kept]
        self.dataset = MaskedImageDataset(items, cache, self.image_size, [-1] * len(items), [-1] * len(items))
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
        n = len(source)
        # The engine brings the sources to the generator's size; the renderings go back to the re-id size.
        rendered = self.synthesizer(source.detach(), target[:n], mask[:n]).images
        reid_size = tuple(source.shape[-2:])
        if tuple(rendered.shape[-2:]) != reid_size:
            rendered = F.interpolate(rendered, size=reid_size, mode="bilinear", align_corners=False)
        return rendered.to(self.device)
