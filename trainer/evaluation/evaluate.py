"""Evaluate a checkpoint on a Market-style query/gallery split.

Features are flip-averaged (each view's parts L2-normalised, then summed) and combined with
per-part weights (`trainer.evaluation.metrics.combine_parts`), then ranked with the Market protocol.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from api_schemas.evaluation import EvaluationReport
from generator_service.models.reid import ReidNet
from reidgen.core.checkpoint import Checkpoint, resolve_checkpoint
from reidgen.core.device import autocast, pick_device
from reidgen.core.errors import ReidgenError
from reidgen.core.images import UnreadableImages, eval_transform
from reidgen.core.market import Item, scan_split
from trainer.evaluation.metrics import combine_parts, evaluate_ranking
from trainer.feeds.data import ImageDataset

DGNET_BETA = 0.5  # weight of the fine-grained score at test time (paper)


def load_embedder(path: str | Path) -> tuple[torch.nn.Module, tuple[int, int], list[str], list[float]]:
    """The re-id network of a checkpoint in eval mode, its image size, part names and default weights.

    A baseline checkpoint gives one feature; a DG-Net checkpoint gives E_a's f_prim and f_fine,
    scored s_prim + β·s_fine with the paper's β = 0.5.
    """
    ckpt = Checkpoint.read(path, ("reid", "dgnet"))
    if ckpt.kind == "dgnet":
        from generator_service.models.dgnet import AppearanceEncoder

        ea, _ = AppearanceEncoder.from_checkpoint(ckpt)
        return ea, ea.cfg.image_size, ["f_prim", "f_fine"], [1.0, DGNET_BETA]
    model, _ = ReidNet.from_checkpoint(ckpt)
    return model, model.config.image_size, ["feature"], [1.0]


class LocalMaxPooling(torch.nn.Module):
    """LMP at test time: the backbone's feature map cut into ``parts`` horizontal stripes, each
    max-pooled into one feature part (equal weights). No retraining needed."""

    def __init__(self, model: torch.nn.Module, parts: int):
        super().__init__()
        self.backbone, self.parts = model.backbone, parts

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        fmap = self.backbone(x)
        if fmap.shape[2] < self.parts:
            raise ReidgenError(f"--lmp {self.parts}: the feature map has only {fmap.shape[2]} rows")
        pooled = torch.nn.functional.adaptive_max_pool2d(fmap, (self.parts, 1))
        return list(pooled[..., 0].unbind(dim=2))


@torch.inference_mode()
def extract_features(model: torch.nn.Module, items: list[Item], image_size: tuple[int, int], *,
                     device: torch.device, batch_size: int = 128, workers: int = 1, flip: bool = True,
                     amp: bool = True, unreadable: UnreadableImages | None = None,
                     desc: str = "features") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Feature parts (each N×d, on CPU) and the mask of images that could be read."""
    unreadable = unreadable or UnreadableImages()
    dataset = ImageDataset(items, eval_transform(image_size), image_size=image_size)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    parts: list[list[torch.Tensor]] | None = None
    oks = []
    for images, _, indices, ok in tqdm(loader, desc=desc, unit="batch", leave=False, dynamic_ncols=True):
        oks.append(unreadable.check(ok, indices, items))
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        with autocast(device, amp):
            views = [model.embed(images)]
            if flip:
                views.append(model.embed(torch.flip(images, dims=[3])))
        summed = [sum(torch.nn.functional.normalize(v[p].float(), dim=1) for v in views)
                  for p in range(len(views[0]))]
        if parts is None:
            parts = [[] for _ in summed]
        for store, part in zip(parts, summed):
            store.append(part.cpu())
    assert parts is not None
    return [torch.cat(p) for p in parts], torch.cat(oks)


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, *, part_weights: list[float] | None = None,
                        flip: bool = True, device: str = "auto", batch_size: int = 128, workers: int = 1,
                        strict_images: bool = False, amp: bool = True, lmp: int = 0) -> EvaluationReport:
    checkpoint = resolve_checkpoint(checkpoint)
    model, image_size, part_names, default_weights = load_embedder(checkpoint)
    if lmp:
        model = LocalMaxPooling(model, lmp).eval()
        part_names, default_weights = [f"stripe{i + 1}" for i in range(lmp)], [1.0] * lmp
    weights = list(part_weights) if part_weights is not None else default_weights
    if len(weights) != len(part_names):
        raise ReidgenError(f"this model has {len(part_names)} feature part(s) ({', '.join(part_names)}); "
                           f"got {len(weights)} part weight(s)")
    dev = pick_device(device)
    model.to(dev, memory_format=torch.channels_last)
    query, gallery = scan_split(data, "query"), scan_split(data, "gallery")
    unreadable = UnreadableImages(strict=strict_images)

    start = time.perf_counter()
    kwargs = dict(device=dev, batch_size=batch_size, workers=workers, flip=flip, amp=amp, unreadable=unreadable)
    q_parts, q_ok = extract_features(model, query, image_size, desc="query", **kwargs)
    g_parts, g_ok = extract_features(model, gallery, image_size, desc="gallery", **kwargs)
    feature_seconds = time.perf_counter() - start

    start = time.perf_counter()
    qf = combine_parts([p[q_ok] for p in q_parts], weights)
    gf = combine_parts([p[g_ok] for p in g_parts], weights)
    q_items = [it for it, ok in zip(query, q_ok.tolist()) if ok]
    g_items = [it for it, ok in zip(gallery, g_ok.tolist()) if ok]
    ids = [torch.tensor([getattr(it, f) for it in its]) for f in ("pid", "camid") for its in (q_items, g_items)]
    result = evaluate_ranking(qf, gf, *ids)
    ranking_seconds = time.perf_counter() - start

    r = result.to_dict()
    return EvaluationReport(
        checkpoint=str(checkpoint), data=str(data), num_query=len(q_items), num_gallery=len(g_items),
        num_valid_queries=r["num_valid_queries"], rank1=r["rank1"], rank5=r["rank5"], rank10=r["rank10"],
        mAP=r["mAP"], mINP=r["mINP"], cmc=r["cmc"], parts=part_names, part_weights=weights, flip=flip,
        feature_seconds=feature_seconds, ranking_seconds=ranking_seconds, skipped_images=unreadable.paths,
    )
