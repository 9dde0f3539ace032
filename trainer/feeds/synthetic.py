"""The synthetic half of `train-reid --shards` / `--online-generator`, and its losses.

A feed gives, per training step, a batch of generated images with their targets:
``(images, soft labels B×K, structure labels B)`` on the device. Offline, from LMDB shards
(`trainer.feeds.shards.ShardDataset`, its own seeded stream keyed by the step so a resumed run
reads the same records); online, made on the fly from the real batch by the same engine and
teacher (the `Synthesizer` the batch workers use, keeping tensors on the device): each real
image's appearance on the structure of another person of the batch.

The losses are those of DG-Net's discriminative module on generated images: L_prim =
KL(q ‖ p) of the primary head to the teacher's soft label, L_fine = CE of a fine-grained head
to the structure provider's identity (the real images keep their cross-entropy).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from reidgen.core.errors import ReidgenError
from reidgen.core.market import LabelMap
from trainer.feeds.data import endless_batches, epoch_loader
from trainer.feeds.samplers import RandomBatchSampler


class ShardFeed:
    def __init__(self, roots, transform, label_map: LabelMap, image_size, batch_size: int, seed: int,
                 workers: int, device: torch.device, start_step: int, strict: bool = False):
        from trainer.feeds.shards import ShardDataset

        self.dataset = ShardDataset(list(roots), transform, label_map, image_size, strict=strict)
        if len(self.dataset) < batch_size:
            raise ReidgenError(f"the shards hold {len(self.dataset)} records, fewer than one synthetic batch "
                               f"of {batch_size}")
        self.device = device
        self.sampler = RandomBatchSampler(len(self.dataset), batch_size, seed + 13)
        self.stream = endless_batches(lambda s: epoch_loader(self.dataset, s, workers, device), [self.sampler],
                                      start_step)
        self.bad: list[str] = []

    def __call__(self, real_images: torch.Tensor, real_labels: torch.Tensor):
        ((images, soft, fine, _, ok, indices),) = next(self.stream)
        if not bool(ok.all()):
            self.bad += [self.dataset.name(int(i)) for i in indices[~ok]]
            images, soft, fine = images[ok], soft[ok], fine[ok]
        return (images.to(self.device, non_blocking=True), soft.to(self.device, non_blocking=True),
                fine.to(self.device))


class OnlineFeed:
    """Samples made on the fly by a DG-Net checkpoint (and the teacher it records) from the real batch."""

    def __init__(self, checkpoint: str, data: str, label_map: LabelMap, device: torch.device, batch_size: int):
        from generator_service.inference.engine import Engine
        from generator_service.inference.synthesis import Synthesizer
        from generator_service.models.teacher import Teacher
        from reidgen.core.checkpoint import Checkpoint

        ckpt = Checkpoint.read(checkpoint, "dgnet")
        LabelMap(ckpt.label_map).require_same(label_map, f"--online-generator {checkpoint} vs the training data")
        if not ckpt.train_config.get("teacher"):
            raise ReidgenError(f"--online-generator {checkpoint} has no teacher for the soft labels")
        engine = Engine.from_checkpoint(ckpt, str(device))
        self.synthesizer = Synthesizer(engine, Teacher.recorded_in(ckpt, engine.device))
        self.device, self.batch_size = device, batch_size
        self.bad: list[str] = []

    def __call__(self, real_images: torch.Tensor, real_labels: torch.Tensor):
        n = min(self.batch_size, len(real_images))
        partner = cross_identity_partners(real_labels)[:n]
        made = self.synthesizer(real_images[:n].detach(), real_images[partner].detach())
        images = made.images
        size = tuple(real_images.shape[-2:])
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        # Made under no_grad, not inference mode: they enter the classifier's forward and backward as they are.
        return images.to(self.device), made.soft.to(self.device), real_labels[partner].to(self.device)


def cross_identity_partners(labels: torch.Tensor) -> torch.Tensor:
    """For each image of a batch, the index of the next image (cyclically) of another identity,
    or simply the next one when the batch holds one identity: cross-identity swaps, as the shards."""
    n = len(labels)
    index = torch.arange(n, device=labels.device)
    distance = (index[None, :] - index[:, None]) % n  # 0 for the image itself, then 1, 2, … onwards
    distance = torch.where(labels[None, :] != labels[:, None], distance, n + distance)
    distance.fill_diagonal_(2 * n)
    return distance.argmin(1)


def synthetic_losses(logits_prim: torch.Tensor, logits_fine: torch.Tensor, soft: torch.Tensor,
                     fine_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_prim, L_fine) on generated images; records without a soft label (or a structure
    identity outside the label map) do not count in the respective loss."""
    zero = logits_prim.sum() * 0
    has_soft = soft.sum(1) > 0
    l_prim = F.kl_div(F.log_softmax(logits_prim[has_soft].float(), 1), soft[has_soft],
                      reduction="batchmean") if bool(has_soft.any()) else zero
    known = fine_labels >= 0
    l_fine = F.cross_entropy(logits_fine[known].float(), fine_labels[known]) if bool(known.any()) else zero
    return l_prim, l_fine
