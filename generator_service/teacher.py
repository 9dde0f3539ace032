"""DG-Net's teacher: a frozen baseline re-id classifier whose soft labels drive L_prim.

Its home is here, beside the generators, because three callers need it: the DG-Net trainer
(online soft labels), the batch workers (soft labels stored with every shard record) and the
re-id trainer's online feed. Workers may not import `trainer`.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from generator_service.checkpoint import load_checkpoint, load_state
from generator_service.reid_model import ReidModelConfig, ReidNet
from reidgen.config import config_from_dict
from reidgen.market import LabelMap


class Teacher:
    """Frozen baseline classifier giving soft labels: mean softmax of the image and its mirror."""

    def __init__(self, path: str, label_map: LabelMap, device: torch.device):
        ckpt = load_checkpoint(path, "reid")
        LabelMap(tuple(ckpt["label_map"])).require_same(label_map, f"teacher {path} vs the training data")
        config = config_from_dict(ReidModelConfig, ckpt["model_config"])
        self.net = ReidNet(config, len(label_map))
        load_state(self.net, ckpt["model"], f"teacher {path}")
        self.net.to(device).eval().requires_grad_(False)
        self.image_size = config.image_size

    @torch.no_grad()
    def soft_labels(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", align_corners=False)
        p = F.softmax(self.net(x)[0].float(), 1) + F.softmax(self.net(torch.flip(x, dims=[3]))[0].float(), 1)
        return p / 2
