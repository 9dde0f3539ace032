"""One training loop for every trainer: a task supplies its networks, optimisers, data and one
iteration; the loop does the rest, the same way for all of them.

The loop owns:

- the run folder: ``config.json``, ``metrics.jsonl`` and its plots, ``checkpoints/``, ``grids/``;
- checkpoints in one layout (below), saved atomically, and exact resume: weights, optimiser
  states, the step and every rank's RNG state, restored so that a resumed run repeats the
  uninterrupted one number for number;
- the progress bar, grids and quality records at their cadence, AMP (`autocast`);
- the GPU's fast path (`pick_device`, `prepare`): on CUDA, autocast in bf16 where the GPU has it,
  else fp16 with one `GradScaler` over every optimiser of the task (`update`; its state is in the
  checkpoint), channels_last for the convolutional networks, fused Adam and ``cudnn.benchmark``;
  on the CPU nothing of this changes a number (fp32, or bf16 autocast when the task asks for it);
- ``torchrun``: rank 0 alone writes (on several machines, each machine without shared storage
  keeps a copy of the checkpoints); every rank starts from rank 0's weights, draws its own batches
  (`rank_seed`) and averages gradients before each optimiser step (`update`, one flat all-reduce,
  `trainer.distributed`); at the end the ranks' parameter checksums are logged.

A task (`Task`) is a model set plus one iteration: ``train_step(batch)`` computes its losses,
calls ``loop.update(loss, optimizer, ...)`` for each optimiser step (a GAN has several per
iteration) and returns the numbers to log. Optional hooks: a grid's rows, cheap quality figures,
work before the first step (CR-GAN's D_cam) and records after the last.

Checkpoint layout (kind-independent)::

    models{name: state_dict}  optimizers{name: state_dict}  step  rng[rank]
    model_config  train_config  label_map  lineage{file: {path, sha256_16}}  ...task extras

The model that inference builds is ``models["model"]`` (CR-GAN: ``models["gen"]``);
`reidgen.core.checkpoint.Checkpoint` still reads the older layouts.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from reidgen.core.checkpoint import Checkpoint, load_state, run_checkpoint, save_checkpoint
from reidgen.core.config import config_to_dict
from reidgen.core.device import amp_dtype, autocast, pick_device
from reidgen.core.errors import ReidgenError
from reidgen.core.images import image_grid
from reidgen.core.rng import rng_state, set_rng_state
from trainer.distributed import (
    average_gradients,
    broadcast_buffers,
    broadcast_parameters,
    device_for,
    gather_objects,
    init_distributed,
    main_first,
    parameter_checksum,
    sees_main_folder,
    shutdown,
)
from trainer.runlog import RunLog, plot_metrics
from trainer.schedule import set_lr


def host_values(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors as Python floats, copied to the host at once: one device synchronisation
    per step instead of one per logged loss (each ``.item()`` waits for the GPU)."""
    if not tensors:
        return {}
    values = torch.stack([t.detach().reshape(()).float() for t in tensors.values()]).tolist()
    return dict(zip(tensors, values))


@dataclass(frozen=True)
class Plot:
    """A PNG of the run folder drawn from the log: these keys of the records of one event."""
    file: str
    keys: tuple[str, ...]
    title: str
    event: str = "step"


class Task:
    """What a trainer supplies. The loop reads ``cfg`` (``checkpoint_every``, ``keep_checkpoints``,
    ``amp`` and, where the task has them, ``grid_every`` and ``cpu_bf16``), ``models``,
    ``optimizers`` and ``step`` (the number of iterations done, which the loop advances)."""

    kind: str = ""                 # the checkpoint kind: reid, dgnet, crgan
    save_untrained: bool = False   # with keep_checkpoints, also save the state before the first step
    channels_last_on_cpu: bool = False  # its networks run faster in channels_last on the CPU too (measured)
    cfg: object
    loop: "TrainLoop"
    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    step: int = 0

    def total_steps(self) -> int:
        raise NotImplementedError

    def batches(self) -> Iterator:
        """Endless batches from ``self.step`` on (a resumed run continues the same stream)."""
        raise NotImplementedError

    def train_step(self, batch) -> dict[str, float]:
        """One iteration; the numbers to log (empty: nothing to log, e.g. a batch of unreadable images)."""
        raise NotImplementedError

    def lr_factor(self) -> float | None:
        """The learning-rate factor for the coming step (None: leave the optimisers' rates alone)."""
        return None

    def layout_modules(self) -> list[torch.nn.Module]:
        """The networks whose memory layout the loop sets: the trained models and the task's other
        module attributes (frozen feature networks)."""
        modules = list(self.models.values())
        return modules + [m for m in vars(self).values() if isinstance(m, torch.nn.Module) and m not in modules]

    def checkpoint_due(self, total: int) -> bool:
        every = self.cfg.checkpoint_every
        return bool(every and self.step % every == 0) or self.step == total

    def checkpoint_fields(self) -> dict:
        """model_config, train_config, label_map, lineage and any extra plain data of the kind."""
        raise NotImplementedError

    def postfix(self, logs: dict) -> dict:
        return {}

    def plots(self) -> list[Plot]:
        return []

    def plot_due(self, total: int) -> bool:
        """Redraw the plots now as well as at the end."""
        return False

    def grid_rows(self) -> list[list[torch.Tensor]] | None:
        return None

    def quality_due(self) -> bool:
        return False

    def quality(self) -> dict[str, float]:
        return {}

    def before_training(self) -> None:
        """Work after the run folder exists and before the first step (every run, resumed ones too)."""

    def after_training(self) -> dict:
        """Called on every rank after the last step; returns fields for the log's ``end`` record."""
        return {}


class TrainLoop:
    """The run of one task: ``TrainLoop(kind, out, resume)`` first (the task reads its configuration
    from ``resumed``), then the task builds itself, calls `restore`, and `run` trains to the end."""

    def __init__(self, kind: str, out: str | Path, resume: str | Path | None = None, progress: bool = True):
        self.ctx = init_distributed()
        self.kind, self.out = kind, Path(out)
        self.resumed: Checkpoint | None = Checkpoint.read(resume, kind) if resume else None
        self.progress = progress and self.ctx.is_main
        self.device = torch.device("cpu")
        self._amp = (False, False)
        self.precision = "auto"   # or "fp32", "bf16", "fp16": forced (bench/gpu_check.py compares them)
        self.scaler: torch.amp.GradScaler | None = None  # fp16 autocast on CUDA only
        self._log: RunLog | None = None
        self.node_copy = False  # this machine keeps its own copy of the checkpoints (`run`)

    # -- what tasks use -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def pick_device(self, requested: str, amp: bool, cpu_bf16: bool = False) -> torch.device:
        """The device of this rank (with several CUDA ranks, the GPU of its local rank), and AMP's setting."""
        self.device = pick_device(device_for(self.ctx, requested))
        self._amp = (amp, cpu_bf16)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN's fastest kernels, found once
        self.set_precision(self.precision)
        return self.device

    def set_precision(self, precision: str) -> None:
        """Force the autocast precision ("auto", "fp32", "bf16", "fp16"; see `amp_dtype`): fp16 on
        CUDA brings a `GradScaler`. Call it before the first step."""
        self.precision = precision
        dtype = amp_dtype(self.device, *self._amp, precision=precision)
        fp16 = dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The dtype of `autocast` (None: fp32)."""
        return amp_dtype(self.device, *self._amp, precision=self.precision)

    def autocast(self):
        return autocast(self.device, *self._amp, precision=self.precision)

    def rank_seed(self, seed: int) -> int:
        """A data stream's seed on this rank: every rank draws its own batches (rank 0: ``seed`` itself)."""
        return seed + 1000 * self.ctx.rank

    def main_first(self):
        """Rank 0 does the work in the block (e.g. writes a cache) before the other ranks do (read it)."""
        return main_first(self.ctx)

    def write(self, **record) -> None:
        """A record of the run log (rank 0; other ranks write nothing)."""
        if self._log is not None:
            self._log.write(**record)

    def update(self, loss: torch.Tensor, *optimizers: torch.optim.Optimizer) -> None:
        """One optimiser step of ``loss``: gradients of the optimisers' parameters, averaged over the ranks.

        With a `GradScaler` (fp16 on CUDA) the loss is scaled before the backward pass, every
        optimiser of the step is unscaled and stepped by the scaler (all skipped together when a
        gradient is not finite) and the scale is updated once, after the last of them."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        scaler = self.scaler
        if scaler is None:
            loss.float().backward()
        else:
            scaler.scale(loss.float()).backward()
        average_gradients([p for opt in optimizers for g in opt.param_groups for p in g["params"]], self.ctx)
        for opt in optimizers:
            if scaler is None:
                opt.step()
            elif any(p.grad is not None for g in opt.param_groups for p in g["params"]):
                scaler.step(opt)  # (an optimiser without gradients would make the scaler assert; its step is void)
        if scaler is not None:
            scaler.update()

    def prepare(self, task: Task) -> None:
        """The device's layout and optimiser settings, applied to a built (and restored) task; `run`
        calls it, and so may a caller that drives ``train_step`` itself. Idempotent.

        On CUDA: the convolutional networks (``task.layout_modules()``, a frozen teacher
        included) in channels_last, and Adam/AdamW fused. On the CPU: channels_last only for a task
        that was measured faster so (``channels_last_on_cpu``), and optimiser states resumed from a
        CUDA run are made plain again (unfused, steps on the CPU). Either way each state tensor
        gets its parameter's layout, so that a checkpoint resumes on the other device."""
        cuda = self.device.type == "cuda"
        if cuda or task.channels_last_on_cpu:
            for module in task.layout_modules():
                if any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
                    module.to(memory_format=torch.channels_last)
        for opt in task.optimizers.values():
            adam = isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
            for group in opt.param_groups:
                if adam:
                    if cuda and all(p.is_cuda and p.is_floating_point() for p in group["params"]) \
                            and not group.get("differentiable"):
                        group["fused"], group["foreach"] = True, None
                    elif not cuda and group.get("fused"):
                        group["fused"] = None
                for p in group["params"]:
                    _align_state(opt.state.get(p), p, fused=bool(adam and group.get("fused")))

    def restore(self, task: Task) -> None:
        """Weights, optimiser states and step of the resumed checkpoint (the RNG follows in `run`)."""
        ckpt = self.resumed
        for opt in task.optimizers.values():
            for g in opt.param_groups:
                g.setdefault("initial_lr", g["lr"])
        if ckpt is None:
            return
        saved = ckpt.models
        for name, module in task.models.items():
            if name not in saved:
                raise ReidgenError(f"checkpoint {ckpt.path} has no weights for {name!r} (it has "
                                   f"{', '.join(sorted(saved)) or 'none'}); it was saved by another configuration")
            load_state(module, saved[name], f"checkpoint {ckpt.path} ({name})")
        states = ckpt.optimizer_states(tuple(task.optimizers))
        for name, opt in task.optimizers.items():
            if name in states:
                opt.load_state_dict(states[name])
        task.step = int(ckpt["step"])
        scaler_state = ckpt.get("amp_scaler")
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)

    # -- the run ---------------------------------------------------------------------------------
    def run(self, task: Task) -> Path:
        cfg, out = task.cfg, self.out
        total = task.total_steps()
        last = run_checkpoint(out)
        self.prepare(task)
        for module in task.models.values():
            broadcast_parameters(module, self.ctx)
        if self.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
            self._log = RunLog(out / "metrics.jsonl", resume_step=task.step if self.resumed else None)
        # Several machines: the first process of a machine whose --out is not rank 0's folder (a
        # disk of its own, not shared storage) writes the checkpoints there too, so that every
        # machine holds the run's weights and can resume; the log, grids and plots stay rank 0's.
        self.node_copy = not sees_main_folder(out, self.ctx) and self.ctx.node_leader
        if self.node_copy:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        task.before_training()
        if getattr(cfg, "keep_checkpoints", False) and task.save_untrained and task.step == 0:
            self.save(task, last)  # the untrained state too: "before" for every later comparison
        batches = task.batches()
        if self.resumed is not None:
            states = self.resumed.rng_states
            if len(states) == self.ctx.world_size:  # else (another rank count) each rank goes on from its seed
                set_rng_state(states[self.ctx.rank])
        grid_every = getattr(cfg, "grid_every", 0)
        bar = tqdm(total=total, initial=task.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        while task.step < total:
            factor = task.lr_factor()
            if factor is not None:
                for opt in task.optimizers.values():
                    set_lr(opt, factor)
            started = time.perf_counter()
            batch = next(batches)
            data_wait = time.perf_counter() - started  # the share of a step spent waiting for data
            logs = task.train_step(batch)
            task.step += 1
            bar.update(1)
            if logs:
                if factor is not None:
                    logs.setdefault("lr_factor", factor)
                self.write(step=task.step, **logs, data_wait_s=round(data_wait, 6),
                           step_s=round(time.perf_counter() - started, 6))
                bar.set_postfix(**task.postfix(logs))
            if self.is_main and grid_every and task.step % grid_every == 0:
                self.write_grid(task)
            if self.is_main and task.quality_due():
                self.write(step=task.step, event="quality", **task.quality())
            if task.checkpoint_due(total):
                self.save(task, last)
            if self.is_main and task.plot_due(total):
                self.draw_plots(task)
        bar.close()
        end = task.after_training()
        sums = gather_objects(sum(parameter_checksum(m) for m in task.models.values()), self.ctx)
        hosts = gather_objects((socket.gethostname(), self.node_copy), self.ctx)
        if self._log is not None:
            # What autocast ran in: a preset's CPU bf16 default falls back to fp32 without native bf16.
            precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")
            self.write(step=task.step, event="end", precision=precision, ranks=self.ctx.world_size,
                       parameter_checksums=sums,
                       ranks_in_sync=len(set(sums)) == 1, hosts=[h for h, _ in hosts],
                       checkpoint_copies=[rank for rank, (_, copy) in enumerate(hosts) if copy], **end)
            self._log.close()
            self._log = None
            self.draw_plots(task)
            self.write_grid(task)
        shutdown(self.ctx)
        return last

    def save(self, task: Task, path: Path) -> None:
        """Every rank takes part (each one's RNG state is kept, for an exact resume); rank 0 writes,
        and the first process of each machine that does not share rank 0's folder (`run`)."""
        states = gather_objects(rng_state(), self.ctx)
        broadcast_buffers(task.models.values(), self.ctx)
        if not (self.is_main or self.node_copy):
            return
        payload = {**task.checkpoint_fields(),
                   "models": {name: m.state_dict() for name, m in task.models.items()},
                   "optimizers": {name: opt.state_dict() for name, opt in task.optimizers.items()},
                   "step": task.step, "rng": states}
        if self.scaler is not None:
            payload["amp_scaler"] = self.scaler.state_dict()
        payload.setdefault("lineage", {})
        save_checkpoint(path, task.kind, payload)
        if getattr(task.cfg, "keep_checkpoints", False):
            save_checkpoint(path.with_name(f"step_{task.step:07d}.pt"), task.kind, payload)

    def draw_plots(self, task: Task) -> None:
        for plot in task.plots():
            plot_metrics(self.out / "metrics.jsonl", self.out / plot.file, list(plot.keys), title=plot.title,
                         event=plot.event)

    def write_grid(self, task: Task) -> None:
        rows = task.grid_rows()
        if not rows:
            return
        grid_dir = self.out / "grids"
        grid_dir.mkdir(parents=True, exist_ok=True)
        image_grid(rows).save(grid_dir / f"step_{task.step:07d}.png")


def _align_state(state: dict | None, p: torch.Tensor, fused: bool) -> None:
    """An optimiser state on its parameter's device and in its layout: moments with the
    parameter's strides (fused kernels read memory flat), Adam's ``step`` on the device when fused,
    else a CPU tensor (as a freshly built optimiser has them)."""
    if not state:
        return
    for key, value in list(state.items()):
        if not isinstance(value, torch.Tensor):
            continue
        if key == "step":
            device = p.device if fused else torch.device("cpu")
            if value.device != device:
                state[key] = value.to(device=device, dtype=torch.float32)
        elif value.shape == p.shape and (value.device != p.device or value.stride() != p.stride()):
            state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
