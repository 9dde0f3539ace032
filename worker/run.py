"""Generating one shard: the single code path of `reidgen generate` (in-process) and the Celery
task (`worker.tasks`). Both call `generate_shard`; nothing else writes shards.

The shard is made in device batches through the inference engine, pipelined so the device does
not wait on I/O: loader threads decode and resize the next batches while the device runs the
current one, and a writer thread encodes (a small pool: PIL releases the GIL while it
compresses) and writes the previous one. On a CPU device there is nothing to overlap with: the
"device" is the same cores, and I/O threads waking up inside the model's OpenMP regions stall
them, so there the same steps run inline, in order (``overlap``). A source image that cannot be
read fails its own records (listed in the manifest), never the shard.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from api_schemas.jobs import JobManifest, JobSpec, ModelIdentity, RecordMeta, SoftLabel, SourceRef
from generator_service.inference.engine import Engine, ServedModel
from generator_service.inference.synthesis import Synthesizer
from generator_service.inference.synthesis import top_k as keep_top_k
from generator_service.models.teacher import Teacher
from reidgen.core.checkpoint import Checkpoint, file_identity, resolve_checkpoint
from reidgen.core.confined import Folder
from reidgen.core.errors import ReidgenError, about, public_error
from reidgen.core.images import UnreadableImage, decode_image, denormalize, encode_image
from reidgen.core.market import Item, LabelMap
from worker.plans import Located, Plan, locate, make_plan
from worker.shards import (
    ShardWriter,
    ensure_job_manifest,
    ensure_job_manifest_in,
    open_out,
    pack_record,
    read_shard_manifest,
    shard_done,
    writing_in,
)

log = logging.getLogger("reidgen.worker")
PREFETCH = 2  # batches decoded ahead of the device


class Cancelled(Exception):
    """The job was cancelled while this shard was being made (the partial shard is discarded)."""


@dataclass
class Runtime:
    """A loaded generator (through the engine) and teacher: made once per process."""

    synthesizer: Synthesizer
    label_map: LabelMap
    models: dict[str, ModelIdentity]

    @property
    def engine(self) -> Engine:
        return self.synthesizer.engine

    @property
    def model(self) -> ServedModel:
        return self.synthesizer.model

    @property
    def teacher(self) -> Teacher | None:
        return self.synthesizer.teacher


_RUNTIMES: dict[tuple, Runtime] = {}


def _checkpoint_public(spec: JobSpec) -> str:
    """The remote client's line for any failure to use the spec's checkpoint: it does not say whether
    the file exists or why it failed to load (that would let a client probe the server's files)."""
    want = "crgan" if spec.kind == "crgan_render" else "dgnet"
    return f"no readable reidgen {want} checkpoint named {spec.checkpoint!r} (a {spec.kind} job needs one)"


def load_runtime(spec: JobSpec, device: str = "auto", located: Located | None = None) -> Runtime:
    """The runtime for ``spec``'s checkpoint and teacher, cached per process (a worker loads its
    model once, on its first task, after the pool has forked). ``located``: where they are
    (`worker.plans.locate`; default: the spec's paths as given)."""
    located = located or locate(spec, ".")
    with about("checkpoint", "bad_checkpoint", _checkpoint_public(spec)):
        ckpt_path = resolve_checkpoint(located.checkpoint)
        if not ckpt_path.is_file():
            raise ReidgenError(f"checkpoint {located.checkpoint} not found")
        key = (str(ckpt_path.resolve()), file_identity(ckpt_path), str(located.teacher), spec.soft_labels, device)
        if key in _RUNTIMES:
            return _RUNTIMES[key]
        ckpt = Checkpoint.read(ckpt_path, ("dgnet", "crgan"))
        want = "crgan" if spec.kind == "crgan_render" else "dgnet"
        if ckpt.kind != want:
            raise ReidgenError(f"{spec.kind} needs a {want} checkpoint; {spec.checkpoint} holds a {ckpt.kind} "
                               f"model")
        label_map = LabelMap(ckpt.label_map)
        if spec.soft_labels and not located.teacher and not (ckpt.train_config.get("teacher")
                                                             or ckpt.train_config.get("id_model")):
            raise public_error(f"checkpoint: {spec.checkpoint} names no teacher; give the spec a teacher or set "
                               f"soft_labels false")
        engine = Engine.from_checkpoint(ckpt, device)
    model = next(iter(engine.models.values()))
    models = {"generator": ModelIdentity(checkpoint=str(spec.checkpoint), identity=model.identity)}
    teacher = None
    if spec.soft_labels:
        # The spec's teacher (where ``located`` found it), else the one the generator was trained
        # with: a path the checkpoint records (the operator's file, not a client's choice), checked
        # against the content it recorded.
        named = f"named {spec.teacher!r}" if spec.teacher else "that the checkpoint names"
        with about("teacher", "bad_teacher", f"no readable reidgen re-id checkpoint {named}"):
            teacher = (Teacher(located.teacher, label_map, engine.device) if located.teacher
                       else Teacher.recorded_in(ckpt, engine.device))
        models["teacher"] = ModelIdentity(checkpoint=str(spec.teacher or teacher.path), identity=teacher.identity)
    del ckpt  # the engine holds the weights now
    _RUNTIMES.clear()  # one model per process: a worker switching jobs frees the previous one
    _RUNTIMES[key] = Runtime(Synthesizer(engine, teacher), label_map, models)
    return _RUNTIMES[key]


@dataclass
class ShardResult:
    index: int
    status: str  # "done" | "skipped" (already complete) | "lost-race" (a duplicate finished first)
    records: int
    failed: int
    seconds: float


# -- the pieces of the pipeline ---------------------------------------------------------------------
def _source_ref(item: Item, root: Path, label_map: LabelMap) -> SourceRef:
    label = label_map.index(item.pid) if item.pid in label_map.pids else -1
    return SourceRef(path=str(Path(item.path).relative_to(root)), pid=item.pid, camera=item.camid,
                     domain=root.name, label=label)


@dataclass
class _Batch:
    indices: list[int]          # plan indices of the records that loaded
    appearance: torch.Tensor
    structure: torch.Tensor
    masks: torch.Tensor | None  # CR-GAN target person masks
    failures: list[tuple[int, str]]


class _ShardPairs:
    """The (source, structure) pairs of one shard's records, looked up by plan index."""

    def __init__(self, plan: Plan, records: range):
        self.first, self.array = records.start, plan.pairs_of(records)

    def __getitem__(self, index: int):
        return self.array[index - self.first]


def _load_batch(plan: Plan, pairs: _ShardPairs, model: ServedModel, indices: list[int]) -> _Batch:
    """Decode each distinct image of the batch once; a record whose image fails is left out."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None] | str] = {}
    render = plan.spec.kind == "crgan_render"

    def get(item: Item, is_target: bool):
        if item.path not in cache:
            try:
                picture = decode_image(item.path)
                mask = model.mask_tensor(model.person_mask(picture)) if is_target and render else None
                cache[item.path] = (model.image_tensor(picture), mask)
            except UnreadableImage as exc:
                cache[item.path] = str(exc)
        return cache[item.path]

    good, a_list, s_list, m_list, failures = [], [], [], [], []
    for index in indices:
        ai, si = pairs[index]
        a, s = get(plan.sources[ai], False), get(plan.structures[si], True)
        bad = next((x for x in (a, s) if isinstance(x, str)), None)
        if bad is not None:
            failures.append((index, bad))
            continue
        good.append(index)
        a_list.append(a[0])
        s_list.append(s[0])
        m_list.append(s[1])
    if not good:
        return _Batch([], torch.empty(0), torch.empty(0), None, failures)
    masks = torch.stack(m_list) if render else None
    return _Batch(good, torch.stack(a_list), torch.stack(s_list), masks, failures)


def synthesize(runtime: Runtime, appearance: torch.Tensor, structure: torch.Tensor,
               masks: torch.Tensor | None, top_k: int) -> tuple[torch.Tensor, list[SoftLabel | None]]:
    """What a shard record holds for pairs of source images: the generated images (normalised, on
    the CPU) and the top-k of the teacher's soft labels (renormalised)."""
    made = runtime.synthesizer(appearance, structure, masks)
    soft: list[SoftLabel | None] = [None] * len(made.images)
    if made.soft is not None:
        classes, probs = (t.cpu() for t in keep_top_k(made.soft, top_k))
        soft = [SoftLabel(classes=c, probs=p) for c, p in zip(classes.tolist(), probs.tolist())]
    return made.images.cpu(), soft


def _generate(runtime: Runtime, batch: _Batch, top_k: int) -> tuple[torch.Tensor, list[SoftLabel | None]]:
    return synthesize(runtime, batch.appearance, batch.structure, batch.masks, top_k)


def _encode_one(spec: JobSpec, pixels: np.ndarray) -> bytes:
    from PIL import Image

    return encode_image(Image.fromarray(pixels), spec.encoding, spec.jpeg_quality)


def _encode_and_write(plan: Plan, pairs: _ShardPairs, runtime: Runtime, writer: ShardWriter,
                      encoders: ThreadPoolExecutor,
                      indices: list[int], images: torch.Tensor, soft: list) -> int:
    spec, lm = plan.spec, runtime.label_map
    pixels = (denormalize(images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    encoded = list(encoders.map(lambda p: _encode_one(spec, p), pixels))
    h, w = pixels.shape[1:3]
    values = []
    for index, data, q in zip(indices, encoded, soft):
        ai, si = pairs[index]
        a = _source_ref(plan.sources[ai], plan.source_root, lm)
        s = _source_ref(plan.structures[si], plan.structure_root, lm)
        # L_fine's class is the structure provider's identity; a CR-GAN rendering keeps the source's.
        fine = a.label if spec.kind == "crgan_render" else s.label
        meta = RecordMeta(index=index, kind=spec.kind, appearance=a, structure=s, soft_label=q,
                          structure_label=fine, encoding=spec.encoding, height=h, width=w)
        values.append((index, pack_record(meta.model_dump(mode="json"), data)))
    writer.add(values)
    return len(values)


class _Inline(Executor):
    """An executor that runs each task at once, in the caller's thread (the CPU-device pipeline)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through .result()
            future.set_exception(exc)
        return future


def _pool(threads: int, overlap: bool, name: str) -> Executor:
    return ThreadPoolExecutor(threads, thread_name_prefix=name) if overlap else _Inline()


# -- one shard ------------------------------------------------------------------------------------
def generate_shard(spec: JobSpec, index: int, out: str | Path, runtime: Runtime | None = None, *,
                   device: str = "auto", on_records: Callable[[int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None, loader_threads: int = 2,
                   encoder_threads: int = 2, overlap: bool | None = None,
                   located: Located | None = None) -> ShardResult:
    """Make shard ``index`` of ``spec``'s plan under ``out`` (idempotent: a finished shard is
    skipped). ``on_records(n)`` reports progress; ``should_stop()`` is polled between batches.
    ``overlap``: loading and encoding in threads beside the device (default: unless the device
    is the CPU). ``located``: where the job's files are (`worker.plans.locate` with a server's
    roots; default: the spec's paths and ``out`` as given)."""
    started = time.perf_counter()
    located = located or locate(spec, out)
    out = located.out
    plan = make_plan(spec, located.data, located.target)
    if not 0 <= index < plan.shards:
        raise public_error(f"shard {index} does not exist; the plan has {plan.shards} shards")
    # The output folder, opened once: every write of the shard goes through this descriptor.
    with open_out(out) as folder, writing_in(folder, out.shown):
        ensure_job_manifest_in(folder, JobManifest(spec=spec, plan_hash=plan.hash, shards=plan.shards,
                                                   records_planned=plan.records), out.shown)
        if shard_done(folder, index):
            done = read_shard_manifest(folder, index)
            return ShardResult(index, "skipped", done.record_count, len(done.failed), 0.0)
        return _make_shard(spec, index, plan, folder, runtime or load_runtime(spec, device, located), started,
                           on_records=on_records, should_stop=should_stop, loader_threads=loader_threads,
                           encoder_threads=encoder_threads, overlap=overlap)


def _make_shard(spec: JobSpec, index: int, plan: Plan, folder: Folder, runtime: Runtime, started: float, *,
                on_records, should_stop, loader_threads: int, encoder_threads: int, overlap: bool | None
                ) -> ShardResult:
    records = list(plan.shard_range(index))
    pairs = _ShardPairs(plan, plan.shard_range(index))
    batches = [records[i:i + spec.batch_size] for i in range(0, len(records), spec.batch_size)]
    writer = ShardWriter(folder, index)
    written = 0
    if overlap is None:
        overlap = runtime.engine.device.type != "cpu"
    try:
        with _pool(loader_threads, overlap, "shard-load") as loaders, _pool(1, overlap, "shard-write") as writes, \
                _pool(encoder_threads, overlap, "shard-encode") as encoders:
            loading = deque(loaders.submit(_load_batch, plan, pairs, runtime.model, b) for b in batches[:PREFETCH])
            pending = None
            for k in range(len(batches)):
                if should_stop is not None and should_stop():
                    raise Cancelled(f"shard {index} cancelled")
                batch = loading.popleft().result()
                if k + PREFETCH < len(batches):
                    loading.append(loaders.submit(_load_batch, plan, pairs, runtime.model, batches[k + PREFETCH]))
                for failed_index, error in batch.failures:
                    writer.fail(failed_index, error)
                if batch.failures and on_records is not None:
                    on_records(len(batch.failures))
                if not batch.indices:
                    continue
                images, soft = _generate(runtime, batch, spec.top_k)
                if pending is not None:  # at most one batch being written while the device works
                    n = pending.result()
                    written += n
                    if on_records is not None:
                        on_records(n)
                pending = writes.submit(_encode_and_write, plan, pairs, runtime, writer, encoders, batch.indices,
                                        images, soft)
            if pending is not None:
                n = pending.result()
                written += n
                if on_records is not None:
                    on_records(n)
        won = writer.commit(shards=plan.shards, plan_hash=plan.hash, spec=spec, models=runtime.models,
                            label_map=list(runtime.label_map.pids))
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - started
    return ShardResult(index, "done" if won else "lost-race", written, len(writer.failed), seconds)


def run_job(spec: JobSpec, out: str | Path, device: str = "auto", progress: bool = True) -> list[ShardResult]:
    """Every shard of ``spec`` in this process, in order (finished shards are skipped): the
    embedded default of `reidgen generate`, no broker needed."""
    from tqdm import tqdm

    plan = make_plan(spec)
    ensure_job_manifest(out, JobManifest(spec=spec, plan_hash=plan.hash, shards=plan.shards,
                                         records_planned=plan.records))
    results = []
    with tqdm(total=plan.records, disable=not progress, unit="img", dynamic_ncols=True,
              desc=f"{plan.shards} shard(s)") as bar:
        runtime = None
        for index in range(plan.shards):
            if shard_done(out, index):
                results.append(generate_shard(spec, index, out))
                bar.update(len(plan.shard_range(index)))
                continue
            runtime = runtime or load_runtime(spec, device)
            results.append(generate_shard(spec, index, out, runtime, on_records=bar.update,
                                          loader_threads=_threads(), encoder_threads=_threads()))
    return results


def _threads() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))
