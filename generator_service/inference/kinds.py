"""Model kinds: what the inference engine runs, each kind one object.

A `ModelKind` owns what differs between re-id, DG-Net and CR-GAN models: how a checkpoint of the
kind becomes a network ready for inference (with its preset name and image size), which
operations it offers and how each runs on one batch of requests, which operation gives a
`Synthesizer` its generated images, and how it is warmed up. The engine
(`generator_service.inference.engine`) only queues, batches and schedules; adding a kind is adding an
entry to `KINDS`, not a branch in the engine.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from generator_service.models.crgan import ContextRenderer
from generator_service.models.crgan_nets import CRGAN_PRESETS
from generator_service.models.dgnet import DGNET_PRESETS, DGNet
from generator_service.models.masks import MaskProvider, mask_provider_for
from generator_service.models.reid import ReidNet
from reidgen.core.checkpoint import Checkpoint
from reidgen.core.errors import ReidgenError


# -- what one request asks of a model (tensors are normalised, at the model's size) -------------
@dataclass
class SwapItem:
    """A×3×H×W appearance and S×3×H×W structure images: pairs (one side may hold a single image,
    used with each image of the other side) or, with ``grid``, every combination."""

    appearance: torch.Tensor
    structure: torch.Tensor
    grid: bool = False

    @property
    def size(self) -> int:
        na, ns = len(self.appearance), len(self.structure)
        return na * ns if self.grid else max(na, ns)

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (appearance, structure) of each generated image, row-major."""
        na, ns = len(self.appearance), len(self.structure)
        if self.grid:
            return torch.arange(na).repeat_interleave(ns), torch.arange(ns).repeat(na)
        n = max(na, ns)
        return torch.arange(n) % na, torch.arange(n) % ns


@dataclass
class InterpolateItem:
    first: torch.Tensor   # 1×3×H×W
    second: torch.Tensor  # 1×3×H×W
    steps: int
    what: str = "appearance"

    @property
    def size(self) -> int:
        return self.steps


@dataclass
class RenderItem:
    source: torch.Tensor       # N×3×H×W
    target: torch.Tensor       # N×3×H×W
    target_mask: torch.Tensor  # N×1×H×W, 1 = person

    @property
    def size(self) -> int:
        return len(self.source)


@dataclass
class EmbedItem:
    images: torch.Tensor  # N×3×H×W

    @property
    def size(self) -> int:
        return len(self.images)


# -- the operations: one runner each, taking the items of one batch; results stay on the device
# (the engine moves them to the CPU for callers that do not ask to keep them there) -------------
def _chunked(fn: Callable, chunk: int, *tensors: torch.Tensor):
    """``fn`` over slices of at most ``chunk`` rows, outputs concatenated (tuples element-wise)."""
    outs = [fn(*(t[i:i + chunk] for t in tensors)) for i in range(0, len(tensors[0]), chunk)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def _run_swap(net: DGNet, items: Sequence[SwapItem], device: torch.device, chunk: int) -> list[torch.Tensor]:
    """All requests of the batch at once: each input image encoded once, then every requested
    (appearance, structure) pair decoded in device batches of at most ``chunk``."""
    a = _chunked(net.encode_appearance, chunk, torch.cat([it.appearance for it in items]).to(device))
    s = _chunked(net.encode_structure, chunk, torch.cat([it.structure for it in items]).to(device))
    ia, is_, oa, os_ = [], [], 0, 0
    for it in items:
        pa, ps = it.pairs()
        ia.append(pa + oa)
        is_.append(ps + os_)
        oa, os_ = oa + len(it.appearance), os_ + len(it.structure)
    ia_all, is_all = torch.cat(ia).to(device), torch.cat(is_).to(device)
    out = torch.cat([net.decode(a[ia_all[i:i + chunk]], s[is_all[i:i + chunk]])
                     for i in range(0, len(ia_all), chunk)]).float()
    results = list(out.split([it.size for it in items]))
    return [r.view(len(it.appearance), len(it.structure), *r.shape[1:]) if it.grid else r
            for r, it in zip(results, items)]


def _run_interpolate(net: DGNet, items: Sequence[InterpolateItem], device: torch.device,
                     chunk: int) -> list[torch.Tensor]:
    # Each request is at most max_steps images: DG-Net's own interpolation, one call per request.
    return [net.interpolate(it.first.to(device), it.second.to(device), it.steps, it.what).float() for it in items]


def _run_render(renderer: ContextRenderer, items: Sequence[RenderItem], device: torch.device,
                chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    src = torch.cat([it.source for it in items]).to(device)
    tgt = torch.cat([it.target for it in items]).to(device)
    msk = torch.cat([it.target_mask for it in items]).to(device)
    rendered, context = _chunked(renderer.render, chunk, src, tgt, msk)
    sizes = [it.size for it in items]
    return list(zip(rendered.float().split(sizes), context.float().split(sizes)))


def _flip_averaged_feature(net: ReidNet, x: torch.Tensor) -> torch.Tensor:
    # As evaluation ranks (trainer.evaluation.evaluate): each view's feature unit-length, summed, then unit-length.
    views = (net(x)[1], net(torch.flip(x, dims=[3]))[1])
    return F.normalize(sum(F.normalize(v.float(), dim=1) for v in views), dim=1)


def _run_embed(net: ReidNet, items: Sequence[EmbedItem], device: torch.device, chunk: int) -> list[torch.Tensor]:
    features = _chunked(lambda x: _flip_averaged_feature(net, x), chunk,
                        torch.cat([it.images for it in items]).to(device))
    return list(features.split([it.size for it in items]))


# -- synthesis: generated images for training and shards (a `Synthesizer` calls these) ----------
def _swap_images(engine, model: str, appearance: torch.Tensor, structure: torch.Tensor,
                 masks: torch.Tensor | None) -> torch.Tensor:
    """DG-Net: appearance i on structure i."""
    return engine.swap_batch(appearance, structure, model=model, on_device=True)


def _render_images(engine, model: str, sources: torch.Tensor, targets: torch.Tensor,
                   masks: torch.Tensor | None) -> torch.Tensor:
    """CR-GAN: source i rendered into target i, whose person mask is ``masks[i]``."""
    if masks is None:
        raise ReidgenError("a CR-GAN rendering needs the targets' person masks (B×1×H×W, 1 = person)")
    return engine.render_batch(sources, targets, masks, model=model, on_device=True)[0]


# -- loading ----------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A network ready for inference and what the service tells clients about it."""

    net: Any
    preset: str
    image_size: tuple[int, int]
    masks: MaskProvider | None = None
    masks_name: str | None = None


def _load_dgnet(ckpt: Checkpoint, device: torch.device, mask_provider: str | None) -> Loaded:
    net, _ = DGNet.from_checkpoint(ckpt)
    net = net.to(device).requires_grad_(False)
    return Loaded(net, net.cfg.preset, tuple(net.cfg.image_size))


def _load_crgan(ckpt: Checkpoint, device: torch.device, mask_provider: str | None) -> Loaded:
    renderer, _ = ContextRenderer.from_checkpoint(ckpt, device)
    preset = next((p for p, c in CRGAN_PRESETS.items() if c == renderer.config), "custom")
    # Targets sent without a mask get one from the provider the model was trained with (uploads:
    # the pose segmenter for a folder provider), or the geometric prior where that cannot run here.
    masks, masks_name = mask_provider_for(ckpt.train_config, mask_provider, fallback=True)
    return Loaded(renderer, preset, tuple(renderer.image_size), masks, masks_name)


def _load_reid(ckpt: Checkpoint, device: torch.device, mask_provider: str | None) -> Loaded:
    net, _ = ReidNet.from_checkpoint(ckpt)
    net = net.to(device).requires_grad_(False)
    return Loaded(net, "custom", tuple(net.config.image_size))


@dataclass(frozen=True)
class ModelKind:
    """One kind of model the engine runs (the ``kind`` a checkpoint records)."""

    name: str
    title: str
    endpoints: tuple[str, ...]  # the HTTP routes that use it; none: `serve --models` skips the kind
    presets: tuple[str, ...]
    # operation → runner(net, items of one batch, device, device batch size) → one result per item,
    # on the device; the first operation is the one warm-up runs
    ops: Mapping[str, Callable[[Any, Sequence[Any], torch.device, int], list]]
    load: Callable[[Checkpoint, torch.device, str | None], Loaded]
    warm_item: Callable[[int, int, int], Any]  # (n, H, W) → an item of the first operation
    # The operation a `Synthesizer` takes generated images from, and how it asks the engine for
    # them: (engine, model name, appearance/sources, structure/targets, target masks or None) →
    # B×3×H×W images on the engine's device. None: the kind generates no images.
    synthesis_op: str | None = None
    synthesize: Callable[[Any, str, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None


KINDS: dict[str, ModelKind] = {
    "dgnet": ModelKind("dgnet", "DG-Net", ("/v1/swap", "/v1/interpolate"), tuple(sorted(DGNET_PRESETS)),
                       {"swap": _run_swap, "interpolate": _run_interpolate}, _load_dgnet,
                       lambda n, h, w: SwapItem(torch.zeros(n, 3, h, w), torch.zeros(n, 3, h, w)),
                       synthesis_op="swap", synthesize=_swap_images),
    "crgan": ModelKind("crgan", "CR-GAN", ("/v1/render",), tuple(sorted(CRGAN_PRESETS)),
                       {"render": _run_render}, _load_crgan,
                       lambda n, h, w: RenderItem(torch.zeros(n, 3, h, w), torch.zeros(n, 3, h, w),
                                                  torch.zeros(n, 1, h, w)),
                       synthesis_op="render", synthesize=_render_images),
    # Re-id networks (baselines, teachers, D_id): features for retrieval. Not served over HTTP, so
    # a teacher kept in a models folder is skipped by `serve --models`.
    "reid": ModelKind("reid", "re-id", (), (), {"embed": _run_embed}, _load_reid,
                      lambda n, h, w: EmbedItem(torch.zeros(n, 3, h, w))),
}
# Which kind each operation needs, and the presets of each kind served over HTTP (GET /v1/models).
OP_KIND = {op: kind.name for kind in KINDS.values() for op in kind.ops}
PRESETS = {kind.name: list(kind.presets) for kind in KINDS.values() if kind.endpoints}
