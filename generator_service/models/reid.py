"""The re-id network: backbone → global pooling → 512 bottleneck + BN → dropout → classifier.

It is the baseline, DG-Net's teacher, and CR-GAN's identity classifier D_id. `ClassifierHead`
is also the primary/fine-grained head of DG-Net's appearance encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from generator_service.models.backbones import build_backbone
from reidgen.core.checkpoint import Checkpoint
from reidgen.core.config import config_from_dict


@dataclass(frozen=True)
class ReidModelConfig:
    """Everything needed to rebuild the network (saved in checkpoints)."""

    backbone: str = "efficientnet_lite0"
    last_stride: int = 1
    pool: str = "avg"  # "avg" (baseline) or "max" (DG-Net's E_a)
    bottleneck: int = 512
    dropout: float = 0.5
    image_size: tuple[int, int] = (128, 64)


class ClassifierHead(nn.Module):
    """Linear → BatchNorm1d → Dropout → Linear; the post-BN vector is the re-id feature."""

    def __init__(self, in_dim: int, num_classes: int, bottleneck: int = 512, dropout: float = 0.5):
        super().__init__()
        self.embed = nn.Linear(in_dim, bottleneck)
        self.bn = nn.BatchNorm1d(bottleneck)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bottleneck, num_classes)
        nn.init.kaiming_normal_(self.embed.weight, mode="fan_out")
        nn.init.zeros_(self.embed.bias)
        nn.init.normal_(self.bn.weight, 1.0, 0.02)
        nn.init.zeros_(self.bn.bias)
        # A small classifier init keeps the initial loss at about log(K).
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.bn(self.embed(x))
        return self.classifier(self.dropout(feature)), feature


class ReidNet(nn.Module):
    """``forward(x) → (logits, feature)``; ``embed(x) → [feature]`` for evaluation."""

    def __init__(self, config: ReidModelConfig, num_classes: int, pretrained: str = "none"):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, last_stride=config.last_stride, pretrained=pretrained)
        self.head = ClassifierHead(self.backbone.out_channels, num_classes, config.bottleneck, config.dropout)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.backbone(x)
        pooled = F.adaptive_avg_pool2d(fmap, 1) if self.config.pool == "avg" else F.adaptive_max_pool2d(fmap, 1)
        return pooled.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.pooled(x))

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature parts for retrieval (one part here; DG-Net has two)."""
        return [self.head(self.pooled(x))[1]]

    @classmethod
    def from_checkpoint(cls, source: "str | Path | Checkpoint") -> tuple["ReidNet", Checkpoint]:
        """The network of a re-id checkpoint (file, run folder or an already read `Checkpoint`), in
        eval mode, with the checkpoint it came from."""
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.read(source, "reid")
        net = cls(config_from_dict(ReidModelConfig, ckpt.model_config), len(ckpt.label_map))
        return ckpt.load_into(net).eval(), ckpt

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        return self.head.parameters()
