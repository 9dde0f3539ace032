"""Does a CR-GAN checkpoint render each source into each target's own context (instance guidance)?

`measure_crgan_quality` (``reidgen quality`` on a CR-GAN checkpoint) renders every one of S source
persons into k target images of the target domain's held-out split (gallery by default: images
the generator never saw in training), so n = S·k renderings, and measures:

- **own-target match rate**: for each rendering, the candidate among its source's k targets whose
  background, outside the source's person mask M_S, is nearest in L1 (weighted by 1 − M_S) must be
  its own target. Chance is 1/k; a generator that paints one texture whatever the target scores
  exactly 1/k (its k renderings of a source are equal, so all pick the same candidate).
- **diversity across targets**: mean pairwise distance between the k renderings of one source, as
  the Euclidean distance of their Inception-v3 pool features (the FID weights, offline), beside the
  same for the k targets themselves; LPIPS (AlexNet) too when an AlexNet weights file is given
  (`LPIPS`, nothing downloads).
- **diversity over the set** (the pairs the paper's figure needs, whose "w/o dual condition"
  LPIPS is 0.196, not 0): the same distances over random pairs of renderings of *different*
  sources, one partner per rendering (seeded), beside the same pairs of their targets. Across
  targets, a generator that ignores the target scores 0 by construction; over the set it still
  scores how much its renderings of different persons differ, so the two models can be compared.
- **identity preservation**: D_id's top-1 on the rendering is the source's identity (beside D_id's
  top-1 on the real sources: its ceiling). Sources therefore come from the source's training split,
  the identities D_id knows; the targets are the held-out half of the pairs.
- **FID/KID** of the renderings against their real targets, beside the real-vs-real floor (the
  targets against as many other held-out target images).
- **foreground fidelity**: L1 between rendering and source on the source's person region (M_S
  weights, the normalised space of the training loss L_con).

And a few diagnostics that say where instance guidance is lost: the background L1 to the own
target, to the other targets and to the source's own background, how much the k renderings of a
source differ outside the person (against how much their targets differ there), and the mean
context mask X_C on and off the person.

Masks come from the provider the model was trained with, cached like the trainer's (the run's
mask cache, ``source``/``target`` folders; other data sets get their own folder).
"""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from reidgen.core.checkpoint import Checkpoint, read_plain
from reidgen.core.errors import ReidgenError
from reidgen.core.images import UnreadableImage, UnreadableImages, decode_image, denormalize, eval_transform
from reidgen.core.market import Item, LabelMap, scan_split
from trainer.evaluation.quality import (
    FID_NOTE,
    InceptionDistances,
    evaluation_mode,
    identity_share,
    run_folder,
    shown_value,
    teacher_predictions,
    to_uint8,
)

DEFAULT_K = 6
EPS = 1e-6


def checkpoint_kind(checkpoint: str | Path) -> str:
    """'dgnet' or 'crgan': which quality measurement a checkpoint (file or run folder) gets."""
    return Checkpoint.read(checkpoint, ("dgnet", "crgan")).kind


# -- the measures (tensors in, per-source figures out) -----------------------------------------


def masked_l1(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean |a − b| of each image pair: a, b (..., C, H, W), weights (..., 1, H, W) in [0, 1].
    Returns the (...) tensor of Σ w·|a − b| / (C·Σ w)."""
    weights = weights.float()
    num = (weights * (a.float() - b.float()).abs()).sum((-3, -2, -1))
    return num / (weights.sum((-3, -2, -1)) * a.shape[-3]).clamp_min(EPS)


def background_distances(renderings: torch.Tensor, targets: torch.Tensor,
                         source_masks: torch.Tensor) -> torch.Tensor:
    """d[i, j, l]: L1 between rendering j of source i and target l of source i, outside source i's
    person. renderings, targets: S×k×3×H×W (rendering (i, j) was made with target (i, j)),
    source_masks: S×1×H×W (1 = person). Returns S×k×k."""
    background = (1 - source_masks)[:, None]  # S×1×1×H×W, broadcast over the k renderings
    k = targets.shape[1]
    return torch.stack([masked_l1(renderings, targets[:, j:j + 1], background) for j in range(k)], dim=-1)


def own_target_hits(distances: torch.Tensor) -> torch.Tensor:
    """S×k bools: the nearest candidate of rendering (i, j) is its own target j."""
    k = distances.shape[-1]
    return distances.argmin(-1) == torch.arange(k, device=distances.device)


def _pairs(k: int) -> tuple[list[int], list[int]]:
    first, second = torch.triu_indices(k, k, 1)
    return first.tolist(), second.tolist()


def pairwise_feature_distance(features: torch.Tensor) -> torch.Tensor:
    """S×k×d features → (S,) mean Euclidean distance over the k(k−1)/2 pairs of each group."""
    distances = torch.cdist(features.double(), features.double())
    first, second = _pairs(features.shape[1])
    return distances[:, first, second].mean(1)


def cross_source_pairs(sources: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs over the S·k renderings (flat index i·k + j), one partner per rendering, the
    partner a rendering of another source (uniform over them): the pair set of the set diversity."""
    if sources < 2:
        raise ReidgenError("diversity over the set needs at least 2 sources")
    g = torch.Generator().manual_seed(seed)
    first = torch.arange(sources * k)
    other_source = (first // k + torch.randint(1, sources, (sources * k,), generator=g)) % sources
    return first, other_source * k + torch.randint(0, k, (sources * k,), generator=g)


def set_feature_distance(features: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]) -> float:
    """S×k×d features → mean Euclidean distance over the given pairs of flat indices."""
    flat = features.flatten(0, 1).double()
    first, second = pairs
    return float((flat[first] - flat[second]).norm(dim=1).mean())


def pairwise_masked_l1(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """S×k×3×H×W images, S×1×H×W weights → (S,) mean weighted L1 over the pairs of each group."""
    first, second = _pairs(images.shape[1])
    return masked_l1(images[:, first], images[:, second], weights[:, None]).mean(1)


@dataclass
class GroupMeasures:
    """Per-source figures of a batch of sources (each rendered into its k targets)."""

    own_target_hits: torch.Tensor       # (S, k) bools
    background_l1_own: torch.Tensor     # (S, k) L1 to the own target outside the source's person
    background_l1_other: torch.Tensor   # (S, k) mean L1 to the k − 1 other targets, same region
    background_l1_source: torch.Tensor  # (S, k) L1 to the source's own background, same region
    foreground_l1: torch.Tensor         # (S, k) L1 to the source on its person region
    spread_l1: torch.Tensor             # (S,) mean L1 between two renderings of a source, off the person
    spread_l1_targets: torch.Tensor     # (S,) the same between their targets
    context_mask_person: torch.Tensor   # (S, k) mean X_C on the source's person
    context_mask_background: torch.Tensor  # (S, k) mean X_C off it

    @staticmethod
    def join(parts: list["GroupMeasures"]) -> "GroupMeasures":
        return GroupMeasures(*(torch.cat([getattr(p, f).cpu() for p in parts])
                               for f in GroupMeasures.__dataclass_fields__))

    def summary(self) -> dict[str, float]:
        return {
            "own_target_match": float(self.own_target_hits.float().mean()),
            "background_l1_own": float(self.background_l1_own.mean()),
            "background_l1_other": float(self.background_l1_other.mean()),
            "background_l1_source": float(self.background_l1_source.mean()),
            "foreground_l1": float(self.foreground_l1.mean()),
            "spread_l1": float(self.spread_l1.mean()),
            "spread_l1_targets": float(self.spread_l1_targets.mean()),
            "context_mask_person": float(self.context_mask_person.mean()),
            "context_mask_background": float(self.context_mask_background.mean()),
        }


def measure_groups(renderings: torch.Tensor, sources: torch.Tensor, source_masks: torch.Tensor,
                   targets: torch.Tensor, context_masks: torch.Tensor | None = None) -> GroupMeasures:
    """The pixel measures of S sources × k targets. renderings, targets: S×k×3×H×W normalised;
    sources: S×3×H×W; source_masks: S×1×H×W soft person masks; context_masks: S×k×1×H×W (X_C, or
    None when the renderings come from elsewhere: the X_C figures are then NaN)."""
    k = targets.shape[1]
    if k < 2:
        raise ReidgenError("own-target matching needs at least 2 targets per source (k >= 2)")
    distances = background_distances(renderings, targets, source_masks)
    own = torch.diagonal(distances, dim1=-2, dim2=-1)                 # S×k
    other = (distances.sum(-1) - own) / (k - 1)
    person, background = source_masks[:, None], 1 - source_masks[:, None]
    if context_masks is None:
        nan = torch.full(own.shape, float("nan"))
        mask_person = mask_background = nan
    else:
        mask_person = (context_masks.float() * person).sum((-3, -2, -1)) / person.sum((-3, -2, -1)).clamp_min(EPS)
        mask_background = ((context_masks.float() * background).sum((-3, -2, -1))
                           / background.sum((-3, -2, -1)).clamp_min(EPS))
    return GroupMeasures(
        own_target_hits=own_target_hits(distances),
        background_l1_own=own,
        background_l1_other=other,
        background_l1_source=masked_l1(renderings, sources[:, None], background),
        foreground_l1=masked_l1(renderings, sources[:, None], person),
        spread_l1=pairwise_masked_l1(renderings, 1 - source_masks),
        spread_l1_targets=pairwise_masked_l1(targets, 1 - source_masks),
        context_mask_person=mask_person,
        context_mask_background=mask_background,
    )


# -- LPIPS, offline ------------------------------------------------------------------------------

# The five AlexNet activations LPIPS compares: after the ReLUs at these indices of torchvision's
# ``alexnet().features`` (conv1 … conv5).
_ALEX_RELUS = (1, 4, 7, 9, 11)
# LPIPS' input scaling, applied to [-1, 1] images (Zhang et al., 2018).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_WEIGHTS_HELP = ("--lpips-weights takes torchvision's ImageNet AlexNet state dict (alexnet-owt-7be5be79.pth, "
                      "from https://download.pytorch.org/models/); reidgen downloads nothing")


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` up to the fifth ReLU, same layers and parameter names
    (``0.weight`` … ``10.bias``), built without the 61M-parameter classifier LPIPS does not use."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True))


def _lpips_linear_file() -> Path:
    """The LPIPS v0.1 linear calibration weights (BSD-2, Zhang et al.) as shipped in the torchmetrics
    wheel: a data file, read without importing anything from it."""
    import importlib.util

    spec = importlib.util.find_spec("torchmetrics")
    root = Path(next(iter(spec.submodule_search_locations))) if spec else None
    path = root / "functional" / "image" / "lpips_models" / "alex.pth" if root else None
    if path is None or not path.is_file():
        raise ReidgenError("LPIPS needs the linear weights shipped in the torchmetrics package "
                           "(functional/image/lpips_models/alex.pth), which is not installed here")
    return path


class LPIPS(nn.Module):
    """LPIPS distance (AlexNet, v0.1) between pairs of [0, 1] images, from local files only.

    ``alexnet_weights``: a torchvision AlexNet state dict (the user supplies it); the per-channel
    linear weights come from the torchmetrics wheel. Both are read with `read_plain` (no code runs).
    Each of the five activations is unit-normalised over channels, the squared difference is
    weighted per channel, averaged over positions, and the five are summed.
    """

    def __init__(self, alexnet_weights: str | Path, linear_weights: str | Path | None = None):
        super().__init__()
        path = Path(alexnet_weights)
        if not path.is_file():
            raise ReidgenError(f"AlexNet weights file {path} not found; {LPIPS_WEIGHTS_HELP}")
        state = read_plain(path, "AlexNet weights file")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        features = {k.removeprefix("features."): v for k, v in (state or {}).items()
                    if isinstance(k, str) and k.startswith("features.")} if isinstance(state, dict) else {}
        net = alexnet_features()
        try:
            net.load_state_dict(features)
        except RuntimeError as exc:
            raise ReidgenError(f"{path} is not an AlexNet state dict ({str(exc).splitlines()[0]}); "
                               f"{LPIPS_WEIGHTS_HELP}") from None
        self.features = net.eval().requires_grad_(False)
        linear = read_plain(Path(linear_weights) if linear_weights else _lpips_linear_file(), "LPIPS linear weights")
        for i in range(len(_ALEX_RELUS)):
            self.register_buffer(f"linear{i}", linear[f"lin{i}.model.1.weight"].float())
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1))

    def _activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = ((2 * images.float() - 1) - self.shift) / self.scale
        out = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in _ALEX_RELUS:
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N,) LPIPS distances of N pairs of [0, 1] RGB images (N×3×H×W)."""
        total = torch.zeros(len(a), device=a.device)
        for i, (fa, fb) in enumerate(zip(self._activations(a), self._activations(b))):
            total += F.conv2d((fa - fb).square(), getattr(self, f"linear{i}")).mean((1, 2, 3))
        return total


def pairwise_lpips(lpips: LPIPS, images: torch.Tensor) -> torch.Tensor:
    """S×k×3×H×W normalised images → (S,) mean LPIPS over the pairs of each group."""
    first, second = _pairs(images.shape[1])
    pictures = denormalize(images.float())
    a, b = pictures[:, first].flatten(0, 1), pictures[:, second].flatten(0, 1)
    return lpips(a, b).view(len(images), len(first)).mean(1)


# -- picking the pairs ------------------------------------------------------------------------------


def spread_identities(items: list[Item], seed: int) -> list[Item]:
    """The items shuffled so that neighbours are of different persons: identities in a random order,
    round-robin, each identity's images shuffled. Any k consecutive items are k persons as long as
    k identities are left, so two targets of one source are rarely the same scene."""
    rng = random.Random(seed)
    by_id: dict[int, list[Item]] = {}
    for it in items:
        by_id.setdefault(it.pid, []).append(it)
    queues = [by_id[pid] for pid in sorted(by_id)]
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    out: list[Item] = []
    while queues:
        out.extend(queue.pop() for queue in queues)
        queues = [queue for queue in queues if queue]
    return out


def _mask_folder(root: Path, role: str, data: Path, trained_on: str | None) -> Path:
    """The training cache (``root/source`` or ``root/target``) for the data set the model was
    trained on; a folder of its own for any other data set (masks are cached by file stem)."""
    if trained_on and Path(trained_on).resolve() == data.resolve():
        return root / role
    return root / f"quality-{role}-{hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:10]}"


def _read(items: list[Item], size: tuple[int, int], unreadable: UnreadableImages) -> tuple[torch.Tensor, torch.Tensor]:
    transform, h, w = eval_transform(size), *size
    images, ok = [], []
    for it in items:
        try:
            images.append(transform(decode_image(it.path)))
            ok.append(True)
        except UnreadableImage:
            unreadable.record(it.path)
            images.append(torch.zeros(3, h, w))
            ok.append(False)
    return torch.stack(images), torch.tensor(ok)


def _read_masks(items: list[Item], cache, size: tuple[int, int]) -> torch.Tensor:
    masks = [torch.from_numpy(cache.load(it.path))[None, None] if cache.path(it.path).is_file()
             else torch.zeros(1, 1, *size) for it in items]
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in masks])


# -- the full measurement ---------------------------------------------------------------------------


@torch.no_grad()
def measure_crgan_quality(checkpoint: str | Path | Checkpoint, source: str | Path | None = None, *,
                          targets: str | Path | None = None, id_model: str | None = None, n: int = 600,
                          k: int = DEFAULT_K, source_split: str = "train", target_split: str = "gallery",
                          lpips_weights: str | Path | None = None, seed: int = 0, device: str = "auto",
                          batch_size: int = 64, progress: bool = True) -> dict:
    """Every instance-guidance figure of a CR-GAN checkpoint (the JSON of ``reidgen quality``).

    n renderings = S sources × k targets (S = n // k, distinct persons where possible); the real
    set is their n targets, and n further held-out target images give the real-vs-real floor.
    With too few target images, S is reduced (``n_requested`` keeps the ask).
    """
    from generator_service.models.crgan import ContextRenderer
    from generator_service.models.masks import ensure_masks, mask_provider_for
    from generator_service.models.teacher import Teacher
    from reidgen.core.device import pick_device
    from reidgen.core.paths import resolve_data

    start = time.perf_counter()
    if k < 2:
        raise ReidgenError(f"--k {k}: own-target matching needs at least 2 targets per source")
    if n < k:
        raise ReidgenError(f"--n {n} is below --k {k}: n renderings are n // k sources × k targets")
    dev = pick_device(device)
    renderer, ckpt = ContextRenderer.from_checkpoint(checkpoint, dev)  # the file is read once
    path, train = ckpt.path, ckpt.train_config
    source = source or train.get("source")
    targets = targets or train.get("target")
    judge_path = id_model or train.get("id_model")
    for value, option, what in ((source, "--data", "source data"), (targets, "--targets", "target data"),
                                (judge_path, "--teacher", "identity model D_id")):
        if not value:
            raise ReidgenError(f"checkpoint {path} does not record its {what}; pass {option}")
    source, targets = resolve_data(source), resolve_data(targets)
    label_map = LabelMap(ckpt.label_map)
    source_items = [it for it in scan_split(source, source_split) if it.pid > 0]
    target_items = scan_split(targets, target_split)

    n_requested, sources_wanted = n, n // k
    count = min(sources_wanted, len(target_items) // (2 * k), len(source_items))
    if count < 1:
        raise ReidgenError(f"the {target_split} split of {targets} has {len(target_items)} images; "
                           f"{2 * k} are needed for k = {k} (k targets and k more for the real-vs-real floor)")
    picked_sources = spread_identities(source_items, seed)[:count]
    known = all(it.pid in label_map.pids for it in picked_sources)  # else D_id cannot name them
    spread_targets = spread_identities(target_items, seed + 1)
    picked_targets, floor = spread_targets[:count * k], spread_targets[count * k:2 * count * k]

    provider, _ = mask_provider_for(train)  # the trained-with masks: no stand-in
    mask_root = Path(train["mask_cache"]) if train.get("mask_cache") else run_folder(path) / "masks"
    source_folder = _mask_folder(mask_root, "source", source, train.get("source"))
    source_cache, _ = ensure_masks(provider, picked_sources, source_folder, progress=progress)
    target_cache, _ = ensure_masks(provider, picked_targets,
                                   _mask_folder(mask_root, "target", targets, train.get("target")), progress=progress)

    size = renderer.image_size
    judge = Teacher(str(judge_path), label_map, dev) if known else None
    lpips = LPIPS(lpips_weights).to(dev) if lpips_weights else None
    inception = InceptionDistances(dev, seed)
    unreadable = UnreadableImages()
    parts, features, target_features = [], [], []
    source_top1, render_top1, labels_seen = [], [], []
    lpips_renderings, lpips_targets = [], []
    kept_renderings, kept_targets = [], []  # for LPIPS over the set's pairs
    per_batch = max(1, batch_size // k)
    bar = dict(unit="batch", dynamic_ncols=True, disable=not progress, leave=False)
    batches = [list(range(i, min(i + per_batch, count))) for i in range(0, count, per_batch)]
    with evaluation_mode(renderer.generator, *([judge.net] if judge else [])):
        for batch in tqdm(batches, desc="renderings", **bar):
            group_sources = [picked_sources[i] for i in batch]
            group_targets = [picked_targets[i * k + j] for i in batch for j in range(k)]
            xs, ok_s = _read(group_sources, size, unreadable)
            xt, ok_t = _read(group_targets, size, unreadable)
            keep = ok_s & ok_t.view(len(batch), k).all(1)  # a source whose target failed is left out
            if not keep.any():
                continue
            ms = _read_masks(group_sources, source_cache, size)[keep].to(dev)
            mt = _read_masks(group_targets, target_cache, size).view(len(batch), k, 1, *size)[keep].to(dev)
            xs, xt = xs[keep].to(dev), xt.view(len(batch), k, 3, *size)[keep].to(dev)
            s = len(xs)
            rendered, context = renderer.render(xs.repeat_interleave(k, 0), xt.flatten(0, 1), mt.flatten(0, 1))
            rendered, context = rendered.float().view(s, k, 3, *size), context.float().view(s, k, 1, *size)
            parts.append(measure_groups(rendered, xs, ms, xt, context))
            if judge is not None:
                labels = torch.tensor([label_map.index(it.pid) for it, kept in zip(group_sources, keep) if kept])
                labels_seen.append(labels)
                source_top1.append(teacher_predictions(judge, xs)[0].cpu())
                render_top1.append(teacher_predictions(judge, rendered.flatten(0, 1))[0].cpu().view(s, k))
            fake, real = to_uint8(rendered.flatten(0, 1)), to_uint8(xt.flatten(0, 1))
            features.append(inception.features(fake).double().cpu().view(s, k, -1))
            inception.add(fake, real=False)
            target_features.append(inception.features(real).double().cpu().view(s, k, -1))
            inception.add(real, real=True)
            if lpips is not None:
                lpips_renderings.append(pairwise_lpips(lpips, rendered).cpu())
                lpips_targets.append(pairwise_lpips(lpips, xt).cpu())
                kept_renderings.append(rendered.cpu())
                kept_targets.append(xt.float().cpu())
        if not parts:
            raise ReidgenError("no readable source/target images to render")
        generated = inception.compute()
        inception.next_set()
        for i in tqdm(range(0, len(floor), batch_size), desc="real floor", **bar):
            x, ok = _read(floor[i:i + batch_size], size, unreadable)
            if ok.any():
                inception.add(to_uint8(x[ok].to(dev)), real=False)
        floor_figures = inception.compute()

    measured = GroupMeasures.join(parts)
    rendering_features, real_features = torch.cat(features), torch.cat(target_features)
    pairs = cross_source_pairs(len(rendering_features), k, seed)
    set_lpips = set_lpips_real = None
    if lpips is not None:
        flat_r, flat_t = torch.cat(kept_renderings).flatten(0, 1), torch.cat(kept_targets).flatten(0, 1)
        set_lpips, set_lpips_real = (float(torch.cat([
            lpips(denormalize(flat[a].to(dev)), denormalize(flat[b].to(dev))).cpu()
            for a, b in ((pairs[0][i:i + batch_size], pairs[1][i:i + batch_size])
                         for i in range(0, len(pairs[0]), batch_size))]).mean())
            for flat in (flat_r, flat_t))
    return {
        **measured.summary(),
        "own_target_match_chance": 1 / k,
        "diversity_inception": float(pairwise_feature_distance(torch.cat(features)).mean()),
        "diversity_inception_real": float(pairwise_feature_distance(torch.cat(target_features)).mean()),
        "diversity_inception_set": set_feature_distance(rendering_features, pairs),
        "diversity_inception_set_real": set_feature_distance(real_features, pairs),
        "diversity_lpips_set": set_lpips, "diversity_lpips_set_real": set_lpips_real,
        "diversity_lpips": float(torch.cat(lpips_renderings).mean()) if lpips is not None else None,
        "diversity_lpips_real": float(torch.cat(lpips_targets).mean()) if lpips is not None else None,
        "identity_preservation": identity_share(torch.cat(render_top1), torch.cat(labels_seen)[:, None])
        if judge is not None else None,
        "identity_real": identity_share(torch.cat(source_top1), torch.cat(labels_seen)) if judge is not None else None,
        "fid": generated["fid"], "kid": generated["kid"], "kid_std": generated["kid_std"],
        "fid_real": floor_figures["fid"], "kid_real": floor_figures["kid"], "kid_real_std": floor_figures["kid_std"],
        "fid_note": FID_NOTE.replace("real training images", "held-out target images"),
        "kind": "crgan", "k": k, "sources": len(measured.foreground_l1), "n": int(measured.foreground_l1.numel()),
        "n_requested": n_requested, "seed": seed, "checkpoint": str(path), "step": ckpt.step,
        "dual_condition": renderer.config.dual_condition,
        "source": str(source), "source_split": source_split, "targets": str(targets), "target_split": target_split,
        "id_model": str(judge_path) if judge is not None else None, "masks": provider.name,
        "lpips_weights": str(lpips_weights) if lpips_weights else None,
        "image_size": list(size), "skipped_images": unreadable.paths,
        "seconds": round(time.perf_counter() - start, 1),
    }


# -- presentation ---------------------------------------------------------------------------------

DESCRIPTIONS = {
    "own_target_match": "share of renderings whose nearest background (off the source's person, L1) "
                        "among the source's k targets is their own (chance 1/k)",
    "diversity_inception": "mean Inception-feature distance between the k renderings of a source "
                           "(higher = more varied)",
    "diversity_inception_real": "the same between their k real targets",
    "diversity_lpips": "mean LPIPS (AlexNet) between the k renderings of a source",
    "diversity_lpips_real": "the same between their k real targets",
    "diversity_inception_set": "mean Inception distance over random pairs of renderings of different sources "
                               "(one partner each; not 0 without the dual condition)",
    "diversity_inception_set_real": "the same pairs of their real targets",
    "diversity_lpips_set": "mean LPIPS over the same pairs of renderings of different sources",
    "diversity_lpips_set_real": "the same pairs of their real targets",
    "identity_preservation": "share of renderings D_id gives the source's identity (higher = better)",
    "identity_real": "D_id's top-1 accuracy on the real sources: the ceiling",
    "fid": "Inception FID, renderings vs their real targets (lower = more like the target domain)",
    "fid_real": "the same for the targets vs other held-out target images (same n): the floor",
    "kid": "Inception KID, renderings vs targets (± kid_std)",
    "kid_real": "the same, real vs real: the floor",
    "foreground_l1": "L1 of rendering vs source on the source's person (normalised space; lower = kept)",
    "background_l1_own": "L1 of rendering vs its own target off the source's person",
    "background_l1_other": "the same vs the k − 1 other targets (own should be clearly lower)",
    "background_l1_source": "the same vs the source's own background (low = the source's background survives)",
    "spread_l1": "mean L1 between two renderings of a source off its person (0 = one texture for all)",
    "spread_l1_targets": "the same between their targets: what following the context would give",
    "context_mask_person": "mean context mask X_C on the source's person (0 = the source is kept)",
    "context_mask_background": "mean X_C off the person (1 = the background is repainted)",
}


def format_crgan_quality_table(report: dict) -> str:
    """One metric a line with what it means, under a header naming the checkpoint and the pairs."""
    lines = [f"instance guidance of {report['checkpoint']} (CR-GAN, step {report['step']}, dual condition "
             f"{report['dual_condition']}): {report['sources']} sources of the {report['source_split']} split of "
             f"{report['source']} × k = {report['k']} targets of the {report['target_split']} split of "
             f"{report['targets']}, n = {report['n']} renderings, seed {report['seed']}"]
    for key, meaning in DESCRIPTIONS.items():
        value = report.get(key)
        if value is None:
            why = "needs --lpips-weights" if "lpips" in key else "D_id knows only training identities"
            lines.append(f"  {key:<26} {'-':<20} {meaning} ({why})")
            continue
        shown = shown_value(report, key)
        if key == "own_target_match":
            shown += f" (chance {report['own_target_match_chance']:.3f})"
        lines.append(f"  {key:<26} {shown:<20} {meaning}")
    lines.append(f"note: {report['fid_note']}")
    return "\n".join(lines)
