"""CR-GAN inference: render a source person into a target image's context.

Loaded by the online-render trainer feed, and later by the service and the batch workers.
"""
from __future__ import annotations

from pathlib import Path

import torch

from generator_service.checkpoint import load_checkpoint, load_state
from generator_service.crgan_nets import ContextGenerator, CRGANConfig, mask_person
from reidgen.config import config_from_dict


class ContextRenderer:
    """The generator of a CR-GAN checkpoint, in eval mode on ``device``."""

    def __init__(self, checkpoint: str | Path, device: torch.device | str = "cpu"):
        ckpt = load_checkpoint(checkpoint, "crgan")
        self.config = config_from_dict(CRGANConfig, ckpt["model_config"])
        self.train_config = ckpt["train_config"]
        self.generator = ContextGenerator(self.config)
        load_state(self.generator, ckpt["models"]["gen"], f"checkpoint {checkpoint}")
        self.generator.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        # A generator trained on binary person masks (train-crgan --binary-masks) is fed binary ones.
        self.binary_masks = bool((self.train_config or {}).get("binary_masks", False))

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.image_size

    @torch.no_grad()
    def render(self, source: torch.Tensor, target: torch.Tensor,
               target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_G, X_C) for normalised B×3×H×W source/target images and B×1×H×W target person masks."""
        if self.binary_masks:
            target_mask = (target_mask >= 0.5).to(target_mask.dtype)
        masked = mask_person(target, target_mask) if self.config.dual_condition else None
        rendered, _, context_mask = self.generator(source, masked)
        return rendered, context_mask
