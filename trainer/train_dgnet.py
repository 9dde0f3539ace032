"""DG-Net joint training: generative module (E_a, E_s, G, D) and discriminative module (E_a's
primary and fine-grained heads) learn together; generated images feed E_a online.

One iteration (the paper's eqs. 1-10; a = loader A's batch, b = loader B's, p = same-id positives):

    D step:   LSGAN on real (a, b) vs generated G(a_b, s_a), G(a_a, s_b); R1 on real
    E/G step: L_img1  |x − G(a_x, s_x)|                 self reconstruction
              L_img2  |x − G(a_pos(x), s_x)|            same-id appearance swap
              L_code  |a_j − E_a(G(a_j, s_i))| + |s_i − E_s(G(a_j, s_i))|
              L_id^c  CE(prim(G(a_j, s_i)), y_j)        appearance provider's identity
              L_adv   LSGAN of G
              L_id^s  CE(prim(x)) on real images (and their positives), random erasing
              L_prim  KL(teacher(G) ‖ prim(G))          after the warm-up, ramped in
              L_fine  CE(fine(G(a_j, s_i)), y_i)       structure provider's identity
              L_cyc   optional (reference code): |x_i − G(E_a(G(a_i,s_j)), E_s(G(a_j,s_i)))|

Iteration counts are fractions of the run (paper: 100K iterations, feeding from 30K with a 4K
ramp, lr ×0.1 at 60K and 90K), so a short CPU run has the same shape as the paper's.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms import RandomErasing
from tqdm import tqdm

from generator_service.backbones import BACKBONE_CHANNELS
from generator_service.checkpoint import load_checkpoint, load_state, save_checkpoint
from generator_service.device import autocast, pick_device
from generator_service.dgnet import DGNET_PRESETS, DGNet, DGNetConfig
from generator_service.dgnet_nets import to_grey
from generator_service.images import UnreadableImages, image_grid
from generator_service.teacher import Teacher
from reidgen.config import config_from_dict, config_to_dict, from_preset
from reidgen.errors import ReidgenError
from reidgen.market import LabelMap, scan_split
from trainer.data import ImageDataset, endless_batches, epoch_loader
from trainer.device import rng_state, set_rng_state
from trainer.distributed import (
    DistContext,
    average_gradients,
    broadcast_parameters,
    device_for,
    gather_objects,
    init_distributed,
    parameter_checksum,
    shutdown,
)
from trainer.runlog import RunLog, plot_metrics
from trainer.samplers import PositiveSampler, RandomBatchSampler
from trainer.schedule import set_lr, warmup_step_factor
from trainer.transforms import train_transform


@dataclass
class LossWeights:
    img: float = 5.0          # λ_img on L_img1 + L_img2
    code: float = 1.0         # L_code (appearance and structure)
    id_cross: float = 0.5     # λ_id on L_id^c
    id_self: float = 1.0      # L_id^s
    adv: float = 1.0          # L_adv (the reference code uses 2 per scale)
    prim_max: float = 2.0     # λ_prim after the ramp
    fine_ratio: float = 0.2   # λ_fine = fine_ratio · λ_prim
    cycle_max: float = 0.0    # reference code: MUNIT-style cycle loss ramped to 2; off in the paper
    r1: float = 0.01          # R1 penalty on real images, per scale


@dataclass
class DGNetTrainConfig:
    data: str = ""
    teacher: str = ""
    model: DGNetConfig = field(default_factory=lambda: DGNET_PRESETS["small"])
    pretrained: str = "imagenet"
    iterations: int = 2000
    batch_size: int = 8               # per loader (two loaders: a and b)
    lr_ea: float = 0.002              # SGD for E_a (heads ×ea_head_lr_mult)
    ea_head_lr_mult: float = 10.0
    lr_gen: float = 1e-4              # Adam for E_s, G and D
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.6, 0.9)  # fractions of the run: lr ×gamma
    gamma: float = 0.1
    feed: bool = True                 # feed generated images to E_a (False: the paper's "w/o feed")
    feed_start: float = 0.3           # fraction of the run before L_prim/L_fine start
    ramp: float = 0.04                # fraction of the run over which λ_prim ramps 0 → prim_max
    ramp_code_loss: bool = False      # reference code: L_code also ramps in from feed_start
    # L_id^c ramps in from feed_start too (paper and reference: on from the start). Measured on CPU
    # with EfficientNet-Lite0 as E_a: its identity gradient through E_a swamps G's reconstruction
    # gradient, and L_img1 stays flat; ramped in, G first learns to reconstruct. The small preset
    # turns it on.
    ramp_id_cross: bool = False
    weights: LossWeights = field(default_factory=LossWeights)
    erasing_p: float = 0.5            # random erasing on the copies fed to the classifier only
    pad: int = 10
    seed: int = 0
    workers: int = max(0, min(4, (os.cpu_count() or 1) - 1))
    device: str = "auto"
    amp: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: bool = False
    grid_every: int = 250
    max_steps: int = 0
    strict_images: bool = False


DGNET_TRAIN_PRESETS = {
    "paper": DGNetTrainConfig(model=DGNET_PRESETS["paper"], iterations=100_000, batch_size=8),
    "small": DGNetTrainConfig(model=DGNET_PRESETS["small"], iterations=2000, batch_size=8, ramp_id_cross=True),
}


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


def ramp_weight(step: int, cfg: DGNetTrainConfig) -> float:
    """0 before feed_start, then linear to 1 over the ramp, 1 after (fractions of the run)."""
    start, length = cfg.feed_start * cfg.iterations, max(1.0, cfg.ramp * cfg.iterations)
    return float(np.clip((step - start) / length, 0.0, 1.0))


class DGNetTrainer:
    """Holds the networks, optimisers and data of one run; `run()` trains to the end."""

    def __init__(self, cfg: DGNetTrainConfig, out: str | Path, resume: str | Path | None = None,
                 progress: bool = True):
        self.ctx: DistContext = init_distributed()
        ckpt = load_checkpoint(resume, "dgnet") if resume else None
        if ckpt is not None:
            cfg = config_from_dict(DGNetTrainConfig, ckpt["train_config"])
        self.cfg, self.out, self.progress = cfg, Path(out), progress and self.ctx.is_main
        self.device = pick_device(device_for(self.ctx, cfg.device))
        items = scan_split(cfg.data, "train")
        self.items = items
        self.label_map = LabelMap.from_items(items)
        if ckpt is not None:
            LabelMap(tuple(ckpt["label_map"])).require_same(self.label_map, f"resuming {resume} on {cfg.data}")
        if not cfg.teacher:
            raise ReidgenError("a teacher checkpoint is required (train one with reidgen train-reid)")
        self.teacher = Teacher(cfg.teacher, self.label_map, self.device)

        torch.manual_seed(cfg.seed)
        self.net = DGNet(cfg.model, len(self.label_map), pretrained="none" if ckpt else cfg.pretrained)
        self.net.to(self.device)
        broadcast_parameters(self.net, self.ctx)
        ea = self.net.ea
        self.opt_ea = torch.optim.SGD(
            [{"params": list(ea.backbone.parameters()), "lr": cfg.lr_ea},
             {"params": ea.head_parameters(), "lr": cfg.lr_ea * cfg.ea_head_lr_mult}],
            momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        adam = dict(lr=cfg.lr_gen, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.opt_gen = torch.optim.Adam(list(self.net.es.parameters()) + list(self.net.dec.parameters()), **adam)
        self.opt_dis = torch.optim.Adam(self.net.dis.parameters(), **adam)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["initial_lr"] = g["lr"]
        self.step = 0
        if ckpt is not None:
            load_state(self.net, ckpt["model"], f"checkpoint {resume}")
            for opt, state in zip(self.optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
            self.step = ckpt["step"]
            states = ckpt["rng"]
            if len(states) == self.ctx.world_size:
                set_rng_state(states[self.ctx.rank])

        size = cfg.model.image_size
        images = ImageDataset(items, train_transform(size, pad=cfg.pad, erasing_p=0), self.label_map, size)
        self.pairs = PairDataset(images)
        # Two independent loaders, as in the reference; each rank draws its own batches.
        seed = cfg.seed + 1000 * self.ctx.rank
        self.samplers = [RandomBatchSampler(len(items), cfg.batch_size, seed + i) for i in (0, 1)]
        self.erase = RandomErasing(p=cfg.erasing_p, value=0) if cfg.erasing_p > 0 else None
        self.unreadable = UnreadableImages(strict=cfg.strict_images)
        self.resumed_from = self.step if ckpt is not None else None

    @property
    def optimizers(self):
        return (self.opt_ea, self.opt_gen, self.opt_dis)

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

    def train_step(self, a, b) -> dict[str, float]:
        cfg, w, net = self.cfg, self.cfg.weights, self.net
        (xa, ya, pa), (xb, yb, pb) = self._prepare(a, b)
        n = len(xa)
        if n < 2:
            return {}
        ramp = ramp_weight(self.step, cfg) if cfg.feed else 0.0
        lam_prim, lam_fine = w.prim_max * ramp, w.prim_max * ramp * w.fine_ratio
        lam_code = w.code * (ramp_weight(self.step, cfg) if cfg.ramp_code_loss else 1.0)
        lam_id_cross = w.id_cross * (ramp_weight(self.step, cfg) if cfg.ramp_id_cross else 1.0)
        lam_cycle = w.cycle_max * ramp_weight(self.step, cfg)
        logs: dict[str, float] = {}

        # ---- D step: real a, b against cross-identity generations ----
        with autocast(self.device, cfg.amp):
            with torch.no_grad():
                s_real = net.es(to_grey(torch.cat([xa, xb])))
                c_real = net.ea.code_and_pooled(torch.cat([xa, xb]))[0]
                fake = net.dec(torch.cat([c_real[n:], c_real[:n]]), s_real)  # (b on a), (a on b)
            d_adv, r1 = net.dis.d_loss(torch.cat([xa, xb]), fake, r1_weight=w.r1)
        self.opt_dis.zero_grad(set_to_none=True)
        (d_adv + r1).float().backward()
        average_gradients(list(net.dis.parameters()), self.ctx)
        self.opt_dis.step()
        logs.update(d_adv=d_adv.item(), d_r1=r1.item())

        with autocast(self.device, cfg.amp):
            # ---- E_a / E_s / G step ----
            real = torch.cat([xa, xb])
            s = net.es(to_grey(real))
            c = self._codes(torch.cat([xa, xb, pa, pb]))
            c_self, c_pos = c[:2 * n], c[2 * n:]
            labels = torch.cat([ya, yb])
            c_cross = torch.cat([c_self[n:], c_self[:n]])  # appearance of b on a's structure, and a on b
            y_app = torch.cat([yb, ya])                    # identity of the appearance provider
            y_str = labels                                 # identity of the structure provider

            x_self = net.dec(c_self, s)
            x_pos = net.dec(c_pos, s)
            x_cross = net.dec(c_cross, s)
            l_img1 = F.l1_loss(x_self, real)
            l_img2 = F.l1_loss(x_pos, real)

            # Generated images through E_a: its own parameters learn from them only when feeding.
            with frozen(net.ea) if not cfg.feed else contextlib.nullcontext():
                c_rec, pooled = net.ea.code_and_pooled(x_cross)
                logits_prim, _ = net.ea.head_prim(pooled)
                logits_fine, _ = net.ea.head_fine(pooled)
            s_rec = net.es(to_grey(x_cross))
            l_code = F.l1_loss(c_rec, c_cross.detach()) + F.l1_loss(s_rec, s)
            l_id_cross = F.cross_entropy(logits_prim.float(), y_app)
            with frozen(net.dis):
                l_adv = net.dis.g_loss(x_cross)

            # Identity on real images and their positives, erased copies for the classifier.
            real_all = torch.cat([real, pa, pb])
            if self.erase is not None:
                real_all = torch.stack([self.erase(img) for img in real_all])
            _, (logits_real, _), _ = net.ea(real_all)
            l_id_self = F.cross_entropy(logits_real.float(), torch.cat([labels, labels]))

            total = (w.img * (l_img1 + l_img2) + lam_code * l_code + lam_id_cross * l_id_cross
                     + w.adv * l_adv + w.id_self * l_id_self)
            if lam_prim > 0:
                q = self.teacher.soft_labels(x_cross.detach())
                l_prim = F.kl_div(F.log_softmax(logits_prim.float(), 1), q, reduction="batchmean")
                l_fine = F.cross_entropy(logits_fine.float(), y_str)
                total = total + lam_prim * l_prim + lam_fine * l_fine
                logs.update(l_prim=l_prim.item(), l_fine=l_fine.item())
            if lam_cycle > 0:
                # Appearance recovered from x_cross's second half (a on b), structure from its first.
                recovered = net.dec(torch.cat([c_rec[n:], c_rec[:n]]), s_rec)
                l_cycle = F.l1_loss(recovered, real)
                total = total + lam_cycle * l_cycle
                logs["l_cycle"] = l_cycle.item()

        for opt in (self.opt_ea, self.opt_gen):
            opt.zero_grad(set_to_none=True)
        total.float().backward()
        average_gradients([p for m in (net.ea, net.es, net.dec) for p in m.parameters()], self.ctx)
        self.opt_ea.step()
        self.opt_gen.step()

        acc = (logits_real[:2 * n].argmax(1) == labels).float().mean().item()
        logs.update(total=total.item(), l_img1=l_img1.item(), l_img2=l_img2.item(), l_code=l_code.item(),
                    l_id_cross=l_id_cross.item(), l_adv=l_adv.item(), l_id_self=l_id_self.item(),
                    acc_real=acc, lam_prim=lam_prim, lam_fine=lam_fine, lam_id_cross=lam_id_cross)
        self._last_images = (xa[:4], xb[:4], x_self[:4], x_pos[:4], x_cross[n:n + 4], x_cross[:4])
        return logs

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, out = self.cfg, self.out
        total = min(cfg.iterations, cfg.max_steps) if cfg.max_steps else cfg.iterations
        last = out / "checkpoints" / "last.pt"
        log = None
        if self.ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
            log = RunLog(out / "metrics.jsonl", resume_step=self.resumed_from)
        bar = tqdm(total=total, initial=self.step, disable=not self.progress, unit="it", dynamic_ncols=True)
        self.net.train()
        batches = self._batches()
        while self.step < total:
            factor = warmup_step_factor(self.step / cfg.iterations, milestones=cfg.milestones, gamma=cfg.gamma)
            for opt in self.optimizers:
                set_lr(opt, factor)
            logs = self.train_step(*next(batches))
            self.step += 1
            bar.update(1)
            if log is not None and logs:
                log.write(step=self.step, lr_factor=factor, **logs)
                bar.set_postfix(img1=f"{logs['l_img1']:.3f}", d=f"{logs['d_adv']:.2f}", acc=f"{logs['acc_real']:.2f}")
            if cfg.grid_every and self.step % cfg.grid_every == 0 and self.ctx.is_main:
                self.write_grid()
            if self.step % cfg.checkpoint_every == 0 or self.step == total:
                self.save(last)
        bar.close()
        sums = gather_objects(parameter_checksum(self.net), self.ctx)
        if log is not None:
            log.write(step=self.step, event="end", ranks=self.ctx.world_size, parameter_checksums=sums,
                      ranks_in_sync=len(set(sums)) == 1, unreadable=self.unreadable.paths)
            log.close()
            plot_metrics(out / "metrics.jsonl", out / "metrics.png",
                         ["l_img1", "l_img2", "l_code", "l_id_cross", "l_id_self", "l_adv", "d_adv", "l_prim",
                          "l_fine", "acc_real"], title=f"train-dgnet {cfg.data}")
            self.write_grid()
        shutdown(self.ctx)
        return last

    def save(self, path: Path) -> None:
        states = gather_objects(rng_state(), self.ctx)  # every rank's, for an exact resume
        if not self.ctx.is_main:
            return
        payload = {
            "model_config": config_to_dict(self.cfg.model), "train_config": config_to_dict(self.cfg),
            "label_map": self.label_map.to_list(), "model": self.net.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers], "step": self.step, "rng": states,
        }
        save_checkpoint(path, "dgnet", payload)
        if self.cfg.keep_checkpoints:
            save_checkpoint(path.with_name(f"step_{self.step:07d}.pt"), "dgnet", payload)

    def write_grid(self) -> None:
        """Rows: a, b, G(a_a, s_a), G(a_pos, s_a), G(a_a, s_b), G(a_b, s_a)."""
        if not getattr(self, "_last_images", None):
            return
        rows = [list(t) for t in self._last_images]
        grid_dir = self.out / "grids"
        grid_dir.mkdir(parents=True, exist_ok=True)
        image_grid(rows).save(grid_dir / f"step_{self.step:07d}.png")


def train_dgnet(cfg: DGNetTrainConfig | None, out: str | Path, resume: str | Path | None = None,
                progress: bool = True) -> Path:
    return DGNetTrainer(cfg or DGNetTrainConfig(), out, resume, progress).run()
