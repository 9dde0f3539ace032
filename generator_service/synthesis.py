"""Synthesis: generated images with the teacher's soft labels, the one path for every consumer.

The batch workers (`worker.run`: shard records keep the top-k of each soft label), the DG-Net
online feed of `train-reid --online-generator` and anything else that trains on generated images
take them from a `Synthesizer`. Tensors stay on the engine's device and the soft labels stay
dense (B×K), so a training step pays no device round trip and no per-item Python loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from generator_service.device import autocast
from generator_service.engine import Engine
from generator_service.teacher import Teacher


@dataclass
class Synthesis:
    images: torch.Tensor               # B×3×H×W, normalised, on the engine's device
    soft: torch.Tensor | None          # B×K teacher probabilities (mean of the image and its mirror)


class Synthesizer:
    """One generator (a DG-Net swap or a CR-GAN rendering, through the engine) and its teacher."""

    def __init__(self, engine: Engine, teacher: Teacher | None, model: str | None = None):
        self.engine, self.teacher = engine, teacher
        chosen = engine.models.get(model) if model else next(iter(engine.models.values()))
        # model_for refuses an unknown name in its own words
        self.model = engine.model_for("render" if chosen is not None and chosen.kind == "crgan" else "swap", model or
                                      chosen.name)

    def __call__(self, appearance: torch.Tensor, structure: torch.Tensor,
                 masks: torch.Tensor | None = None) -> Synthesis:
        """DG-Net: ``appearance`` on ``structure`` (pairwise); CR-GAN: the sources ``appearance``
        rendered into the targets ``structure`` whose person ``masks`` are given."""
        if self.model.kind == "crgan":
            if masks is None:
                raise ValueError("a CR-GAN rendering needs the targets' person masks")
            images, _ = self.engine.render_batch(appearance, structure, masks, model=self.model.name, on_device=True)
        else:
            images = self.engine.swap_batch(appearance, structure, model=self.model.name, on_device=True)
        soft = None
        if self.teacher is not None:
            with torch.inference_mode(), autocast(self.engine.device, self.engine.amp):
                soft = self.teacher.soft_labels(images).float()
        return Synthesis(images, soft)


def top_k(soft: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, probabilities renormalised to sum 1) of the ``k`` largest of each row: what a
    shard record stores of a soft label."""
    k = min(k, soft.shape[1])
    probs, classes = soft.topk(k, dim=1)
    return classes, probs / probs.sum(1, keepdim=True)
