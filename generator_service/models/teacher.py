"""DG-Net's teacher: a frozen baseline re-id classifier whose soft labels drive L_prim.

Its home is here, beside the generators, because three callers need it: the DG-Net trainer
(online soft labels), the batch workers (soft labels stored with every shard record) and the
re-id trainer's online feed. Workers may not import `trainer`.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from generator_service.models.reid import ReidNet
from reidgen.core.checkpoint import Checkpoint
from reidgen.core.errors import ReidgenError
from reidgen.core.market import LabelMap


class Teacher:
    """Frozen baseline classifier giving soft labels: mean softmax of the image and its mirror."""

    def __init__(self, path: str, label_map: LabelMap, device: torch.device):
        self.net, ckpt = ReidNet.from_checkpoint(path)
        LabelMap(ckpt.label_map).require_same(label_map, f"teacher {path} vs the training data")
        self.net.to(device).requires_grad_(False)
        self.path, self.identity = path, ckpt.identity
        self.image_size = self.net.config.image_size

    @classmethod
    def recorded_in(cls, ckpt: Checkpoint, device: torch.device) -> "Teacher":
        """The teacher a generator's checkpoint names (DG-Net: its teacher; CR-GAN: its D_id), checked
        to be the very file it was trained with when the checkpoint recorded its content hash."""
        path = ckpt.train_config.get("teacher") or ckpt.train_config.get("id_model")
        if not path:
            raise ReidgenError(f"checkpoint {ckpt.path} names no teacher")
        teacher = cls(path, LabelMap(ckpt.label_map), device)
        recorded = ckpt.lineage.get("teacher") or {}
        if recorded.get("path") == path and recorded.get("sha256_16") not in (None, teacher.identity):
            # Soft labels from another file than the one the generator was trained with would be
            # used (and stored with every record) as if they were right.
            raise ReidgenError(f"the teacher {path} that checkpoint {ckpt.path} names has changed since training "
                               f"(content {teacher.identity}, recorded {recorded['sha256_16']})",
                               public="teacher: the teacher that the checkpoint names has changed since training (its "
                                      "content differs from the recorded one); give a teacher or set soft_labels "
                                      "false", code="bad_teacher")
        return teacher

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding feature of each image, at the teacher's image size. Gradients reach the
        images (never the frozen weights): DG-Net's identity-on-reconstruction lever trains G with them."""
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        return self.net(x)[1].float()

    @torch.no_grad()
    def soft_labels(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        p = F.softmax(self.net(x)[0].float(), 1) + F.softmax(self.net(torch.flip(x, dims=[3]))[0].float(), 1)
        return p / 2
