"""Data parallelism for several GPUs (or CPU processes) under ``torchrun``, for every trainer
(`trainer.loop`).

DG-Net runs E_a and D several times per iteration, on real and generated images, and the
GANs step several optimisers per iteration, which DistributedDataParallel's
one-forward-one-backward hooks do not fit. Instead every rank
computes its gradients and they are averaged with one flat all-reduce per optimiser step:
the same arithmetic as DDP, and a single code path with or without torchrun.

Several machines (``torchrun --nnodes N``, docs/scaling/training.md): ranks are global (``RANK``:
batches, who writes the run folder), devices local (``LOCAL_RANK``: the GPU). Rank 0 writes the
run folder. With the c10d rendezvous the machine that runs rank 0 is chosen by the rendezvous
(``--node-rank`` is ignored), so a machine whose ``--out`` is not rank 0's folder (a local disk)
keeps its own copy of the checkpoints (`sees_main_folder`): every machine can resume.
"""
from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from reidgen.core.settings import TorchrunSettings


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def node_leader(self) -> bool:
        """The first process of its machine (several machines: ``torchrun --nnodes``)."""
        return self.local_rank == 0


def init_distributed() -> DistContext:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    launch = TorchrunSettings.from_env()  # WORLD_SIZE and LOCAL_RANK, set by torchrun
    world = launch.world_size
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = launch.local_rank
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return DistContext(dist.get_rank(), world, local)


def device_for(ctx: DistContext, requested: str) -> str:
    """With several CUDA ranks, each takes the GPU of its local rank."""
    if ctx.enabled and torch.cuda.is_available() and requested in ("auto", "cuda"):
        return f"cuda:{ctx.local_rank}"
    return requested


def broadcast_parameters(module: torch.nn.Module, ctx: DistContext) -> None:
    """Start every rank from rank 0's weights and buffers."""
    if ctx.enabled:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def broadcast_buffers(modules, ctx: DistContext) -> None:
    """Give every rank rank 0's buffers (batch-norm running statistics, which each rank updates
    from its own batches), as DDP does: then every rank holds the same weights, and a machine's own
    copy of a checkpoint equals rank 0's. Rank 0's buffers are left as they are."""
    if ctx.enabled:
        for module in modules:
            for t in module.buffers():
                dist.broadcast(t.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


@contextlib.contextmanager
def main_first(ctx: DistContext):
    """Rank 0 runs the block first (it writes, e.g. a mask cache); the other ranks run it after (they read)."""
    if ctx.enabled and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.is_main:
        dist.barrier()


def sees_main_folder(folder: Path, ctx: DistContext) -> bool:
    """Whether this rank's ``folder`` is rank 0's (one folder on storage every machine shares) or
    a folder of the same name on a disk of its own machine. Every rank must call it, after rank 0
    has made the folder: rank 0 puts a marker of a random name in it while the others look for it
    (a name never looked up before, so no machine answers from a cached "not found")."""
    if not ctx.enabled:
        return True
    marker = folder / f".rank0-{gather_objects(uuid.uuid4().hex, ctx)[0]}"
    if ctx.is_main:
        marker.touch()
    dist.barrier()
    seen = marker.is_file()
    dist.barrier()
    if ctx.is_main:
        marker.unlink()
    return seen


def gather_objects(obj, ctx: DistContext) -> list:
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def parameter_checksum(module: torch.nn.Module) -> float:
    """A cheap fingerprint to check that the ranks hold the same weights (parameters and buffers)."""
    with torch.no_grad():
        return float(sum(t.double().sum() for t in [*module.parameters(), *module.buffers()]))


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
