"""DG-Net joint training: generative module (E_a, E_s, G, D) and discriminative module (E_a's
primary and fine-grained heads) learn together; generated images feed E_a online.

One iteration (the paper's eqs. 1-10; a = loader A's batch, b = loader B's, p = same-id positives).
One generator forward serves both steps; [who learns] is the reference code's routing:

    D step:   LSGAN on real (a, b) vs the forward's detached G(a_b, s_a), G(a_a, s_b); R1 on real
    E/G step: L_img1  |x − G(a_x, s_x)|                 self reconstruction
              L_img2  |x − G(a_pos(x), s_x)|            same-id appearance swap
              L_code  |a_j − E_a(G(a_j, s_i))| + |s_i − E_s(G(a_j, s_i))|   [G, E_s; targets detached]
              L_id^c  CE(prim(G(a_j, s_i)), y_j)        appearance provider's identity [G, E_s: frozen E_a]
              L_adv   LSGAN of G                        [G, E_s]
              L_id^s  CE(prim(x)) on real images, and on their positives, random erasing [E_a]
              L_prim  KL(teacher(G) ‖ prim(G))          after the warm-up, ramped in [E_a: detached image]
              L_fine  CE(fine(G(a_j, s_i)), y_i)       structure provider's identity [E_a: detached image]
                      + CE(fine(x)) on real images, weight λ_fine [E_a]
              L_cyc   optional (reference code): |x_i − G(E_a(G(a_i,s_j)), E_s(G(a_j,s_i)))|

Every routing choice and the loss scale (sums over the two loaders, as the reference, or means)
is a field of `DGNetTrainConfig`, the paper's literal reading included. Iteration counts are
fractions of the run (paper: 100K iterations, feeding from 30K with a 4K ramp, lr ×0.1 at 60K and
90K), so a short CPU run has the same shape as the paper's.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms import RandomErasing

from generator_service.models.backbones import BACKBONE_CHANNELS
from generator_service.models.dgnet import DGNET_PRESETS, DGNet, DGNetConfig
from generator_service.models.dgnet_nets import reference_init, to_grey
from generator_service.models.frozen_features import FrozenPyramid
from generator_service.models.teacher import Teacher
from reidgen.core.checkpoint import Checkpoint, load_state
from reidgen.core.config import config_from_dict, config_to_dict, from_preset
from reidgen.core.errors import ReidgenError
from reidgen.core.images import UnreadableImages, eval_transform
from reidgen.core.market import LabelMap, scan_split
from trainer.augment import DiffAugment
from trainer.feeds.data import ImageDataset, endless_batches, epoch_loader
from trainer.feeds.samplers import PositiveSampler, RandomBatchSampler
from trainer.feeds.transforms import train_transform
from trainer.loop import Plot, Task, TrainLoop, host_values
from trainer.schedule import warmup_step_factor
from trainer.tasks.dgnet_levers import PERCEPTUAL_LEVELS, BandStyleLoss, PerceptualLoss, identity_loss


@dataclass
class LossWeights:
    img: float = 5.0          # λ_img on L_img1 + L_img2
    code: float = 1.0         # L_code (appearance and structure)
    id_cross: float = 0.5     # λ_id on L_id^c
    id_self: float = 1.0      # L_id^s: CE of the primary head on real images
    id_pos: float = 1.0       # CE of the primary head on the same-identity positives (reference: own term)
    adv: float = 2.0          # L_adv per D scale (reference code: 2; the paper's eq. 10 reads 1)
    prim_max: float = 2.0     # λ_prim after the ramp
    fine_ratio: float = 0.2   # λ_fine = fine_ratio · λ_prim
    cycle_max: float = 0.0    # reference code: MUNIT-style cycle loss ramped to 2; off in the paper
    r1: float = 0.01          # R1 penalty on real images, per scale
    # Fast-converging levers (issue 22; 0 = off, as in the paper): trainer.tasks.dgnet_levers.
    perc: float = 0.0         # perceptual L1 on frozen ImageNet features, self + positive reconstructions
    id_recon: float = 0.0     # 1 − cos of the teacher's embeddings, self + positive reconstructions
    style: float = 0.0        # banded channel statistics of each cross image against its appearance source


@dataclass
class DGNetTrainConfig:
    data: str = ""
    teacher: str = ""
    model: DGNetConfig = field(default_factory=lambda: DGNET_PRESETS["small"])
    pretrained: str = "imagenet"
    # Start E_a's backbone from the teacher's (same backbone kind). Off in the paper (ImageNet); the
    # small preset turns it on so that the appearance code carries identity from the first step.
    ea_from_teacher: bool = False
    # Start E_a, E_s, G (and D, when the file has one) from a DG-Net checkpoint: a trained run, an
    # `import-dgnet` of the public reference files or an `export`. The model configuration is the file's.
    init_from: str = ""
    iterations: int = 2000
    batch_size: int = 8               # per loader (two loaders: a and b)
    lr_ea: float = 0.002              # SGD for E_a (heads ×ea_head_lr_mult)
    ea_head_lr_mult: float = 10.0
    lr_gen: float = 1e-4              # Adam for E_s, G and D
    lr_mlp_mult: float = 1.0          # G's AdaIN MLPs learn at lr_gen × this (the path appearance takes)
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.6, 0.9)  # fractions of the run: lr ×gamma
    gamma: float = 0.1
    feed: bool = True                 # feed generated images to E_a (False: the paper's "w/o feed")
    feed_start: float = 0.3           # fraction of the run before L_prim/L_fine start
    ramp: float = 0.04                # fraction of the run over which λ_prim ramps 0 → prim_max
    ramp_code_loss: bool = False      # reference code: L_code also ramps in from feed_start
    # L_id^c ramps in from feed_start too (paper and reference: on from the start).
    ramp_id_cross: bool = False
    # Which network learns from which loss. The defaults are the reference code's; each True is the
    # paper read literally (every term of eq. 10 reaches every network it passes through).
    id_cross_trains_ea: bool = False  # L_id^c: reference = a parameter-frozen copy of E_a judges G's image
    feed_trains_generator: bool = False  # L_prim/L_fine: reference = on detached generated images
    structure_target_grad: bool = False  # L_code's structure target s_i: reference = detached
    # Reference: with this probability the live E_s re-encodes the detached generated image, otherwise a
    # frozen copy of E_s encodes the live one (0 = always the live E_s on the live image).
    encode_again_p: float = 0.5
    fine_on_real: bool = True         # reference: the fine head also learns CE on real images (λ_fine)
    # Reference: every loss is the sum of its loader-a and loader-b terms; False takes the mean over both.
    sum_over_loaders: bool = True
    init: str = "reference"           # reference: Kaiming (G, E_s), N(0, 0.02) (D); or "pytorch" defaults
    # DiffAugment policy for every image D sees, real or generated (trainer.augment; "" = off, the
    # paper), e.g. "color,translation,cutout".
    diffaugment: str = ""
    # An independent re-id model that judges identity in the logged quality figures (never trained
    # against: the levers that train against the teacher inflate the teacher's own figures).
    judge: str = ""
    weights: LossWeights = field(default_factory=LossWeights)
    erasing_p: float = 0.5            # random erasing on the copies fed to the classifier only
    pad: int = 10
    seed: int = 0
    workers: int = max(0, min(4, (os.cpu_count() or 1) - 1))
    device: str = "auto"
    amp: bool = True                  # bf16 autocast on CUDA
    cpu_bf16: bool = False            # bf16 autocast on the CPU too, where it is native (reidgen.core.device)
    checkpoint_every: int = 500
    keep_checkpoints: bool = False
    grid_every: int = 250
    quality_every: int = 250          # cheap generation-quality metrics on fixed real images (0 = off)
    quality_images: int = 64
    max_steps: int = 0
    strict_images: bool = False


# The paper preset is the reference code's training. The small preset keeps its routing and initial
# weights but, measured on CPU (README, "DG-Net choices"): means over the loaders and G's adversarial
# weight 1 (the reference's sums let D win within a CPU budget), L_id^c ramped in after G reconstructs,
# E_a started from the teacher so the appearance code means something from the first step, and one lr
# drop at 90 % (a run of 1-2K iterations is far from converged at 60 %: identity consistency 0.044 with
# the reference's drop at 60 %, 0.082 without it, bench/results/dgnet_cpu_run*.json).
DGNET_TRAIN_PRESETS = {
    # bf16 autocast where the CPU has it natively: 1.6x faster at paper size (docs/dgnet/training.md#speed).
    "paper": DGNetTrainConfig(model=DGNET_PRESETS["paper"], iterations=100_000, batch_size=8, cpu_bf16=True),
    "small": DGNetTrainConfig(model=DGNET_PRESETS["small"], iterations=2000, batch_size=8, ramp_id_cross=True,
                              sum_over_loaders=False, weights=LossWeights(adv=1.0), ea_from_teacher=True,
                              milestones=(0.9,)),
}
# The fast preset (issue 22): the small preset with the levers that converged fastest on a CPU,
# measured side by side at equal compute (docs/dgnet/fast.md; bench/dgnet_fast.py), in three rounds:
# 1. the perceptual and identity losses on the reconstructions;
# 2. four times the reference's Adam learning rate for E_s, G and D (1e-4 is meant for 100K
#    iterations; in a few hundred G moves too little: FID 332 -> 288 at 200 iterations on mini);
# 3. a short path for the appearance code into G: region-adaptive AdaIN (each stripe of the body
#    styled by its own part of the code) and the appearance-modulated RGB head. Without them the
#    swaps take the column's pose and the row's brightness, not its colours.
# The projected D with DiffAugment drew stripe textures in its first hundred iterations, and the
# banded style loss changed no figure beyond noise, so both stay settings.
DGNET_TRAIN_PRESETS["fast"] = replace(DGNET_TRAIN_PRESETS["small"], model=DGNET_PRESETS["fast"], lr_gen=4e-4,
                                      weights=replace(DGNET_TRAIN_PRESETS["small"].weights, perc=1.0, id_recon=1.0))


def dgnet_preset_config(name: str, **overrides) -> DGNetTrainConfig:
    """A named preset with fields overridden (model and loss-weight fields included)."""
    cfg = from_preset(DGNET_TRAIN_PRESETS, name, **overrides)
    if "backbone" in overrides:
        # The appearance code has as many channels as the backbone's feature map.
        generator = replace(cfg.model.generator, appearance_channels=BACKBONE_CHANNELS[cfg.model.backbone])
        cfg = replace(cfg, model=replace(cfg.model, generator=generator))
    return cfg


class PairDataset(Dataset):
    """An image and a random same-identity positive, both augmented from the sample's seed."""

    def __init__(self, images: ImageDataset):
        self.images = images
        self.positives = PositiveSampler([it.pid for it in images.items])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        index, seed = key
        j = self.positives.sample(index, np.random.default_rng(seed))
        x, y, _, ok = self.images[(index, seed)]
        xp, _, _, ok_p = self.images[(j, seed + 1)]
        return x, y, xp, ok and ok_p, index


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Let gradients pass through modules without updating their parameters."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def frozen_copy(module: torch.nn.Module, *args):
    """Run ``module`` as a throw-away copy of it would run (the reference deep-copies E_a each
    iteration): gradients reach the inputs but not the parameters, and the batch-norm statistics
    this call updates are discarded, so the live network is left exactly as it was."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    return torch.func.functional_call(module, (params, buffers), args)


# The cheap quality figures plotted beside the losses (quality.png).
QUALITY_CURVES = ("identity_consistency", "structure_identity_share", "reconstruction_identity", "reconstruction_ssim",
                  "reconstruction_l1", "diversity_ssim", "teacher_fd")


def ramp_weight(step: int, cfg: DGNetTrainConfig) -> float:
    """0 before feed_start, then linear to 1 over the ramp, 1 after (fractions of the run)."""
    start, length = cfg.feed_start * cfg.iterations, max(1.0, cfg.ramp * cfg.iterations)
    return float(np.clip((step - start) / length, 0.0, 1.0))


class DGNetTrainer(Task):
    """Holds the networks, optimisers and data of one run, a task on `trainer.loop`; `run()` trains
    to the end."""

    kind = "dgnet"
    save_untrained = True
    # oneDNN's convolutions run faster on channels-last tensors: the small preset's iteration 1.25×
    # (bench/results/dgnet_speed_layout.json; docs/dgnet/training.md, "Speed").
    channels_last_on_cpu = True

    def __init__(self, cfg: DGNetTrainConfig, out: str | Path, resume: str | Path | None = None,
                 progress: bool = True):
        self.loop = TrainLoop("dgnet", out, resume, progress)
        ckpt = self.loop.resumed
        if ckpt is not None and ckpt.get("inference_only"):
            raise ReidgenError(f"{resume} is an inference export (no D, optimiser or RNG state): training cannot "
                               f"resume from it; start a new run from its weights with --init {resume}")
        if ckpt is not None:
            cfg = config_from_dict(DGNetTrainConfig, ckpt.train_config)
        start = Checkpoint.read(cfg.init_from, "dgnet") if ckpt is None and cfg.init_from else None
        if start is not None:  # the weights decide the architecture
            cfg = replace(cfg, model=config_from_dict(DGNetConfig, start.model_config), ea_from_teacher=False)
        self.cfg, self.out = cfg, Path(out)
        self.device = self.loop.pick_device(cfg.device, cfg.amp, cfg.cpu_bf16)
        items = scan_split(cfg.data, "train")
        self.items = items
        self.label_map = LabelMap.from_items(items)
        if ckpt is not None:
            LabelMap(ckpt.label_map).require_same(self.label_map, f"resuming {resume} on {cfg.data}")
        if start is not None:
            LabelMap(start.label_map).require_same(self.label_map, f"--init {cfg.init_from} on {cfg.data}")
        if not cfg.teacher:
            raise ReidgenError("a teacher checkpoint is required (train one with reidgen train-reid)")
        if any(not 0 < m <= 1 for m in cfg.milestones):
            raise ReidgenError(f"milestones {list(cfg.milestones)}: expected fractions of the run in (0, 1], "
                               "e.g. 0.6 0.9")
        self.teacher = Teacher(cfg.teacher, self.label_map, self.device)
        # Recorded in every checkpoint: batch jobs that take the teacher from the checkpoint check
        # that the file at that path is still the one trained with.
        self.lineage = {"teacher": {"path": cfg.teacher, "sha256_16": self.teacher.identity}}
        trained_with = (ckpt.lineage.get("teacher") or {}).get("sha256_16") if ckpt is not None else None
        if trained_with and trained_with != self.teacher.identity:
            raise ReidgenError(f"the teacher {cfg.teacher} is not the file {resume} was trained with (content "
                               f"{self.teacher.identity}, recorded {trained_with}); resume with the original teacher")

        torch.manual_seed(cfg.seed)
        # No backbone weights to fetch when a file supplies every weight (ImageNet ResNet-50 may not be on disk).
        from_file = ckpt is not None or start is not None
        self.net = DGNet(cfg.model, len(self.label_map), pretrained="none" if from_file else cfg.pretrained)
        if ckpt is None:
            self._initialise()
        if start is not None:
            self._load_start(start)
        self.net.to(self.device)
        ea = self.net.ea
        self.opt_ea = torch.optim.SGD(
            [{"params": list(ea.backbone.parameters()), "lr": cfg.lr_ea},
             {"params": ea.head_parameters(), "lr": cfg.lr_ea * cfg.ea_head_lr_mult}],
            momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        adam = dict(lr=cfg.lr_gen, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.opt_gen = torch.optim.Adam(self._generator_groups(), **adam)
        # The projected D's feature network and projections are frozen: only its heads learn.
        self.opt_dis = torch.optim.Adam([p for p in self.net.dis.parameters() if p.requires_grad], **adam)
        self.models = {"model": self.net}
        # Named in the order of an older checkpoint's list.
        self.optimizers = {"ea": self.opt_ea, "gen": self.opt_gen, "dis": self.opt_dis}
        self.step = 0
        self.loop.restore(self)

        size = cfg.model.image_size
        images = ImageDataset(items, train_transform(size, pad=cfg.pad, erasing_p=0), self.label_map, size)
        self.pairs = PairDataset(images)
        # Two independent loaders, as in the reference; each rank draws its own batches.
        seed = self.loop.rank_seed(cfg.seed)
        self.samplers = [RandomBatchSampler(len(items), cfg.batch_size, seed + i) for i in (0, 1)]
        self.erase = RandomErasing(p=cfg.erasing_p, value=0) if cfg.erasing_p > 0 else None
        self.unreadable = UnreadableImages(strict=cfg.strict_images)
        try:
            self.augment = DiffAugment(cfg.diffaugment)
        except ValueError as exc:
            raise ReidgenError(str(exc)) from None
        # One frozen feature network serves both levers that read it.
        w = cfg.weights
        pyramid = FrozenPyramid(levels=PERCEPTUAL_LEVELS).to(self.device) if w.perc > 0 or w.style > 0 else None
        self.perceptual = PerceptualLoss(pyramid) if w.perc > 0 else None
        self.style = BandStyleLoss(pyramid) if w.style > 0 else None
        self.judge = Teacher(cfg.judge, self.label_map, self.device) if cfg.judge else None

    def _generator_groups(self) -> list[dict]:
        """E_s and G's parameters for Adam; the AdaIN MLPs in a group of their own when their
        learning rate differs (one group otherwise, the layout of earlier checkpoints)."""
        es, dec, mult = self.net.es, self.net.dec, self.cfg.lr_mlp_mult
        if mult == 1.0:
            return [{"params": list(es.parameters()) + list(dec.parameters())}]
        mlp = {id(p) for p in dec.mlps.parameters()}
        rest = list(es.parameters()) + [p for p in dec.parameters() if id(p) not in mlp]
        return [{"params": rest}, {"params": list(dec.mlps.parameters()), "lr": self.cfg.lr_gen * mult}]

    def _initialise(self) -> None:
        cfg = self.cfg
        if cfg.init == "reference":
            # The projected D keeps its own initial weights (frozen ImageNet features among them).
            dis = self.net.dis if cfg.model.discriminator == "multiscale" else None
            reference_init([self.net.es, self.net.dec], dis)
        elif cfg.init != "pytorch":
            raise ReidgenError(f"unknown init {cfg.init!r}; expected reference or pytorch")
        if cfg.ea_from_teacher:
            kind = self.teacher.net.config.backbone
            if kind != cfg.model.backbone:
                raise ReidgenError(f"E_a cannot start from the teacher: its backbone is {kind}, E_a's is "
                                   f"{cfg.model.backbone} (use a teacher with the same backbone, or "
                                   "--no-ea-from-teacher)")
            state = {k.removeprefix("backbone."): v for k, v in self.teacher.net.state_dict().items()
                     if k.startswith("backbone.")}
            load_state(self.net.ea.backbone, state, f"E_a from the teacher's backbone ({cfg.teacher})")

    def _load_start(self, start: Checkpoint) -> None:
        """Every network the file holds, strictly; D keeps its initial weights when the file has none."""
        for name in ("ea", "es", "dec", "dis"):
            if name == "dis" and not any(k.startswith("dis.") for k in start.state):
                continue
            start.load_into(getattr(self.net, name), prefix=name + ".")

    # -- data ----------------------------------------------------------------------------------
    def _batches(self):
        """Endless pairs of batches (a, b), resuming mid-epoch at the current step."""
        return endless_batches(lambda sampler: epoch_loader(self.pairs, sampler, self.cfg.workers, self.device),
                               self.samplers, self.step)

    def _prepare(self, a, b):
        """Move to the device, dropping unreadable samples (the two batches trimmed to one size)."""
        out = []
        for x, y, xp, ok, idx in (a, b):
            keep = self.unreadable.check(ok, idx, self.items)
            out.append([t[keep].to(self.device, non_blocking=True) for t in (x, y, xp)])
        n = min(len(out[0][0]), len(out[1][0]))
        return [[t[:n] for t in batch] for batch in out]

    # -- one iteration -------------------------------------------------------------------------
    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """Appearance codes of real images; without gradient when E_a detaches them anyway."""
        with torch.set_grad_enabled(not self.cfg.model.detach_appearance_code):
            return self.net.ea.code_and_pooled(x)[0]

    def lambdas(self) -> dict[str, float]:
        """The loss weights at the current step (ramps included)."""
        cfg, w = self.cfg, self.cfg.weights
        ramp = ramp_weight(self.step, cfg)
        feed = ramp if cfg.feed else 0.0
        return {
            "img": w.img, "adv": 1.0, "id_self": w.id_self, "id_pos": w.id_pos,
            "code": w.code * (ramp if cfg.ramp_code_loss else 1.0),
            "id_cross": w.id_cross * (ramp if cfg.ramp_id_cross else 1.0),
            "prim": w.prim_max * feed, "fine": w.prim_max * w.fine_ratio * feed,
            "fine_real": w.prim_max * w.fine_ratio * feed if cfg.fine_on_real else 0.0,
            "cycle": w.cycle_max * ramp,
        }

    def generate(self, xa, xb, pa, pb) -> dict[str, torch.Tensor]:
        """The iteration's one generator forward (it serves the D step and the E/G step): codes,
        self and positive reconstructions, and the cross-identity images (b's appearance on a's
        structure, then a's on b's)."""
        net, n = self.net, len(xa)
        real = torch.cat([xa, xb])
        s = net.es(to_grey(real))
        c = self._codes(torch.cat([xa, xb, pa, pb]))
        c_self, c_pos = c[:2 * n], c[2 * n:]
        c_cross = torch.cat([c_self[n:], c_self[:n]])
        return dict(real=real, s=s, c_cross=c_cross, x_self=net.dec(c_self, s), x_pos=net.dec(c_pos, s),
                    x_cross=net.dec(c_cross, s))

    def d_losses(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """D's loss (LSGAN and R1 for the multi-scale D, hinge for the projected one) on real images and
        the (detached) cross-identity images."""
        k = 2.0 if self.cfg.sum_over_loaders else 1.0
        # DiffAugment (when on) transforms real and generated images alike, each with fresh parameters.
        d_adv, r1 = self.net.dis.d_loss(self.augment(real), self.augment(fake.detach()), r1_weight=self.cfg.weights.r1)
        return {"d_adv": k * d_adv, "d_r1": k * r1}

    def g_losses(self, gen: dict[str, torch.Tensor], pa, pb, ya, yb) -> dict[str, torch.Tensor]:
        """Every term of the E_a/E_s/G step, unweighted by λ but summed over the two loaders when
        the reference's sums are on (a mean over the union of equal halves, times 2). The routing of
        each term (which networks it may train) is decided here; `lambdas()` weighs them."""
        cfg, net, lam = self.cfg, self.net, self.lambdas()
        k = 2.0 if cfg.sum_over_loaders else 1.0
        real, s, x_cross = gen["real"], gen["s"], gen["x_cross"]
        labels = torch.cat([ya, yb])
        y_app = torch.cat([yb, ya])  # identity of the appearance provider of each cross image
        out: dict[str, torch.Tensor] = {
            "l_img1": k * F.l1_loss(gen["x_self"], real),
            "l_img2": k * F.l1_loss(gen["x_pos"], real),
        }
        # L_id^c and the appearance half of L_code: E_a judges G's image. Reference: a frozen copy, so
        # only G and E_s learn; "w/o feed" likewise never lets generated images train E_a.
        if cfg.id_cross_trains_ea and cfg.feed:
            c_rec, (logits_cross, _), _ = net.ea(x_cross)
        else:
            c_rec, (logits_cross, _), _ = frozen_copy(net.ea, x_cross)
        out["l_id_cross"] = k * F.cross_entropy(logits_cross.float(), y_app)
        s_target = s if cfg.structure_target_grad else s.detach()
        if torch.rand(()).item() < cfg.encode_again_p:
            s_rec = net.es(to_grey(x_cross.detach()))
        else:
            s_rec = frozen_copy(net.es, to_grey(x_cross))
        out["l_code"] = k * (F.l1_loss(c_rec, gen["c_cross"].detach()) + F.l1_loss(s_rec, s_target))
        with frozen(net.dis):
            out["l_adv"] = k * self.cfg.weights.adv * net.dis.g_loss(self.augment(x_cross))
        # The levers on the reconstructions (self and positive, both of x_i): one pass over both, the
        # sum of the two means, as L_img1 + L_img2.
        recon = torch.cat([gen["x_self"], gen["x_pos"]]) if cfg.weights.perc > 0 or cfg.weights.id_recon > 0 else None
        if cfg.weights.perc > 0:
            out["l_perc"] = 2 * k * self.perceptual(recon, real)
        if cfg.weights.id_recon > 0:
            out["l_id_recon"] = 2 * k * identity_loss(self.teacher, recon, real)
        if cfg.weights.style > 0:
            n = len(real) // 2
            out["l_style"] = k * self.style(x_cross, torch.cat([real[n:], real[:n]]))

        # Identity on real images and on their positives, erased copies for the classifier.
        real_all = torch.cat([real, pa, pb])
        if self.erase is not None:
            real_all = torch.stack([self.erase(img) for img in real_all])
        _, (logits_real, logits_real_fine), _ = net.ea(real_all)
        n2 = len(real)
        out["l_id_self"] = k * F.cross_entropy(logits_real[:n2].float(), labels)
        out["l_id_pos"] = k * F.cross_entropy(logits_real[n2:].float(), labels)
        if lam["fine_real"] > 0:
            out["l_fine_real"] = k * F.cross_entropy(logits_real_fine[:n2].float(), labels)
        self._acc = (logits_real[:n2].argmax(1) == labels).float().mean()

        if lam["prim"] > 0:
            # Feeding: E_a learns the teacher's soft label (primary head) and the structure provider's
            # identity (fine head) from the generated image. Reference: the image is detached.
            x_fed = x_cross if cfg.feed_trains_generator else x_cross.detach()
            _, (logits_prim, logits_fine), _ = net.ea(x_fed)
            q = self.teacher.soft_labels(x_cross.detach())
            out["l_prim"] = k * F.kl_div(F.log_softmax(logits_prim.float(), 1), q, reduction="batchmean")
            out["l_fine"] = k * F.cross_entropy(logits_fine.float(), labels)
        if lam["cycle"] > 0:
            n = len(real) // 2
            recovered = net.dec(torch.cat([c_rec[n:], c_rec[:n]]), s_rec)
            out["l_cycle"] = k * F.l1_loss(recovered, real)
        return out

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        lam = self.lambdas()
        weight = {"l_img1": lam["img"], "l_img2": lam["img"], "l_code": lam["code"], "l_id_cross": lam["id_cross"],
                  "l_adv": lam["adv"], "l_id_self": lam["id_self"], "l_id_pos": lam["id_pos"],
                  "l_fine_real": lam["fine_real"], "l_prim": lam["prim"], "l_fine": lam["fine"],
                  "l_cycle": lam["cycle"], "l_perc": self.cfg.weights.perc, "l_id_recon": self.cfg.weights.id_recon,
                  "l_style": self.cfg.weights.style}
        return sum(weight[name] * value for name, value in losses.items())

    def train_step(self, batch) -> dict[str, float]:
        (xa, ya, pa), (xb, yb, pb) = self._prepare(*batch)
        if len(xa) < 2:
            return {}
        with self.loop.autocast():
            gen = self.generate(xa, xb, pa, pb)
            # D step first, on this forward's detached cross-identity images.
            d = self.d_losses(gen["real"], gen["x_cross"])
        self.loop.update(d["d_adv"] + d["d_r1"], self.opt_dis)

        with self.loop.autocast():
            losses = self.g_losses(gen, pa, pb, ya, yb)
            total = self.weighted_total(losses)
        self.loop.update(total, self.opt_ea, self.opt_gen)

        lam = self.lambdas()
        logs = host_values({**d, **losses, "total": total, "acc_real": self._acc})
        logs.update(lam_prim=lam["prim"], lam_fine=lam["fine"], lam_id_cross=lam["id_cross"])
        n, x_cross = len(xa), gen["x_cross"]
        self._last_images = (xa[:4], xb[:4], gen["x_self"][:4], gen["x_pos"][:4], x_cross[n:n + 4], x_cross[:4])
        return logs

    # -- the loop's hooks ------------------------------------------------------------------------
    def run(self) -> Path:
        return self.loop.run(self)

    def total_steps(self) -> int:
        cfg = self.cfg
        return min(cfg.iterations, cfg.max_steps) if cfg.max_steps else cfg.iterations

    def layout_modules(self) -> list[torch.nn.Module]:
        return super().layout_modules() + [t.net for t in (self.teacher, self.judge) if t is not None]

    def batches(self):
        return self._batches()

    def lr_factor(self) -> float:
        return warmup_step_factor(self.step / self.cfg.iterations, milestones=self.cfg.milestones,
                                  gamma=self.cfg.gamma)

    def postfix(self, logs: dict) -> dict:
        return {"img1": f"{logs['l_img1']:.3f}", "d": f"{logs['d_adv']:.2f}", "acc": f"{logs['acc_real']:.2f}"}

    def quality_due(self) -> bool:
        every = self.cfg.quality_every
        return bool(every) and (self.step % every == 0 or self.step == 1)

    def plots(self) -> list[Plot]:
        cfg = self.cfg
        plots = [Plot("metrics.png", ("l_img1", "l_img2", "l_code", "l_id_cross", "l_id_self", "l_id_pos", "l_adv",
                                      "d_adv", "l_prim", "l_fine", "l_perc", "l_id_recon", "l_style",
                                      "acc_real"),
                      f"train-dgnet {cfg.data}")]
        if cfg.quality_every:
            judged = ("identity_consistency_judge", "reconstruction_identity_judge") if cfg.judge else ()
            plots.append(Plot("quality.png", QUALITY_CURVES + judged, f"generation quality on {cfg.quality_images} "
                              "fixed training images", event="quality"))
        return plots

    def checkpoint_fields(self) -> dict:
        return {"model_config": config_to_dict(self.cfg.model), "train_config": config_to_dict(self.cfg),
                "label_map": self.label_map.to_list(), "lineage": self.lineage}

    def after_training(self) -> dict:
        return {"unreadable": self.unreadable.paths}

    def quality(self) -> dict[str, float]:
        """Cheap generation-quality figures on a fixed set of real training images (the same set
        at every call, so the curve compares like with like)."""
        from trainer.evaluation.quality import cheap_quality

        if not hasattr(self, "_quality_batch"):
            rng = np.random.default_rng(self.cfg.seed)
            picks = rng.choice(len(self.items), size=min(self.cfg.quality_images, len(self.items)), replace=False)
            items = [self.items[i] for i in sorted(picks)]
            images = ImageDataset(items, eval_transform(self.cfg.model.image_size), self.label_map,
                                  self.cfg.model.image_size)
            x, y, _, _ = zip(*(images[i] for i in range(len(images))))
            self._quality_batch = (torch.stack(x).to(self.device), torch.tensor(y, device=self.device))
        # A forked RNG: measuring must not change the training that follows (exact resume).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                self.loop.autocast():
            return cheap_quality(self.net, self.teacher, *self._quality_batch, seed=self.cfg.seed, judge=self.judge)

    def grid_rows(self) -> list[list[torch.Tensor]] | None:
        """Rows: a, b, G(a_a, s_a), G(a_pos, s_a), G(a_a, s_b), G(a_b, s_a)."""
        if not getattr(self, "_last_images", None):
            return None
        return [list(t) for t in self._last_images]


def train_dgnet(cfg: DGNetTrainConfig | None, out: str | Path, resume: str | Path | None = None,
                progress: bool = True) -> Path:
    return DGNetTrainer(cfg or DGNetTrainConfig(), out, resume, progress).run()
