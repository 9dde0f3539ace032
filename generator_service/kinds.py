"""Model kinds: what the inference engine serves, each kind one object.

A `ModelKind` owns what differs between DG-Net and CR-GAN models: how a checkpoint of the kind
becomes a servable network (with its preset name and image size), which operations it offers
and how each runs on one batch of requests, and how it is warmed up. The engine
(`generator_service.engine`) only queues, batches and schedules; adding a kind is adding an
entry to `KINDS`, not a branch in the engine.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from generator_service.checkpoint import Checkpoint
from generator_service.crgan import ContextRenderer
from generator_service.crgan_nets import CRGAN_PRESETS
from generator_service.dgnet import DGNET_PRESETS, DGNet
from generator_service.masks import GeometricMasks, MaskProvider, build_mask_provider
from reidgen.errors import ReidgenError

log = logging.getLogger("reidgen.engine")


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


# -- CR-GAN target masks -----------------------------------------------------------------------
def crgan_mask_provider(train_config: dict, override: str | None) -> tuple[MaskProvider, str]:
    """The provider a CR-GAN model was trained with, for targets sent without a mask.

    A ``folder`` provider only knows its own data set's files, so uploads use the pose
    segmenter; without the TFLite model the geometric prior stands in (and says so).
    """
    kind = override or train_config.get("masks") or "pose"
    if kind == "folder":
        kind = "pose"
    opts = {}
    if kind in ("pose", "selfie") and train_config.get("mask_model") and not override:
        opts["model_path"] = train_config["mask_model"]
    try:
        return build_mask_provider(kind, **opts), kind
    except ReidgenError as exc:
        if kind == "geometric":
            raise
        log.warning("mask provider %s unavailable (%s); target masks fall back to the geometric prior", kind, exc)
        return GeometricMasks(), f"geometric (fallback: {kind} unavailable)"


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
    renderer = ContextRenderer(ckpt.path, device)
    preset = next((p for p, c in CRGAN_PRESETS.items() if c == renderer.config), "custom")
    masks, masks_name = crgan_mask_provider(ckpt.train_config, mask_provider)
    return Loaded(renderer, preset, tuple(renderer.image_size), masks, masks_name)


@dataclass(frozen=True)
class ModelKind:
    """One kind of servable model (the ``kind`` a checkpoint records)."""

    name: str
    title: str
    endpoints: tuple[str, ...]
    presets: tuple[str, ...]
    # operation → runner(net, items of one batch, device, device batch size) → one result per item,
    # on the device; the first operation is the one warm-up runs
    ops: Mapping[str, Callable[[Any, Sequence[Any], torch.device, int], list]]
    load: Callable[[Checkpoint, torch.device, str | None], Loaded]
    warm_item: Callable[[int, int, int], Any]  # (n, H, W) → an item of the first operation


KINDS: dict[str, ModelKind] = {
    "dgnet": ModelKind("dgnet", "DG-Net", ("/v1/swap", "/v1/interpolate"), tuple(sorted(DGNET_PRESETS)),
                       {"swap": _run_swap, "interpolate": _run_interpolate}, _load_dgnet,
                       lambda n, h, w: SwapItem(torch.zeros(n, 3, h, w), torch.zeros(n, 3, h, w))),
    "crgan": ModelKind("crgan", "CR-GAN", ("/v1/render",), tuple(sorted(CRGAN_PRESETS)),
                       {"render": _run_render}, _load_crgan,
                       lambda n, h, w: RenderItem(torch.zeros(n, 3, h, w), torch.zeros(n, 3, h, w),
                                                  torch.zeros(n, 1, h, w))),
}
# Which kind each operation needs, and the presets of each kind (GET /v1/models).
OP_KIND = {op: kind.name for kind in KINDS.values() for op in kind.ops}
PRESETS = {kind.name: list(kind.presets) for kind in KINDS.values()}
