"""DG-Net as one module: appearance encoder E_a (the re-id backbone), structure encoder E_s,
decoder G and discriminator D, plus the generation API (encode, decode, swap, interpolate).

The generative networks are in `generator_service.models.dgnet_nets`; this file joins them with the
re-id backbone and is what the trainer, the service, the workers and `reidgen evaluate` load.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from generator_service.models.backbones import build_backbone
from generator_service.models.dgnet_nets import PRESETS as GENERATOR_PRESETS
from generator_service.models.dgnet_nets import (
    Decoder,
    GeneratorConfig,
    MultiScaleDiscriminator,
    StructureEncoder,
    to_grey,
)
from generator_service.models.projected_d import ProjectedDiscriminator
from generator_service.models.reid import ClassifierHead
from reidgen.core.checkpoint import Checkpoint, load_state, save_checkpoint
from reidgen.core.config import config_from_dict
from reidgen.core.errors import ReidgenError


@dataclass(frozen=True)
class DGNetConfig:
    """The networks of one DG-Net model (saved in checkpoints)."""

    preset: str = "small"
    backbone: str = "efficientnet_lite0"
    last_stride: int = 1
    generator: GeneratorConfig = field(default_factory=lambda: GENERATOR_PRESETS["small"])
    bottleneck: int = 512
    dropout_prim: float = 0.5
    dropout_fine: float = 0.75
    # Reference code: the appearance code is detached inside E_a, so E_a learns only from the
    # re-id losses; the paper lets the generative losses reach E_a too. Default: the reference.
    detach_appearance_code: bool = True
    # D: "multiscale" (the paper's PatchGAN on pixels, with the generator config's dis_* fields) or
    # "projected" (a fast-converging lever: frozen ImageNet features, generator_service.models.projected_d)
    # with its width and the factor images are resized by before the feature network.
    discriminator: str = "multiscale"
    projected_width: int = 64
    projected_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.discriminator not in DISCRIMINATORS:
            raise ValueError(f"discriminator={self.discriminator!r}; expected one of {', '.join(DISCRIMINATORS)}")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.generator.image_size


DISCRIMINATORS = ("multiscale", "projected")


def build_discriminator(cfg: DGNetConfig) -> nn.Module:
    if cfg.discriminator == "projected":
        return ProjectedDiscriminator(cfg.image_size, cfg.projected_width, cfg.projected_scale)
    return MultiScaleDiscriminator(cfg.generator)


DGNET_PRESETS: dict[str, DGNetConfig] = {
    "paper": DGNetConfig(preset="paper", backbone="resnet50", generator=GENERATOR_PRESETS["paper"]),
    "small": DGNetConfig(preset="small", backbone="efficientnet_lite0", generator=GENERATOR_PRESETS["small"]),
    "fast": DGNetConfig(preset="fast", backbone="efficientnet_lite0", generator=GENERATOR_PRESETS["fast"]),
}


class AppearanceEncoder(nn.Module):
    """E_a: backbone → appearance code (max-pooled to parts×1) and the two re-id heads.

    ``forward`` returns ``(code, (logits_prim, logits_fine), (f_prim, f_fine))``.
    """

    def __init__(self, cfg: DGNetConfig, num_classes: int, pretrained: str = "none"):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, last_stride=cfg.last_stride, pretrained=pretrained)
        channels = self.backbone.out_channels
        if channels != cfg.generator.appearance_channels:
            raise ValueError(f"backbone {cfg.backbone} gives {channels} channels but the generator expects "
                             f"{cfg.generator.appearance_channels}")
        self.head_prim = ClassifierHead(channels, num_classes, cfg.bottleneck, cfg.dropout_prim)
        self.head_fine = ClassifierHead(channels, num_classes, cfg.bottleneck, cfg.dropout_fine)

    def code_and_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The appearance code (B×C×parts×1) and the globally max-pooled vector (B×C)."""
        fmap = self.backbone(x)
        code = F.adaptive_max_pool2d(fmap, (self.cfg.generator.appearance_parts, 1))
        if self.cfg.detach_appearance_code:
            code = code.detach()
        return code, F.adaptive_max_pool2d(fmap, 1).flatten(1)

    def forward(self, x: torch.Tensor):
        code, pooled = self.code_and_pooled(x)
        logits_prim, f_prim = self.head_prim(pooled)
        logits_fine, f_fine = self.head_fine(pooled)
        return code, (logits_prim, logits_fine), (f_prim, f_fine)

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Re-id feature parts [f_prim, f_fine] (score = s_prim + β·s_fine)."""
        return list(self(x)[2])

    def head_parameters(self):
        return list(self.head_prim.parameters()) + list(self.head_fine.parameters())

    @classmethod
    def from_checkpoint(cls, source: "str | Path | Checkpoint") -> tuple["AppearanceEncoder", Checkpoint]:
        """E_a alone (the re-id model of a DG-Net checkpoint), in eval mode: what evaluation needs."""
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.read(source, "dgnet")
        ea = cls(config_from_dict(DGNetConfig, ckpt.model_config), len(ckpt.label_map))
        return ckpt.load_into(ea, prefix="ea.").eval(), ckpt


class DGNet(nn.Module):
    """E_a, E_s, G, D together, with the generation API used everywhere else.

    Public API (images are normalised B×3×H×W tensors):
    ``DGNet.from_checkpoint(path)`` → (model in eval mode, its `Checkpoint`), for a training
    checkpoint, a run folder or an inference export (`export_inference`);
    ``encode_appearance(x)`` → appearance code B×C×parts×1; ``encode_structure(x)`` → structure
    code; ``decode(appearance, structure)`` → images; ``swap`` and ``interpolate`` on images;
    ``ea(x)`` → (code, (logits_prim, logits_fine), (f_prim, f_fine)).
    ``discriminator=False`` leaves D out (``dis`` is None): what an inference export holds.
    """

    def __init__(self, cfg: DGNetConfig, num_classes: int, pretrained: str = "none", discriminator: bool = True):
        super().__init__()
        self.cfg = cfg
        self.ea = AppearanceEncoder(cfg, num_classes, pretrained)
        self.es = StructureEncoder(cfg.generator)
        self.dec = Decoder(cfg.generator)
        self.dis = build_discriminator(cfg) if discriminator else None

    # -- generation API (images are normalised tensors B×3×H×W) --------------------------------
    def encode_appearance(self, x: torch.Tensor) -> torch.Tensor:
        """The appearance codes of a batch of images (E_a).

        Args:
            x: normalised images, B×3×H×W, at the model's image size.

        Returns:
            The appearance codes, B×C×parts×1 (C: E_a's channels; parts: horizontal stripes).
        """
        return self.ea.code_and_pooled(x)[0]

    def encode_structure(self, x: torch.Tensor) -> torch.Tensor:
        """The structure codes of a batch of images (E_s, which sees them in grey).

        Args:
            x: normalised images, B×3×H×W, at the model's image size.

        Returns:
            The structure codes, B×C_s×h×w (a feature map at a quarter of the image size).
        """
        return self.es(to_grey(x))

    def decode(self, appearance: torch.Tensor, structure: torch.Tensor) -> torch.Tensor:
        """Images from an appearance code and a structure code (the decoder G).

        Args:
            appearance: appearance codes from `encode_appearance`, B×C×parts×1.
            structure: structure codes from `encode_structure`, B×C_s×h×w; row i of each is one image.

        Returns:
            Normalised images, B×3×H×W: person i's clothes in structure i's pose and background.
        """
        return self.dec(appearance, structure)

    def swap(self, appearance_images: torch.Tensor, structure_images: torch.Tensor, grid: bool = False) -> torch.Tensor:
        """Pairwise (i-th appearance with i-th structure), or with ``grid`` every combination as
        an A×S×3×H×W tensor (rows appearance, columns structure)."""
        a = self.encode_appearance(appearance_images)
        s = self.encode_structure(structure_images)
        if not grid:
            return self.decode(a, s)
        na, ns = a.shape[0], s.shape[0]
        a_rep = a.repeat_interleave(ns, dim=0)
        s_rep = s.repeat(na, 1, 1, 1)
        return self.decode(a_rep, s_rep).view(na, ns, *appearance_images.shape[1:])

    def interpolate(self, first: torch.Tensor, second: torch.Tensor, steps: int,
                    what: str = "appearance") -> torch.Tensor:
        """Linear interpolation between the codes of two images (1×3×H×W each), keeping the
        other code of ``first``: ``steps`` images, the ends included."""
        if what not in ("appearance", "structure"):
            raise ValueError(f"interpolate what={what!r}; expected appearance or structure")
        a0, s0 = self.encode_appearance(first), self.encode_structure(first)
        other = self.encode_appearance(second) if what == "appearance" else self.encode_structure(second)
        start = a0 if what == "appearance" else s0
        w = torch.linspace(0, 1, steps, device=first.device).view(-1, 1, 1, 1)
        mixed = (1 - w) * start + w * other
        if what == "appearance":
            return self.decode(mixed, s0.expand(steps, -1, -1, -1))
        return self.decode(a0.expand(steps, -1, -1, -1), mixed)

    @classmethod
    def from_checkpoint(cls, source: "str | Path | Checkpoint") -> tuple["DGNet", Checkpoint]:
        """The model of a training checkpoint, a run folder or an inference export (without D), in
        eval mode, with the checkpoint it came from.

        Args:
            source: a DG-Net checkpoint file (a training checkpoint, an `import-dgnet` file or an
                `export`), a run folder (its `checkpoints/last.pt`), or a `Checkpoint` already read.
                Files are read with `torch.load(weights_only=True)`: nothing in them runs.

        Returns:
            The model on the CPU in eval mode, and the checkpoint (configuration, label map,
            lineage) it was built from.
        """
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.read(source, "dgnet")
        model = cls(config_from_dict(DGNetConfig, ckpt.model_config), len(ckpt.label_map),
                    discriminator=not ckpt.contents.get("inference_only", False))
        return ckpt.load_into(model).eval(), ckpt


# Keys of a checkpoint that inference reads (the rest is training state: optimisers, RNG, step).
# train_config stays: batch jobs find the teacher for soft labels there.
_INFERENCE_KEYS = ("model_config", "label_map", "train_config", "imported_from", "lineage")


def export_inference(source: str | Path, out: str | Path) -> Path:
    """Write the inference part of a DG-Net checkpoint or run: E_a with its heads, E_s, G, the
    configuration and label map, and where it came from; no D, no optimiser or RNG state.

    The file is an ordinary reidgen checkpoint of kind "dgnet" marked ``inference_only``: tensors
    and plain data, read with ``weights_only=True`` like every other, so ``serve --models`` and job
    specs take it as they take the full checkpoint. Training cannot resume from it."""
    read = Checkpoint.read(source, "dgnet")
    path, ckpt = read.path, read.contents
    out = Path(out)
    if out.resolve() == path.resolve():
        raise ReidgenError(f"write the export to a new file, not over {path}")
    payload = {k: ckpt[k] for k in _INFERENCE_KEYS if k in ckpt}
    payload["model"] = {k: v for k, v in read.state.items() if not k.startswith("dis.")}
    payload["inference_only"] = True
    payload["exported_from"] = {"file": path.name, "sha256_16": read.identity, "step": ckpt.get("step")}
    # Check it loads before anyone relies on it: the configuration still builds and every key fits.
    with torch.device("meta"):  # names and shapes only
        model = DGNet(config_from_dict(DGNetConfig, payload["model_config"]), len(payload["label_map"]),
                      discriminator=False)
    with warnings.catch_warnings():  # loading into meta tensors checks names and shapes and copies nothing
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        load_state(model, payload["model"], f"export of {path}")
    return save_checkpoint(out, "dgnet", payload)
