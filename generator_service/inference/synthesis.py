"""Synthesis: generated images with the teacher's soft labels, the one path for every consumer.

The batch workers (`worker.run`: shard records keep the top-k of each soft label), the DG-Net
online feed of `train-reid --online-generator`, the CR-GAN online render of `--online-render`
and anything else that trains on generated images take them from a `Synthesizer`. Tensors stay
on the engine's device and the soft labels stay dense (B×K), so a training step pays no device
round trip and no per-item Python loop. They are made under ``torch.no_grad`` (not inference
mode), so they can go straight into a training step's forward and backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from generator_service.inference.engine import Engine, UnknownModel
from generator_service.inference.kinds import KINDS
from generator_service.models.teacher import Teacher
from reidgen.core.device import autocast
from reidgen.core.errors import ReidgenError


@dataclass
class Synthesis:
    images: torch.Tensor               # B×3×H×W, normalised, on the engine's device
    soft: torch.Tensor | None          # B×K teacher probabilities (mean of the image and its mirror)


class Synthesizer:
    """One generator of the engine (the operation its kind names: a DG-Net swap, a CR-GAN
    rendering) and the teacher that labels what it makes."""

    def __init__(self, engine: Engine, teacher: Teacher | None, model: str | None = None):
        self.engine, self.teacher = engine, teacher
        chosen = engine.models.get(model) if model else next(iter(engine.models.values()))
        if chosen is None:
            raise UnknownModel(f"no model named {model!r}; loaded: {', '.join(engine.models)}")
        self.kind = KINDS[chosen.kind]
        if self.kind.synthesize is None:
            makers = " or ".join(kind.title for kind in KINDS.values() if kind.synthesize is not None)
            raise ReidgenError(f"model {chosen.name!r} is a {self.kind.title} model, which generates no images; "
                               f"synthesis needs a {makers} model")
        self.model = engine.model_for(self.kind.synthesis_op, chosen.name)

    def __call__(self, appearance: torch.Tensor, structure: torch.Tensor,
                 masks: torch.Tensor | None = None) -> Synthesis:
        """DG-Net: ``appearance`` on ``structure`` (pairwise); CR-GAN: the sources ``appearance``
        rendered into the targets ``structure`` whose person ``masks`` are given."""
        images = self.kind.synthesize(self.engine, self.model.name, appearance, structure, masks)
        soft = None
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.engine.device, self.engine.amp):
                soft = self.teacher.soft_labels(images).float()
        return Synthesis(images, soft)


def top_k(soft: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, probabilities renormalised to sum 1) of the ``k`` largest of each row: what a
    shard record stores of a soft label."""
    k = min(k, soft.shape[1])
    probs, classes = soft.topk(k, dim=1)
    return classes, probs / probs.sum(1, keepdim=True)
