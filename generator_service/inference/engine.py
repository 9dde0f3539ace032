"""The inference engine: loads the generators of a models directory and runs them in batches.

One engine serves every caller (DESIGN.md, "one code path"):

- the HTTP service submits requests to its queue (`Engine.submit`, awaited with `Engine.run`);
  a batcher thread merges concurrent requests of the same model and operation into one
  device batch (up to ``max_batch`` generated images, waiting at most ``max_wait_ms`` for more);
- batch workers and the training feeds, which already hold batches, call the synchronous
  methods (`swap_batch`, `render_batch`, `interpolate_batch`, `embed_batch`) in their own thread.

Both paths end in `Engine._execute`, which runs under ``torch.inference_mode`` (bf16 autocast
on CUDA), isolates a failing request (a merged batch that fails is re-run request by request)
and survives CUDA out-of-memory by splitting the batch in halves and retrying. Results a caller
keeps on the device (``on_device``: the training feeds) are made under ``torch.no_grad``
instead: inference tensors could not enter the caller's autograd graph, and cloning them would
cost a copy every step.

The queue is bounded: a full queue raises `QueueFull` at once (HTTP: 503 with Retry-After),
and a request whose deadline passes before its batch runs is dropped with `DeadlineExceeded`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from api_schemas.service import MODEL_NAME_PATTERN
from generator_service.inference.kinds import KINDS, OP_KIND, EmbedItem, InterpolateItem, RenderItem, SwapItem
from generator_service.inference.refusals import RefusedModel, refusal_reason
from generator_service.models.masks import GeometricMasks, MaskProvider
from reidgen.core.checkpoint import CHECKPOINTS_DIR, LAST, Checkpoint, run_checkpoint, run_folder
from reidgen.core.device import autocast, pick_device
from reidgen.core.errors import ReidgenError
from reidgen.core.images import eval_transform
from reidgen.core.settings import REQUEST_TIMEOUT_S

log = logging.getLogger("reidgen.engine")



# -- errors (each carries a stable code; the HTTP layer maps them to status codes) ---------------
class EngineError(ReidgenError):
    code = "engine_error"


class UnknownModel(EngineError):
    code = "unknown_model"


class WrongModelKind(EngineError):
    code = "wrong_model_kind"


class QueueFull(EngineError):
    code = "queue_full"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(EngineError):
    code = "deadline_exceeded"


class OutOfMemory(EngineError):
    code = "out_of_memory"


class NotReady(EngineError):
    code = "not_ready"


class ModelRefused(NotReady):
    """A request names a model whose checkpoint failed to load: not ready until a restart."""

    retry_after = 300  # an operator has to fix the file: not worth retrying within seconds


# -- the model registry ------------------------------------------------------------------------
@dataclass
class ServedModel:
    """A loaded generator and what clients may know about it (never an absolute path)."""

    name: str
    kind: str                     # a key of KINDS: "dgnet" | "crgan" | "reid"
    checkpoint: str               # relative to the models directory
    identity: str                 # short sha256 of the checkpoint file
    step: int | None
    preset: str | None
    image_size: tuple[int, int]   # (H, W)
    net: Any                      # DGNet | ContextRenderer | ReidNet
    masks: MaskProvider | None = None
    masks_name: str | None = None
    _transform: Any = field(default=None, repr=False)

    def image_tensor(self, image: Image.Image) -> torch.Tensor:
        """An RGB picture → the normalised 3×H×W tensor this model takes."""
        if self._transform is None:
            self._transform = eval_transform(self.image_size)
        return self._transform(image)

    def mask_tensor(self, mask: np.ndarray | Image.Image) -> torch.Tensor:
        """A person mask (H'×W' floats in [0, 1], or a greyscale picture) → 1×H×W at the model's size."""
        if isinstance(mask, Image.Image):
            mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        return F.interpolate(t, size=self.image_size, mode="bilinear", align_corners=False)[0].clamp_(0, 1)

    def person_mask(self, image: Image.Image) -> np.ndarray:
        """The target person mask of a picture, from this CR-GAN model's mask provider."""
        if self.masks is None:
            raise WrongModelKind(f"model {self.name!r} is a {KINDS[self.kind].title} model and has no mask provider")
        if isinstance(self.masks, GeometricMasks):
            return self.masks.mask_of_size(*image.size)
        return self.masks.mask_image(image)  # TFLiteSegmenter (thread-safe: it holds a lock)

    def info(self, default: bool) -> dict:
        return {"name": self.name, "kind": self.kind, "endpoints": list(KINDS[self.kind].endpoints), "default": default,
                "checkpoint": self.checkpoint, "identity": self.identity, "step": self.step,
                "preset": self.preset, "image_size": list(self.image_size), "masks": self.masks_name}


def scan_models_dir(root: str | Path) -> list[tuple[str, Path]]:
    """(name, checkpoint path) of each ``*.pt`` file and run folder (``NAME/checkpoints/last.pt``)."""
    root = Path(root)
    if not root.is_dir():
        raise ReidgenError(f"models directory {root} not found (expected a folder of *.pt checkpoints "
                           f"or run folders)")
    found: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix == ".pt":
            name, path = entry.stem, entry
        elif entry.is_dir() and run_checkpoint(entry).is_file():
            name, path = entry.name, run_checkpoint(entry)
        else:
            continue
        if name in found:
            raise ReidgenError(f"two models named {name!r} in {root}: {found[name].relative_to(root)} and "
                               f"{path.relative_to(root)}; rename one")
        found[name] = path
    return list(found.items())


def load_model(name: str, source: Path | Checkpoint, root: Path, device: torch.device,
               mask_provider: str | None = None) -> ServedModel:
    """Load one checkpoint (a path, or a file already read, not read again) for inference."""
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint.read(source, tuple(KINDS))
    loaded = KINDS[ckpt.kind].load(ckpt, device, mask_provider)
    return ServedModel(name=name, kind=ckpt.kind, checkpoint=str(ckpt.path.relative_to(root)),
                       identity=ckpt.identity, step=ckpt.step, preset=loaded.preset, image_size=loaded.image_size,
                       net=loaded.net, masks=loaded.masks, masks_name=loaded.masks_name)


def _load_served(name: str, path: Path, root: Path, device: torch.device,
                 mask_provider: str | None) -> ServedModel | None:
    """One checkpoint of a models directory, loaded; None for a kind no endpoint serves (skipped)."""
    if not re.match(MODEL_NAME_PATTERN, name):
        raise ReidgenError(f"model name {name!r} (from {path.relative_to(root)}) must be letters, digits, "
                           f"'.', '_' or '-' (at most 128); rename the file or folder")
    # The file is read at its real path, which must lie inside the models folder: a symbolic link
    # that leads out of it is refused, as a job naming the same model is (`reidgen.core.paths`).
    real, real_root = path.resolve(), root.resolve()
    if not real.is_relative_to(real_root):
        raise ReidgenError(f"{path.relative_to(root)} is a symbolic link that leads outside the models folder; "
                           f"this server loads only files inside it")
    ckpt = Checkpoint.read(real, tuple(KINDS))
    if not KINDS[ckpt.kind].endpoints:
        log.info("skipping %s: a %s model (no HTTP endpoint serves that kind)", path, KINDS[ckpt.kind].title)
        return None
    return load_model(name, ckpt, real_root, device, mask_provider)


def _to_cpu(result):
    return tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu()




@dataclass(eq=False)
class Job:
    op: str
    model: ServedModel
    item: Any
    deadline: float  # time.monotonic()
    alone: bool = False
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    @property
    def size(self) -> int:
        return self.item.size


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


class Engine:
    """Models, a bounded request queue and the batcher thread that serves it."""

    def __init__(self, models: Sequence[ServedModel], device: torch.device | str = "cpu", *, max_batch: int = 16,
                 max_wait_ms: float = 5.0, queue_size: int = 64, amp: bool = True,
                 timeout_s: float = REQUEST_TIMEOUT_S):
        if not models:
            raise ReidgenError("no models to serve")
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ReidgenError(f"max_batch ({max_batch}) and queue_size ({queue_size}) must be ≥ 1 and "
                               f"max_wait_ms ({max_wait_ms}) ≥ 0")
        self.models = {m.name: m for m in models}
        self.defaults = {kind: next((m.name for m in models if m.kind == kind), None) for kind in KINDS}
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.max_batch, self.max_wait_s, self.queue_size = max_batch, max_wait_ms / 1000, queue_size
        self.timeout_s = timeout_s
        self._queue: queue.Queue[Job] = queue.Queue()  # bounded in images by `admit`, not in requests
        self._queued_images = 0
        self._admission = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observers: list[Callable[[str, str, int, int, float], None]] = []
        self._seconds_per_item = 0.05  # seconds per generated image, running estimate: the drain rate
        self.warmed = False
        self.warmup_error: str | None = None
        self.refused: dict[str, RefusedModel] = {}  # checkpoints of the models directory that failed to load

    @classmethod
    def from_models_dir(cls, models_dir: str | Path, device: str = "auto", *, max_batch: int = 16,
                        max_wait_ms: float = 5.0, queue_size: int = 64, amp: bool = True,
                        timeout_s: float = REQUEST_TIMEOUT_S, mask_provider: str | None = None) -> Engine:
        """Load every checkpoint of ``models_dir`` of a kind served over HTTP, DG-Net and CR-GAN
        (files ``NAME.pt`` and run folders ``NAME/checkpoints/last.pt``; re-id checkpoints, such
        as a teacher kept there, are skipped). A checkpoint that fails to load is refused alone
        (`Engine.refused`, logged): one bad file does not stop the others being served. When
        none loads, the start fails, naming each refusal."""
        root = Path(models_dir)
        dev = pick_device(device)
        models, refused, failures = [], [], []
        for name, path in scan_models_dir(root):
            try:
                model = _load_served(name, path, root, dev, mask_provider)
            except Exception as exc:  # noqa: BLE001 - any failure of one file refuses that file only
                refused.append(RefusedModel(name, str(path.relative_to(root)), refusal_reason(exc, path, root)))
                failures.append(f"{path.relative_to(root)}: {exc}")
                log.warning("refused model %r from %s: %s", name, path, exc,
                            exc_info=not isinstance(exc, ReidgenError))  # a bug keeps its traceback
                continue
            if model is not None:
                models.append(model)
                log.info("loaded %s model %r from %s (%s)", model.kind, name, model.checkpoint, model.identity)
        if not models and failures:
            raise ReidgenError(f"no model of {root} could be loaded: " + "; ".join(failures))
        if not models:
            raise ReidgenError(f"no DG-Net or CR-GAN checkpoints in {root} (expected NAME.pt files or run folders "
                               f"with checkpoints/last.pt, written by reidgen train-dgnet / train-crgan)")
        engine = cls(models, dev, max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size, amp=amp,
                     timeout_s=timeout_s)
        engine.refused = {r.name: r for r in refused}
        return engine

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | Checkpoint, device: str = "auto", *, max_batch: int = 4096,
                        amp: bool = True, mask_provider: str | None = None) -> Engine:
        """An engine running one checkpoint of any kind (file, run folder or a file already read):
        what the batch workers, the training feeds and render grids use. Its name is the run
        folder's or the file's stem."""
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.read(checkpoint, tuple(KINDS))
        path = ckpt.path
        name = run_folder(path).name if path.parent.name == CHECKPOINTS_DIR and path.name == LAST else path.stem
        dev = pick_device(device)
        return cls([load_model(name, ckpt, path.parent, dev, mask_provider)], dev, max_batch=max_batch, amp=amp)

    # -- registry ------------------------------------------------------------------------------
    def model_for(self, op: str, name: str | None = None) -> ServedModel:
        """The named model (or the default one) checked to be of the kind ``op`` needs."""
        kind = OP_KIND[op]
        loaded = ", ".join(f"{m.name} ({m.kind})" for m in self.models.values())
        if name is None:
            name = self.defaults[kind]
            if name is None:
                raise UnknownModel(f"no {KINDS[kind].title} model is loaded, which {op} needs (loaded: {loaded})")
        model = self.models.get(name)
        if model is None and name in self.refused:
            raise ModelRefused(f"model {name!r} is not ready: its checkpoint was refused when the server started "
                               f"({self.refused[name].reason}); it is served once the file is fixed and the server "
                               f"restarted (loaded: {loaded})")
        if model is None:
            raise UnknownModel(f"no model named {name!r}; loaded: {loaded}")
        if model.kind != kind:
            raise WrongModelKind(f"model {name!r} is a {KINDS[model.kind].title} model; {op} needs a "
                                 f"{KINDS[kind].title} model (loaded: {loaded})")
        return model

    def describe(self) -> dict:
        return {"device": str(self.device), "amp": self.amp, "max_batch": self.max_batch,
                "max_wait_ms": self.max_wait_s * 1000, "queue_size": self.queue_size}

    def model_infos(self) -> list[dict]:
        return [m.info(self.defaults[m.kind] == m.name) for m in self.models.values()]

    def refused_infos(self) -> list[dict]:
        return [r.info() for r in self.refused.values()]

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def queued_images(self) -> int:
        """Images waiting for the batcher (what the queue bound counts)."""
        return self._queued_images

    def retry_after(self, images: int = 1) -> int:
        """Seconds until the queue has drained enough for ``images`` more, from the drain rate
        measured on recent batches (1 to 120)."""
        return max(1, min(120, math.ceil((self._queued_images + images) * self._seconds_per_item)))

    def admit(self, images: int = 1) -> None:
        """`QueueFull` unless ``images`` more fit in the queue now. The HTTP handlers call it before
        reading a request's body (with 1), and `submit` again with the request's real size. The
        queue holds up to ``queue_size`` images; a request larger than that is taken into an
        empty queue only."""
        waiting = self._queued_images
        if waiting and waiting + images > self.queue_size:
            wait = self.retry_after(images)
            raise QueueFull(f"the server is busy ({waiting} images waiting, the queue holds {self.queue_size}); "
                            f"retry after {wait} s", retry_after=wait)

    def _taken(self, job: Job) -> Job:
        with self._admission:
            self._queued_images -= job.size
        return job

    def add_observer(self, fn: Callable[[str, str, int, int, float], None]) -> None:
        """``fn(op, model, images, requests, seconds)`` after every model call (metrics)."""
        self._observers.append(fn)

    @property
    def ready(self) -> bool:
        return self.warmed and self._thread is not None and self._thread.is_alive()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the batcher thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="reidgen-batcher", daemon=True)
            self._thread.start()
        return self

    def warm_up(self) -> None:
        """Run each model once (and, on CUDA, once at full batch size) so the first request does
        not pay for lazy initialisation; the mask segmenters too."""
        try:
            sizes = [1] if self.device.type == "cpu" else sorted({1, self.max_batch})
            for model in self.models.values():
                h, w = model.image_size
                kind = KINDS[model.kind]
                for n in sizes:
                    self._direct(next(iter(kind.ops)), model, kind.warm_item(n, h, w))
                if model.masks is not None:
                    model.person_mask(Image.new("RGB", (w, h)))
            self.warmed = True
        except Exception as exc:
            self.warmup_error = f"{type(exc).__name__}: {exc}"
            log.exception("warm-up failed")
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Stop the batcher; requests still queued fail with `NotReady`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self._taken(self._queue.get_nowait())
            except queue.Empty:
                break
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReady("the server is shutting down"))

    # -- synchronous API (workers, trainers: the caller already has a batch) --------------------
    def swap_batch(self, appearance: torch.Tensor, structure: torch.Tensor, grid: bool = False,
                   model: str | None = None, on_device: bool = False) -> torch.Tensor:
        """Generated images for normalised image batches (any size: resized to the model's):
        B×3×H×W pairs, or with ``grid`` an A×S×3×H×W grid. Runs in the calling thread; the result
        is on the CPU, or with ``on_device`` left on the engine's device (training feeds)."""
        m = self.model_for("swap", model)
        return self._direct("swap", m, SwapItem(self._fit(appearance, m), self._fit(structure, m), grid), on_device)

    def interpolate_batch(self, first: torch.Tensor, second: torch.Tensor, steps: int, what: str = "appearance",
                          model: str | None = None) -> torch.Tensor:
        m = self.model_for("interpolate", model)
        return self._direct("interpolate", m, InterpolateItem(self._fit(first, m), self._fit(second, m), steps, what))

    def render_batch(self, source: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor,
                     model: str | None = None, on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(rendered, context mask) for B×3×H×W sources/targets and B×1×H×W target person masks."""
        m = self.model_for("render", model)
        mask = target_mask if target_mask.shape[-2:] == m.image_size else \
            F.interpolate(target_mask.float(), size=m.image_size, mode="bilinear", align_corners=False)
        return self._direct("render", m, RenderItem(self._fit(source, m), self._fit(target, m), mask), on_device)

    def embed_batch(self, images: torch.Tensor, model: str | None = None, on_device: bool = False) -> torch.Tensor:
        """B×d re-id features (flip-averaged, unit length) of normalised B×3×H×W images."""
        m = self.model_for("embed", model)
        return self._direct("embed", m, EmbedItem(self._fit(images, m)), on_device)

    @staticmethod
    def _fit(x: torch.Tensor, model: ServedModel) -> torch.Tensor:
        if tuple(x.shape[-2:]) == model.image_size:
            return x
        return F.interpolate(x, size=model.image_size, mode="bilinear", align_corners=False)

    def _direct(self, op: str, model: ServedModel, item, on_device: bool = False) -> Any:
        job = Job(op, model, item, deadline=math.inf)
        job.future.set_running_or_notify_cancel()
        self._execute([job], self.max_batch, on_device)
        return job.future.result()

    # -- queued API (the HTTP service) ---------------------------------------------------------
    def submit(self, op: str, model: ServedModel, item, timeout_s: float | None = None,
               alone: bool = False) -> concurrent.futures.Future:
        """Queue ``item`` for the batcher; ``alone`` keeps it out of merged batches. Raises
        `QueueFull` at once when the queue is full and `NotReady` when the batcher is not running."""
        if self._thread is None or not self._thread.is_alive():
            raise NotReady("the inference engine is not running")
        job = Job(op, model, item, time.monotonic() + (timeout_s or self.timeout_s), alone)
        with self._admission:
            self.admit(job.size)
            self._queued_images += job.size
            self._queue.put_nowait(job)
        return job.future

    async def run(self, op: str, model: ServedModel, item, timeout_s: float | None = None, alone: bool = False):
        """`submit` and await the result without blocking the event loop, within the deadline."""
        timeout_s = timeout_s or self.timeout_s
        future = self.submit(op, model, item, timeout_s, alone)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except TimeoutError:
            future.cancel()  # not started yet: the batcher skips it
            raise DeadlineExceeded(f"the request did not finish within its deadline of {timeout_s:g} s "
                                   f"(server busy or request too large)") from None

    # -- the batcher ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._taken(self._queue.get(timeout=0.2))
            except queue.Empty:
                continue
            jobs, images = [first], first.size
            until = time.monotonic() + self.max_wait_s
            while not first.alone and images < self.max_batch:
                left = until - time.monotonic()
                try:
                    job = self._taken(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
                jobs.append(job)
                images += job.size
            for group in self._groups(jobs):
                self._run_group(group)

    def _groups(self, jobs: list[Job]) -> list[list[Job]]:
        """Jobs of one (operation, model), in order, packed up to ``max_batch`` images per group."""
        by_key: dict[tuple[str, str], list[list[Job]]] = {}
        for job in jobs:
            groups = by_key.setdefault((job.op, job.model.name), [[]])
            last = groups[-1]
            if last and (job.alone or last[0].alone or sum(j.size for j in last) + job.size > self.max_batch):
                groups.append(last := [])
            last.append(job)
        return [g for groups in by_key.values() for g in groups]

    def _run_group(self, jobs: list[Job]) -> None:
        live = []
        now = time.monotonic()
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client gave up (deadline or disconnect)
            if now > job.deadline:
                job.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued "
                                                          "(server busy); retry later or allow more time"))
                continue
            live.append(job)
        if live:
            try:
                self._execute(live, self.max_batch)
            except BaseException as exc:  # never let the batcher thread die
                log.exception("batcher failure")
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _execute(self, jobs: list[Job], chunk: int, on_device: bool = False) -> None:
        """Run ``jobs`` (same op and model) as one batch and settle their futures.

        Out of memory: split the jobs in halves (or, for one job, halve the device batch) and
        retry. Any other failure of a merged batch: re-run each job alone, so only the job that
        fails gets the error.
        """
        op, model = jobs[0].op, jobs[0].model
        started = time.perf_counter()
        # Kept on the device, the results go on into training (see the module's docstring).
        grad_off = torch.no_grad() if on_device else torch.inference_mode()
        try:
            with grad_off, autocast(self.device, self.amp):
                results = KINDS[model.kind].ops[op](model.net, [j.item for j in jobs], self.device, chunk)
                if not on_device:
                    results = [_to_cpu(r) for r in results]
        except Exception as exc:  # noqa: BLE001 - settled below: split, isolate or hand to the request
            if _is_oom(exc):
                torch.cuda.empty_cache()
                if len(jobs) > 1:
                    half = len(jobs) // 2
                    log.warning("out of memory on %d requests of %s: splitting", len(jobs), op)
                    self._execute(jobs[:half], chunk, on_device)
                    self._execute(jobs[half:], chunk, on_device)
                elif chunk > 1:
                    log.warning("out of memory on a device batch of %d for %s: halving", chunk, op)
                    self._execute(jobs, chunk // 2, on_device)
                else:
                    jobs[0].future.set_exception(OutOfMemory(
                        "the server ran out of accelerator memory on this request; send fewer or smaller images"))
                return
            if len(jobs) > 1:
                for job in jobs:
                    self._execute([job], chunk, on_device)
                return
            jobs[0].future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        images = sum(j.size for j in jobs)
        self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * seconds / max(1, images)
        for job, result in zip(jobs, results):
            job.future.set_result(result)
        for fn in self._observers:
            try:
                fn(op, model.name, images, len(jobs), seconds)
            except Exception:  # a metrics hook must not fail requests
                log.exception("engine observer failed")
