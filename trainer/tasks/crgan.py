"""CR-GAN training: render labelled source persons into the contexts of unlabelled target images.

    I.  D_id = a baseline re-id model trained on the source (``--id-model``, frozen here);
        D_cam = a five-layer CNN pre-trained here on the target's camera labels.
    II. Alternate D_d (LSGAN: target images real, renderings fake) and G with
        λ_adv·L_adv + λ_id·L_id + λ_cam·L_cam + λ_con·L_con   (2, 1, 1, 5)
        L_con (``con_loss``): ``mean_square`` = mean((X_G − X_S)² ∘ M_F) + mean((X_G − X_T)² ∘ M_B)
        over all pixels; ``l2`` = the paper's Eq. 6 literally, ‖(X_G − X_S) ∘ M_F‖₂ + ‖(X_G − X_T) ∘ M_B‖₂
        per image (mean over the batch); ``rms`` = those norms divided by √(C·H·W), the root mean
        square, in the value range of the other losses. M_F/M_B: the source person's foreground/
        background masks, soft or (``binary_masks``, the paper's binary parsing masks) thresholded
        at 0.5, the target's mask M_T likewise. Adam, lr constant for the first half then linear to 0; G is
        updated twice per iteration in the second half.

Run folder (`trainer.loop`): config.json, metrics.jsonl, metrics.png, checkpoints/, grids/ (rows:
source, target, masked target, context mask, rendering) and masks/ (the mask caches).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from generator_service.models.crgan_nets import (
    CRGAN_PRESETS,
    CameraClassifier,
    ContextGenerator,
    CRGANConfig,
    DomainDiscriminator,
    mask_person,
)
from generator_service.models.dgnet_nets import lsgan_d_loss, lsgan_g_loss
from generator_service.models.masks import ensure_masks, mask_provider_for
from generator_service.models.reid import ReidNet
from reidgen.core.checkpoint import Checkpoint, lineage_entry
from reidgen.core.config import config_from_dict, config_to_dict, from_preset
from reidgen.core.errors import ReidgenError
from reidgen.core.images import normalize
from reidgen.core.market import LabelMap, scan_split
from trainer.feeds.data import MaskedImageDataset, endless_batches, epoch_loader
from trainer.feeds.samplers import RandomBatchSampler
from trainer.loop import Plot, Task, TrainLoop, host_values
from trainer.schedule import constant_then_linear_factor


@dataclass
class CRGANTrainConfig:
    source: str = ""
    target: str = ""
    id_model: str = ""
    model: CRGANConfig = field(default_factory=lambda: CRGAN_PRESETS["small"])
    masks: str = "pose"               # mask provider: pose | selfie | geometric
    mask_model: str = ""              # .tflite path (default: $REIDGEN_MASK_MODEL or ../shared/models)
    mask_cache: str = ""              # default: RUN/masks
    iterations: int = 2000
    batch_size: int = 8
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lambda_adv: float = 2.0
    lambda_id: float = 1.0
    lambda_cam: float = 1.0
    lambda_con: float = 5.0
    # l2 (paper Eq. 6, literal) | mean_square (before issue 14) | rms (l2 / sqrt(C·H·W))
    con_loss: str = "l2"
    binary_masks: bool = False        # threshold the person masks at 0.5 (the paper's binary masks)
    cam_epochs: int = 3               # D_cam pre-training on the target's camera labels
    cam_lr: float = 1e-3
    seed: int = 0
    workers: int = max(0, min(4, (os.cpu_count() or 1) - 1))
    device: str = "auto"
    amp: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: bool = False
    grid_every: int = 250
    max_steps: int = 0


CRGAN_TRAIN_PRESETS = {
    "paper": CRGANTrainConfig(model=CRGAN_PRESETS["paper"], batch_size=32, iterations=20_000),
    "small": CRGANTrainConfig(model=CRGAN_PRESETS["small"], batch_size=8, iterations=2000),
}


def crgan_preset_config(name: str, **overrides) -> CRGANTrainConfig:
    """A named preset with fields overridden (model fields such as ``dual_condition`` included)."""
    return from_preset(CRGAN_TRAIN_PRESETS, name, **overrides)


CON_LOSSES = ("mean_square", "l2", "rms")


def context_loss(rendered: torch.Tensor, source: torch.Tensor, target: torch.Tensor, source_mask: torch.Tensor,
                 form: str = "mean_square") -> torch.Tensor:
    """L_con: keep the source on its person (M_F = source_mask), take the target off it (M_B = 1 − M_F).

    ``mean_square``: mean of the masked squared errors over all pixels of the batch (each term is
    scaled by its region's share of the image). ``l2``: the paper's Eq. 6, the Euclidean norm of
    each masked difference image, summed over the two terms and averaged over the batch (its
    gradient keeps its size as the error shrinks; its value grows with √(C·H·W)). ``rms``: ``l2``
    divided by √(C·H·W), the same direction in the value range of the other losses.
    """
    if form not in CON_LOSSES:
        raise ReidgenError(f"con_loss {form!r}: choose one of {', '.join(CON_LOSSES)}")
    rendered, source, target, fg = rendered.float(), source.float(), target.float(), source_mask.float()
    if form == "mean_square":
        return ((rendered - source) ** 2 * fg).mean() + ((rendered - target) ** 2 * (1 - fg)).mean()

    def norm(diff: torch.Tensor) -> torch.Tensor:  # eps: a finite gradient where the error is 0
        return (diff.flatten(1).square().sum(1) + 1e-8).sqrt()

    per_image = norm((rendered - source) * fg) + norm((rendered - target) * (1 - fg))
    if form == "rms":
        per_image = per_image / rendered[0].numel() ** 0.5
    return per_image.mean()


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """A soft person mask thresholded at 0.5 (1 = person)."""
    return (mask >= 0.5).to(mask.dtype)


def load_id_model(path: str, label_map: LabelMap, device: torch.device) -> ReidNet:
    """D_id: the source re-id model, frozen, with the source's class order."""
    ckpt = Checkpoint.read(path, "reid")
    LabelMap(ckpt.label_map).require_same(label_map, f"identity model {path} vs the source data")
    net, _ = ReidNet.from_checkpoint(ckpt)
    return net.to(device).eval().requires_grad_(False)


class CRGANTrainer(Task):
    """The networks, optimisers and data of one run, a task on `trainer.loop`; `run()` trains to the end."""

    kind = "crgan"

    def __init__(self, cfg: CRGANTrainConfig | None, out: str | Path, resume: str | Path | None = None,
                 progress: bool = True):
        self.loop = loop = TrainLoop("crgan", out, resume, progress)
        ckpt = loop.resumed
        if ckpt is not None:
            # a run from before --con-loss trained with the mean of squares: it resumes with it
            cfg = config_from_dict(CRGANTrainConfig, {"con_loss": "mean_square", **ckpt.train_config})
        assert cfg is not None
        if not cfg.id_model:
            raise ReidgenError("--id-model is required: a baseline re-id model trained on the source (train-reid)")
        if cfg.con_loss not in CON_LOSSES:
            raise ReidgenError(f"--con-loss {cfg.con_loss!r}: choose one of {', '.join(CON_LOSSES)}")
        self.cfg, self.out = cfg, Path(out)
        self.device = loop.pick_device(cfg.device, cfg.amp)
        size = cfg.model.image_size

        self.source_items = scan_split(cfg.source, "train")
        self.target_items = scan_split(cfg.target, "train")
        self.label_map = LabelMap.from_items(self.source_items)
        self.cameras = sorted({it.camid for it in self.target_items})
        self.d_id = load_id_model(cfg.id_model, self.label_map, self.device)
        self.lineage = {"id_model": lineage_entry(cfg.id_model)}

        provider, _ = mask_provider_for(cfg)
        mask_root = Path(cfg.mask_cache) if cfg.mask_cache else self.out / "masks"
        datasets = []
        for name, items in (("source", self.source_items), ("target", self.target_items)):
            with loop.main_first():  # rank 0 fills the mask cache, the other ranks read it
                cache, done = ensure_masks(provider, items, mask_root / name, progress=loop.progress)
            kept = set(done)
            items = [it for it in items if it.path in kept]  # unreadable images were reported and left out
            labels = [self.label_map.index(it.pid) if name == "source" else -1 for it in items]
            cams = [self.cameras.index(it.camid) if name == "target" else -1 for it in items]
            datasets.append(MaskedImageDataset(items, cache, size, labels, cams))
        self.source, self.target = datasets

        torch.manual_seed(cfg.seed)
        self.gen = ContextGenerator(cfg.model).to(self.device)
        self.dis = DomainDiscriminator(cfg.model).to(self.device)
        self.d_cam = CameraClassifier(len(self.cameras), cfg.model).to(self.device)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.opt_d = torch.optim.Adam(self.dis.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.models = {"gen": self.gen, "dis": self.dis, "d_cam": self.d_cam}
        self.optimizers = {"g": self.opt_g, "d": self.opt_d}
        self.step = 0
        loop.restore(self)
        self.cam_trained = ckpt is not None
        seed = loop.rank_seed(cfg.seed)
        self.samplers = [RandomBatchSampler(len(self.source), cfg.batch_size, seed),
                         RandomBatchSampler(len(self.target), cfg.batch_size, seed + 1)]

    # -- D_cam pre-training ----------------------------------------------------------------------
    def pretrain_camera_classifier(self) -> None:
        """Every rank the same batches (one seed), gradients averaged: the ranks end with one D_cam."""
        cfg = self.cfg
        opt = torch.optim.Adam(self.d_cam.parameters(), lr=cfg.cam_lr)
        sampler = RandomBatchSampler(len(self.target), 32 if len(self.target) >= 32 else len(self.target), cfg.seed + 7)
        self.d_cam.train()
        for epoch in range(cfg.cam_epochs):
            sampler.set_epoch(epoch)
            correct = seen = 0
            batches = tqdm(epoch_loader(self.target, sampler, cfg.workers, self.device), total=len(sampler),
                           desc=f"D_cam epoch {epoch + 1}/{cfg.cam_epochs}", disable=not self.loop.progress,
                           leave=False)
            for images, _, _, cams, ok in batches:
                images, cams = images[ok].to(self.device), cams[ok].to(self.device)
                with self.loop.autocast():
                    logits = self.d_cam(images)
                loss = F.cross_entropy(logits.float(), cams)
                self.loop.update(loss, opt)
                correct += (logits.argmax(1) == cams).sum().item()
                seen += len(cams)
            self.loop.write(step=0, event="d_cam", epoch=epoch, cam_loss=loss.item(), cam_acc=correct / max(1, seen))
        self.cam_trained = True

    # -- one iteration -------------------------------------------------------------------------
    def train_step(self, batch) -> dict[str, float]:
        cfg = self.cfg
        source_batch, target_batch = batch
        xs, ms, ys, _, ok_s = source_batch
        xt, mt, _, ct, ok_t = target_batch
        n = int(min(ok_s.sum(), ok_t.sum()))
        if n < 1:
            return {}
        dev = self.device
        xs, ms, ys = xs[ok_s][:n].to(dev), ms[ok_s][:n].to(dev), ys[ok_s][:n].to(dev)
        xt, mt, ct = xt[ok_t][:n].to(dev), mt[ok_t][:n].to(dev), ct[ok_t][:n].to(dev)
        if cfg.binary_masks:
            ms, mt = binarize(ms), binarize(mt)
        xt_masked = mask_person(xt, mt)

        with self.loop.autocast():
            with torch.no_grad():
                fake = self.gen(xs, xt_masked if cfg.model.dual_condition else None)[0]
            d_loss = lsgan_d_loss([self.dis(xt)], [self.dis(fake)])
        self.loop.update(d_loss, self.opt_d)

        # G twice per iteration in the second half, to keep up with D (paper).
        g_updates = 2 if self.step >= cfg.iterations / 2 else 1
        self.dis.requires_grad_(False)
        for _ in range(g_updates):
            with self.loop.autocast():
                xg, _, context_mask = self.gen(xs, xt_masked if cfg.model.dual_condition else None)
                l_adv = lsgan_g_loss([self.dis(xg)])
                l_cam = F.cross_entropy(self.d_cam(xg).float(), ct)
                l_id = F.cross_entropy(self.d_id(xg)[0].float(), ys)
                l_con = context_loss(xg, xs, xt, ms, cfg.con_loss)
                total = (cfg.lambda_adv * l_adv + cfg.lambda_id * l_id + cfg.lambda_cam * l_cam
                         + cfg.lambda_con * l_con)
            self.loop.update(total, self.opt_g)
        self.dis.requires_grad_(True)
        self._last = (xs[:6], xt[:6], xt_masked[:6], context_mask[:6].detach(), xg[:6].detach())
        return {**host_values(dict(d_loss=d_loss, total=total, l_adv=l_adv, l_cam=l_cam, l_id=l_id, l_con=l_con,
                                   context_mask_mean=context_mask.mean())), "g_updates": g_updates}

    # -- the loop's hooks ------------------------------------------------------------------------
    def run(self) -> Path:
        return self.loop.run(self)

    def before_training(self) -> None:
        if not self.cam_trained:
            self.pretrain_camera_classifier()
        self.d_cam.eval().requires_grad_(False)  # a fixed judge of camera style from here on
        self.gen.train()
        self.dis.train()

    def total_steps(self) -> int:
        cfg = self.cfg
        return min(cfg.iterations, cfg.max_steps) if cfg.max_steps else cfg.iterations

    def batches(self):
        datasets = (self.source, self.target)
        return endless_batches(lambda sampler: epoch_loader(datasets[self.samplers.index(sampler)], sampler,
                                                            self.cfg.workers, self.device),
                               self.samplers, self.step)

    def lr_factor(self) -> float:
        return constant_then_linear_factor(self.step, self.cfg.iterations)

    def postfix(self, logs: dict) -> dict:
        return {"con": f"{logs['l_con']:.3f}", "id": f"{logs['l_id']:.2f}", "d": f"{logs['d_loss']:.2f}"}

    def plots(self) -> list[Plot]:
        cfg = self.cfg
        return [Plot("metrics.png", ("l_con", "l_id", "l_cam", "l_adv", "d_loss", "context_mask_mean"),
                     f"train-crgan {cfg.source} → {cfg.target}")]

    def checkpoint_fields(self) -> dict:
        return {"model_config": config_to_dict(self.cfg.model), "train_config": config_to_dict(self.cfg),
                "label_map": self.label_map.to_list(), "cameras": self.cameras, "lineage": self.lineage}

    def grid_rows(self) -> list[list[torch.Tensor]] | None:
        """Rows: source, target, masked target, context mask (as a grey picture), rendering."""
        if not getattr(self, "_last", None):
            return None
        xs, xt, xtm, cmask, xg = self._last
        return [list(xs), list(xt), list(xtm), list(normalize(cmask)), list(xg)]


def train_crgan(cfg: CRGANTrainConfig | None, out: str | Path, resume: str | Path | None = None,
                progress: bool = True) -> Path:
    return CRGANTrainer(cfg, out, resume, progress).run()
