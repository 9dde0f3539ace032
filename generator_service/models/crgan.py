"""CR-GAN inference: render a source person into a target image's context.

The engine's ``crgan`` kind runs it (`generator_service.inference.kinds`): the HTTP service, the batch
workers, render grids and the online-render feed of ``train-reid`` reach it through the engine;
the quality measurement (`trainer.evaluation.quality_crgan`) calls it directly, in its own batches.
"""
from __future__ import annotations

from pathlib import Path

import torch

from generator_service.models.crgan_nets import ContextGenerator, CRGANConfig, mask_person
from reidgen.core.checkpoint import Checkpoint, load_state
from reidgen.core.config import config_from_dict


class ContextRenderer:
    """The generator G of a CR-GAN model, in eval mode on ``device``; build it with `from_checkpoint`."""

    def __init__(self, config: CRGANConfig, generator: ContextGenerator, train_config: dict | None = None,
                 device: torch.device | str = "cpu"):
        self.config, self.train_config = config, train_config or {}
        self.device = torch.device(device)
        self.generator = generator.to(self.device).eval().requires_grad_(False)
        # A generator trained on binary person masks (train-crgan --binary-masks) is fed binary ones.
        self.binary_masks = bool(self.train_config.get("binary_masks", False))

    @classmethod
    def from_checkpoint(cls, source: str | Path | Checkpoint,
                        device: torch.device | str = "cpu") -> tuple[ContextRenderer, Checkpoint]:
        """The renderer of a CR-GAN checkpoint (file, run folder or a `Checkpoint` already read, which
        is then not read again), with the checkpoint it came from."""
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.read(source, "crgan")
        config = config_from_dict(CRGANConfig, ckpt.model_config)
        generator = ContextGenerator(config)
        load_state(generator, ckpt["models"]["gen"], f"checkpoint {ckpt.path}")
        return cls(config, generator, ckpt.train_config, device), ckpt

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
