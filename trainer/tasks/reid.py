"""Baseline re-id training: cross-entropy on identities (the DG-Net teacher, CR-GAN's D_id).

Run folder::

    RUN/config.json          the full configuration
    RUN/metrics.jsonl        a line per step (loss, acc, lr) and per epoch
    RUN/metrics.png          loss / accuracy curves
    RUN/checkpoints/last.pt  model, optimiser, step, RNG states, label map (resumes exactly)
    RUN/eval.json            query/gallery evaluation after training (if the data has it; the CLI)

A task on `trainer.loop`, which owns the run folder, checkpoints and torchrun; the feeds
(shards, online generator, online render) are its data sources.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.nn import functional as F
from torchvision.transforms import RandomErasing
from tqdm import tqdm

from generator_service.models.reid import ClassifierHead, ReidModelConfig, ReidNet
from reidgen.core.checkpoint import Checkpoint, lineage_entry
from reidgen.core.config import config_from_dict, config_to_dict, from_preset
from reidgen.core.errors import ReidgenError
from reidgen.core.images import UnreadableImages
from reidgen.core.market import LabelMap, scan_split
from trainer.feeds.data import ImageDataset, endless_batches, epoch_loader
from trainer.feeds.online_render import RenderFeed
from trainer.feeds.samplers import PKBatchSampler, RandomBatchSampler
from trainer.feeds.synthetic import OnlineFeed, ShardFeed, synthetic_losses
from trainer.feeds.transforms import train_transform
from trainer.loop import Plot, Task, TrainLoop
from trainer.schedule import warmup_step_factor


@dataclass
class ReidTrainConfig:
    data: str = ""
    model: ReidModelConfig = field(default_factory=ReidModelConfig)
    pretrained: str = "imagenet"
    sampler: str = "random"  # "random" batches, or "pk": P identities × K images
    batch_size: int = 32
    p: int = 8
    k: int = 4
    epochs: int = 12
    lr: float = 0.05  # heads; the backbone gets lr × backbone_lr_mult
    backbone_lr_mult: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    warmup_factor: float = 0.1
    milestones: tuple[float, ...] = (8.0,)
    gamma: float = 0.1
    erasing_p: float = 0.5
    pad: int = 10
    seed: int = 0
    workers: int = max(0, min(8, (os.cpu_count() or 1) - 1))
    checkpoint_every: int = 0  # steps; 0 = at the end of each epoch only
    keep_checkpoints: bool = False  # also keep step_XXXXXXX.pt snapshots
    max_steps: int = 0  # stop early after this many steps (0 = all epochs)
    device: str = "auto"
    amp: bool = True
    strict_images: bool = False
    evaluate: bool = True
    eval_data: str = ""  # query/gallery to evaluate on (default: the target with --online-render, else data)
    init: str = ""  # start from this re-id checkpoint's weights (fine-tuning; same identities)
    online_render: str = ""  # CR-GAN checkpoint: train on sources rendered into target contexts
    target: str = ""  # target data set for --online-render
    # Real plus synthetic images (DG-Net's discriminative losses on generated images):
    shards: tuple[str, ...] = ()  # job folders of reidgen generate (offline)
    online_generator: str = ""  # or a DG-Net checkpoint generating the same samples on the fly
    synthetic_ratio: float = 1.0  # synthetic images per real image in each batch
    prim_weight: float = 2.0  # λ_prim on KL(teacher soft label ‖ primary head)
    fine_weight: float = 0.4  # λ_fine on CE(fine-grained head, structure identity); paper: 0.2·λ_prim


# Named presets: the paper's configuration and CPU-sized ones. CLI flags override fields.
REID_PRESETS: dict[str, ReidTrainConfig] = {
    "paper": ReidTrainConfig(model=ReidModelConfig("resnet50", 1, "avg", 512, 0.5, (256, 128)),
                             pretrained="imagenet", epochs=60, milestones=(40.0,), batch_size=32),
    "small": ReidTrainConfig(model=ReidModelConfig("efficientnet_lite0", 1, "avg", 512, 0.5, (128, 64)),
                             pretrained="imagenet", epochs=12, milestones=(8.0,), batch_size=32),
    "tiny": ReidTrainConfig(model=ReidModelConfig("small_cnn", 1, "avg", 128, 0.5, (128, 64)),
                            pretrained="none", epochs=2, milestones=(), batch_size=16),
}


def preset_config(name: str, **overrides) -> ReidTrainConfig:
    """A named preset with fields overridden (model fields such as ``backbone`` included)."""
    return from_preset(REID_PRESETS, name, **overrides)


def build_optimizer(model: ReidNet, cfg: ReidTrainConfig, extra_heads: list[torch.nn.Module] = ()) -> torch.optim.SGD:
    groups = [
        {"params": list(model.backbone_parameters()), "lr": cfg.lr * cfg.backbone_lr_mult},
        {"params": list(model.head_parameters()) + [p for h in extra_heads for p in h.parameters()], "lr": cfg.lr},
    ]
    for g in groups:
        g["initial_lr"] = g["lr"]
    return torch.optim.SGD(groups, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


class ReidTask(Task):
    """Cross-entropy on identities, on real images alone or with a feed: images rendered into
    target contexts (``online_render``), or generated ones from shards or a DG-Net checkpoint."""

    kind = "reid"

    def __init__(self, cfg: ReidTrainConfig, loop: TrainLoop):
        ckpt = loop.resumed
        if ckpt is not None:
            cfg = config_from_dict(ReidTrainConfig, ckpt.train_config)
        items = scan_split(cfg.data, "train")
        label_map = LabelMap.from_items(items)
        if ckpt is not None:
            LabelMap(ckpt.label_map).require_same(label_map, f"resuming {ckpt.path} on {cfg.data}")
        self.loop, self.items, self.label_map = loop, items, label_map
        device = loop.pick_device(cfg.device, cfg.amp)
        torch.manual_seed(cfg.seed)
        if cfg.online_render and not cfg.target:
            raise ReidgenError("--online-render needs --target (the data set whose contexts are rendered)")
        init = Checkpoint.read(cfg.init, "reid") if cfg.init and ckpt is None else None
        self.lineage = {"init": lineage_entry(cfg.init)} if init is not None else (ckpt.lineage if ckpt else {})
        if init is not None:
            LabelMap(init.label_map).require_same(label_map, f"--init {cfg.init} vs {cfg.data}")
            model, _ = ReidNet.from_checkpoint(init)
            cfg = replace(cfg, model=model.config)
        else:
            model = ReidNet(cfg.model, len(label_map), pretrained="none" if ckpt else cfg.pretrained)
        self.cfg = cfg
        # channels_last: measured 1.4× faster steps on CPU for EfficientNet-Lite0, and the layout AMP wants on GPU.
        self.model = model.to(device, memory_format=torch.channels_last)
        synthetic = bool(cfg.shards or cfg.online_generator)
        if cfg.shards and cfg.online_generator:
            raise ReidgenError("give --shards or --online-generator, not both")
        if synthetic and cfg.online_render:
            raise ReidgenError("--shards/--online-generator (DG-Net samples) and --online-render (CR-GAN) do not mix")
        # DG-Net's fine-grained head: trained on generated images only (L_fine), not used at test time.
        self.fine_head = ClassifierHead(model.backbone.out_channels, len(label_map), cfg.model.bottleneck,
                                        0.75).to(device) if synthetic else None
        self.optimizer = build_optimizer(self.model, cfg, [self.fine_head] if self.fine_head is not None else [])
        self.models = {"model": self.model, **({"fine_head": self.fine_head} if synthetic else {})}
        self.optimizers = {"model": self.optimizer}
        loop.restore(self)

        self.dataset = ImageDataset(items, train_transform(cfg.model.image_size, pad=cfg.pad,
                                                           erasing_p=0 if cfg.online_render else cfg.erasing_p),
                                    label_map, cfg.model.image_size)
        seed = loop.rank_seed(cfg.seed)
        if cfg.sampler == "pk":
            self.sampler = PKBatchSampler([it.pid for it in items], cfg.p, cfg.k, seed=seed)
        elif cfg.sampler == "random":
            self.sampler = RandomBatchSampler(len(items), cfg.batch_size, seed=seed)
        else:
            raise ReidgenError(f"unknown sampler {cfg.sampler!r}; expected random or pk")
        self.steps_per_epoch = len(self.sampler)
        self.unreadable = UnreadableImages(strict=cfg.strict_images)
        batch = cfg.p * cfg.k if cfg.sampler == "pk" else cfg.batch_size
        # Cross-domain fine-tuning: sources rendered into target contexts; random erasing comes after
        # the rendering, not before.
        self.render = self.erase_after = None
        if cfg.online_render:
            with loop.main_first():  # rank 0 fills the target's mask cache, the others read it
                self.render = RenderFeed(cfg.online_render, cfg.target, device, batch, seed, cfg.workers,
                                         self.step, loop.out / "masks" / "target", progress=loop.progress)
            self.erase_after = RandomErasing(p=cfg.erasing_p, value=0) if cfg.erasing_p > 0 else None
        self.feed = None
        if synthetic:
            n_syn = max(1, round(batch * cfg.synthetic_ratio))
            if cfg.shards:
                self.feed = ShardFeed(cfg.shards, train_transform(cfg.model.image_size, pad=cfg.pad,
                                                                  erasing_p=cfg.erasing_p),
                                      label_map, cfg.model.image_size, n_syn, seed, cfg.workers, device, self.step,
                                      strict=cfg.strict_images)
            else:
                self.feed = OnlineFeed(cfg.online_generator, cfg.data, label_map, device, n_syn)
        self.model.train()
        if self.fine_head is not None:
            self.fine_head.train()

    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.cfg.epochs
        return min(total, self.cfg.max_steps) if self.cfg.max_steps else total

    def batches(self):
        """Real batches, each with its synthetic batch when it comes from shards (reading shards is
        waiting for data; generating online is compute, done in the step)."""
        device = self.loop.device
        stream = endless_batches(lambda s: epoch_loader(self.dataset, s, self.cfg.workers, device),
                                 [self.sampler], self.step)
        for (real,) in stream:
            yield real, (self.feed(None, None) if isinstance(self.feed, ShardFeed) else None)

    def lr_factor(self) -> float:
        cfg = self.cfg
        return warmup_step_factor(self.step / self.steps_per_epoch, warmup=cfg.warmup_epochs,
                                  warmup_factor=cfg.warmup_factor, milestones=cfg.milestones, gamma=cfg.gamma)

    def train_step(self, batch) -> dict[str, float]:
        (images, labels, indices, ok), shard_batch = batch
        cfg, device, model = self.cfg, self.loop.device, self.model
        keep = self.unreadable.check(ok, indices, self.items)
        images, labels = images[keep].to(device, non_blocking=True), labels[keep].to(device)
        if self.render is not None:
            images = self.render(images)
            if self.erase_after is not None:
                images = torch.stack([self.erase_after(img) for img in images])
        extra = {}
        if self.feed is not None:
            syn_images, soft, fine_labels = shard_batch if shard_batch is not None else self.feed(images, labels)
            n_real = len(images)
            images = torch.cat([images, syn_images.to(images.dtype)])
            images = images.contiguous(memory_format=torch.channels_last)
            with self.loop.autocast():
                pooled = model.pooled(images)
                logits_all, _ = model.head(pooled)
                logits_fine, _ = self.fine_head(pooled[n_real:])
                logits = logits_all[:n_real]
                l_id = F.cross_entropy(logits.float(), labels)
                l_prim, l_fine = synthetic_losses(logits_all[n_real:], logits_fine, soft, fine_labels)
                loss = l_id + cfg.prim_weight * l_prim + cfg.fine_weight * l_fine
            extra = {"loss_id": l_id.item(), "loss_prim": l_prim.item(), "loss_fine": l_fine.item(),
                     "synthetic": len(syn_images)}
        else:
            images = images.contiguous(memory_format=torch.channels_last)
            with self.loop.autocast():
                logits, _ = model(images)
                loss = F.cross_entropy(logits.float(), labels)
        self.loop.update(loss, self.optimizer)
        acc = (logits.argmax(1) == labels).float().mean().item()
        return {"epoch": self.step // self.steps_per_epoch, "loss": loss.item(), "acc": acc,
                "lr": self.optimizer.param_groups[1]["lr"], **extra}

    def postfix(self, logs: dict) -> dict:
        return {"epoch": logs["epoch"], "loss": f"{logs['loss']:.3f}", "acc": f"{logs['acc']:.2f}"}

    def checkpoint_due(self, total: int) -> bool:
        # cfg.checkpoint_every = 0: at the end of each epoch only
        return super().checkpoint_due(total) or self.step % self.steps_per_epoch == 0

    def plot_due(self, total: int) -> bool:
        return self.step % self.steps_per_epoch == 0 and self.step != total  # the loop draws the last

    def plots(self) -> list[Plot]:
        return [Plot("metrics.png", ("loss", "acc", "lr"), f"train-reid {self.cfg.data}")]

    def checkpoint_fields(self) -> dict:
        return {"model_config": config_to_dict(self.cfg.model), "train_config": config_to_dict(self.cfg),
                "label_map": self.label_map.to_list(), "lineage": self.lineage}

    def after_training(self) -> dict:
        feed = self.feed
        if feed is not None and feed.bad:
            self.loop.write(step=self.step, event="corrupt_synthetic", records=feed.bad[:100], count=len(feed.bad))
            if self.loop.is_main:
                tqdm.write(f"warning: skipped {len(feed.bad)} corrupt synthetic record(s), first: {feed.bad[0]}")
        if self.unreadable.summary():
            self.loop.write(step=self.step, event="unreadable", paths=self.unreadable.paths)
            if self.loop.is_main:
                tqdm.write(f"warning: {self.unreadable.summary()}")
        return {}


def train_reid(cfg: ReidTrainConfig | None, out: str | Path, resume: str | Path | None = None,
               progress: bool = True) -> Path:
    """Train (or resume) a baseline re-id model; returns the path of the last checkpoint. Under
    torchrun every rank trains on its own batches with averaged gradients; rank 0 writes."""
    loop = TrainLoop("reid", out, resume, progress)
    return loop.run(ReidTask(cfg or ReidTrainConfig(), loop))
