"""Person masks for CR-GAN (1 = person): one interface, three providers, a PNG cache, a check sheet.

Providers (all return float32 H×W masks in [0, 1] at each image's own size):

- `FolderMasks`: precomputed masks from any human parser (the paper used LIP-JPPNet), one PNG
  per image with the image's file stem.
- `TFLiteSegmenter`: the Apache-2.0 MediaPipe person-segmentation models, run offline on CPU
  with the ``ai-edge-litert`` interpreter (``pose`` = pose_landmark_full.tflite, the default and
  the cleanest on re-id crops; ``selfie`` = selfie_segmentation.tflite, smaller and looser).
- `GeometricMasks`: no model at all, a soft person-shaped ellipse. A prior, not a segmentation.

Masks are computed once per data set with `compute_masks`, which stores them as PNGs under
``OUT_DIR/<provider>-<hash of its identity>/`` so that two models never share a cache.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from reidgen.core.errors import ReidgenError
from reidgen.core.images import UnreadableImage, UnreadableImages, decode_image
from reidgen.core.market import Item

THRESHOLD = 0.5
MODELS_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "models"
MODEL_FILES = {"pose": "pose_landmark_full.tflite", "selfie": "selfie_segmentation.tflite"}
# kind → (output index, output is logits, longer side of the crop in the model's square).
# Letterbox size, measured on Market/CUHK03 crops: the pose model expects a person ROI grown by
# ~1.25× around the body (MediaPipe's convention), i.e. the body over ~80% of the square; a
# re-id crop already has a little margin, so its longer side at 224 of 256 px puts the body
# there. On 12 crops (binarised at 0.5): 224 → person centre 0.68, border columns 0.10;
# 192 → 0.69 / 0.14; 256 (no margin) → 0.62 / 0.08, smaller masks. The selfie model spills
# onto the background as the person grows (border 0.24 at 192, 0.33 at 224), so it gets 192.
_TFLITE = {"pose": (2, True, 224), "selfie": (0, False, 192)}
MODEL_HELP = (
    "the MediaPipe models come from the mediapipe==0.10.21 wheel (Apache-2.0): run "
    "`pip download --no-deps mediapipe==0.10.21` and `unzip -j mediapipe-0.10.21-*.whl "
    "'*/pose_landmark_full.tflite' '*/selfie_segmentation.tflite'`, then set REIDGEN_MASK_MODEL "
    "to the .tflite file (or the folder holding both) or pass its path"
)
log = logging.getLogger("reidgen.masks")


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float mask to ``size`` = (W, H)."""
    if mask.shape[::-1] == size:
        return mask.astype(np.float32, copy=False)
    out = Image.fromarray(mask.astype(np.float32)).resize(size, Image.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def binarize(mask: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """A soft mask → a bool person mask (``mask >= threshold``)."""
    return np.asarray(mask) >= threshold


class MaskProvider(ABC):
    """Anything that turns image files into person masks."""

    def masks(self, paths: Sequence[str]) -> list[np.ndarray]:
        """float32 H×W masks in [0, 1] (1 = person), each at its image's own size."""
        return [self.mask_file(p) for p in paths]

    @abstractmethod
    def mask_file(self, path: str) -> np.ndarray:
        """The mask of one image file."""

    @property
    @abstractmethod
    def name(self) -> str:
        """Short name (``pose``, ``selfie``, ``folder``, ``geometric``)."""

    @abstractmethod
    def identity(self) -> str:
        """Everything that changes the masks (model file hash, settings): the cache key."""


class FolderMasks(MaskProvider):
    """Precomputed masks: ``FOLDER/<image stem>.png``, resized to the image if needed.

    Palette / 1-bit PNGs and greyscale label maps (all values ≤ 31, e.g. parser class ids) count
    any non-zero pixel as person; other greyscale PNGs are soft masks (value / 255); RGB(A)
    PNGs count any non-zero colour as person.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ReidgenError(f"mask folder {self.folder} does not exist; expected a folder of "
                               "PNG masks named like the images, e.g. 0002_c1s1_000451_03.png")

    @property
    def name(self) -> str:
        return "folder"

    def identity(self) -> str:
        return f"folder {self.folder.resolve()}"

    def mask_file(self, path: str) -> np.ndarray:
        mask_path = self.folder / (Path(path).stem + ".png")
        if not mask_path.is_file():
            raise ReidgenError(
                f"no mask for {path}: expected {mask_path} (one PNG per image with the image's "
                "file stem, e.g. 0002_c1s1_000451_03.jpg → 0002_c1s1_000451_03.png)")
        try:
            with Image.open(path) as im:
                size = im.size
            with Image.open(mask_path) as m:
                mode, raw = m.mode, np.asarray(m)
        except OSError as e:
            raise UnreadableImage(f"cannot read image or mask for {path} ({e})") from e
        if raw.ndim == 3:
            mask = (raw[..., :3] != 0).any(axis=-1).astype(np.float32)
        elif mode in ("P", "1") or raw.max(initial=0) <= 31:
            mask = (raw != 0).astype(np.float32)
        else:
            mask = raw.astype(np.float32) / (65535.0 if raw.max() > 255 else 255.0)
        return _resize_mask(mask, size)


def default_model_path(kind: str = "pose") -> Path:
    """``REIDGEN_MASK_MODEL`` (a .tflite file, or a folder holding the models), else shared/models."""
    from reidgen.core.settings import CommonSettings

    env = CommonSettings.from_env().mask_model
    base = Path(env).expanduser() if env else MODELS_DIR
    return base if env and not base.is_dir() else base / MODEL_FILES[kind]


class TFLiteSegmenter(MaskProvider):
    """MediaPipe person segmentation on CPU, one image at a time through one reused interpreter.

    Each crop is letterboxed: scaled so its longer side is ``fit`` px (aspect ratio kept),
    pasted centred on a grey (0.5) square of the model's input size; the mask is cropped back to
    that region and resized to the image size.
    """

    def __init__(self, model_path: str | Path | None = None, kind: str = "pose",
                 num_threads: int | None = None, fit: int | None = None):
        if kind not in _TFLITE:
            raise ReidgenError(f"unknown segmentation model kind {kind!r}; expected one of {sorted(_TFLITE)}")
        self.kind = kind
        self.model_path = Path(model_path).expanduser() if model_path else default_model_path(kind)
        if not self.model_path.is_file():
            raise ReidgenError(f"person-segmentation model {self.model_path} not found; {MODEL_HELP}")
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise ReidgenError("TFLite masks need the ai-edge-litert package (`pip install "
                               "ai-edge-litert`), or use the folder/geometric mask providers") from e
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        try:
            self._interp = Interpreter(model_path=str(self.model_path), num_threads=self.num_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ReidgenError(f"{self.model_path} is not a usable .tflite model ({e}); {MODEL_HELP}") from e
        out_index, self._logits, default_fit = _TFLITE[kind]
        inp, outs = self._interp.get_input_details()[0], self._interp.get_output_details()
        self._input = inp["index"]
        self.size = int(inp["shape"][1])
        if out_index >= len(outs) or tuple(outs[out_index]["shape"]) != (1, self.size, self.size, 1):
            raise ReidgenError(f"{self.model_path} does not look like the {MODEL_FILES[kind]} "
                               f"model (kind={kind!r}); pass the matching file or kind")
        self._output = outs[out_index]["index"]
        self.fit = min(fit or default_fit, self.size)
        self._lock = threading.Lock()  # an interpreter is not thread-safe
        data = self.model_path.read_bytes()
        self._digest, self._bytes = hashlib.sha256(data).hexdigest()[:16], len(data)

    @property
    def name(self) -> str:
        return self.kind

    def identity(self) -> str:
        return (f"tflite {self.kind} {self.model_path.name} sha256={self._digest} "
                f"bytes={self._bytes} fit={self.fit}/{self.size}")

    def mask_file(self, path: str) -> np.ndarray:
        return self.mask_image(decode_image(path))

    def mask_image(self, image: Image.Image) -> np.ndarray:
        """The mask of an in-memory RGB picture, at its size."""
        w, h = image.size
        scale = self.fit / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = (self.size - nw) // 2, (self.size - nh) // 2
        canvas = np.full((1, self.size, self.size, 3), 0.5, dtype=np.float32)
        crop = image.convert("RGB").resize((nw, nh), Image.BILINEAR)
        canvas[0, y0:y0 + nh, x0:x0 + nw] = np.asarray(crop, dtype=np.float32) / 255.0
        with self._lock:
            self._interp.set_tensor(self._input, canvas)
            self._interp.invoke()
            out = self._interp.get_tensor(self._output)[0, y0:y0 + nh, x0:x0 + nw, 0]
        if self._logits:
            out = 0.5 * (1.0 + np.tanh(0.5 * out))  # sigmoid without overflow
        return _resize_mask(np.clip(out, 0.0, 1.0), (w, h))


class GeometricMasks(MaskProvider):
    """A soft vertical ellipse where a re-id crop usually has its person. Uses no model.

    This is a *prior*, not a segmentation: it ignores the picture (only its size is read) and
    is meant as a fallback to run CR-GAN without a parser, or as a baseline to compare with.
    """

    def __init__(self, center: tuple[float, float] = (0.5, 0.52),
                 axes: tuple[float, float] = (0.32, 0.48), softness: float = 0.15):
        self.center, self.axes, self.softness = center, axes, softness

    @property
    def name(self) -> str:
        return "geometric"

    def identity(self) -> str:
        return f"geometric v1 center={self.center} axes={self.axes} softness={self.softness}"

    def mask_file(self, path: str) -> np.ndarray:
        try:
            with Image.open(path) as im:
                w, h = im.size
        except OSError as e:
            raise UnreadableImage(f"cannot read image {path} ({e})") from e
        return self.mask_of_size(w, h)

    def mask_of_size(self, w: int, h: int) -> np.ndarray:
        """1 inside the ellipse, 0 outside, a linear ramp of ±softness (in radii) at the edge."""
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot((x + 0.5 - self.center[0] * w) / (self.axes[0] * w),
                     (y + 0.5 - self.center[1] * h) / (self.axes[1] * h))
        return np.clip((1.0 + self.softness - r) / (2 * self.softness), 0.0, 1.0).astype(np.float32)


_KINDS = {"folder": FolderMasks, "pose": TFLiteSegmenter, "selfie": TFLiteSegmenter,
          "geometric": GeometricMasks}
_OPTIONS = {"folder": {"folder"}, "pose": {"model_path", "num_threads", "fit"},
            "selfie": {"model_path", "num_threads", "fit"}, "geometric": {"center", "axes", "softness"}}


def build_mask_provider(kind: str, **opts) -> MaskProvider:
    """``folder`` (needs ``folder=``), ``pose``, ``selfie`` or ``geometric``, with its options."""
    if kind not in _KINDS:
        raise ReidgenError(f"unknown mask provider {kind!r}; expected one of {sorted(_KINDS)}")
    unknown = set(opts) - _OPTIONS[kind]
    if unknown:
        raise ReidgenError(f"mask provider {kind!r} has no option(s) {sorted(unknown)}; "
                           f"it takes {sorted(_OPTIONS[kind])}")
    if kind == "folder" and "folder" not in opts:
        raise ReidgenError("mask provider 'folder' needs folder=<directory of PNG masks>")
    if kind in ("pose", "selfie"):
        opts["kind"] = kind
    return _KINDS[kind](**opts)


def mask_provider_for(train_config: Mapping[str, Any] | Any, override: str | None = None, *,
                      fallback: bool = False) -> tuple[MaskProvider, str]:
    """The person-mask provider a CR-GAN model was trained with, and the name to show for it.

    ``train_config`` is a CR-GAN train configuration (the checkpoint's dict, or the trainer's
    dataclass): its ``masks`` provider (default ``pose``) with its ``mask_model`` file when one was
    given. ``override`` names another provider (``serve --masks``); the recorded model file then
    counts only when the override is the provider it belongs to. A ``folder`` provider's folder is
    not recorded, so the pose segmenter stands in for it.

    With ``fallback``, a provider that cannot be built here (no TFLite model or runtime) is replaced
    by the geometric prior, logged and named ``geometric (fallback: …)``: what the service does, where
    a target sent without a mask still gets one. Without it, the error is raised: trainers and
    measurements must use the very masks the model was trained with.
    """
    recorded = train_config if isinstance(train_config, Mapping) else vars(train_config)
    trained = recorded.get("masks") or "pose"
    kind = override or trained
    if kind == "folder":
        kind = "pose"
    opts = {}
    if kind in ("pose", "selfie") and recorded.get("mask_model") and kind == trained:
        opts["model_path"] = recorded["mask_model"]
    try:
        return build_mask_provider(kind, **opts), kind
    except ReidgenError as exc:
        if not fallback or kind == "geometric":
            raise
        log.warning("mask provider %s unavailable (%s); target masks fall back to the geometric prior", kind, exc)
        return GeometricMasks(), f"geometric (fallback: {kind} unavailable)"


class MaskCache:
    """PNG masks (uint8 0..255, image stem + .png) under ``root/<provider>-<identity hash>/``."""

    def __init__(self, root: str | Path, provider: MaskProvider):
        key = hashlib.sha256(provider.identity().encode()).hexdigest()[:12]
        self.folder = Path(root) / f"{provider.name}-{key}"
        self.identity = provider.identity()

    def path(self, image_path: str) -> Path:
        return self.folder / (Path(image_path).stem + ".png")

    def load(self, image_path: str) -> np.ndarray:
        with Image.open(self.path(image_path)) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0

    def save(self, image_path: str, mask: np.ndarray) -> np.ndarray:
        """Write atomically (no half-written PNG survives a crash); return the stored mask."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "identity.txt").write_text(self.identity + "\n")
        stored = np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8)
        target = self.path(image_path)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.png")
        Image.fromarray(stored).save(tmp)
        os.replace(tmp, target)
        return stored.astype(np.float32) / 255.0


def ensure_masks(provider: MaskProvider, items: Sequence[str | Item], out_dir: str | Path,
                 progress: bool = True, strict: bool = False,
                 skipped: UnreadableImages | None = None) -> tuple[MaskCache, list[str]]:
    """Compute the masks of ``items`` (paths or Market `Item`s) that are not cached yet.

    Returns the cache and the paths that have a mask. Unreadable images are skipped, collected
    in ``skipped`` and reported (``strict``: the first one is fatal). Nothing is held in memory,
    so this scales to whole data sets; read masks back with ``MaskCache.load``.
    """
    paths = [it.path if isinstance(it, Item) else str(it) for it in items]
    cache, skipped = MaskCache(out_dir, provider), skipped if skipped is not None else UnreadableImages(strict=strict)
    stems: dict[str, str] = {}
    for p in paths:
        other = stems.setdefault(Path(p).stem, p)
        if other != p:
            raise ReidgenError(f"{other} and {p} share a file name, so their cached masks would "
                               "collide; compute masks one data set folder at a time")
    done: list[str] = []
    for p in tqdm(paths, desc=f"masks ({provider.name})", unit="img", disable=not progress):
        if not cache.path(p).is_file():
            try:
                (mask,) = provider.masks([p])
            except UnreadableImage:
                skipped.record(p)
                continue
            cache.save(p, mask)
        done.append(p)
    if skipped.summary():
        tqdm.write(f"warning: {skipped.summary()}")
    return cache, done


def compute_masks(provider: MaskProvider, items: Sequence[str | Item], out_dir: str | Path,
                  progress: bool = True, strict: bool = False,
                  skipped: UnreadableImages | None = None) -> dict[str, np.ndarray]:
    """`ensure_masks`, then ``{path: mask}`` with the masks as stored (quantised to 1/255), so
    a first run and a rerun give equal masks."""
    cache, done = ensure_masks(provider, items, out_dir, progress, strict, skipped)
    return {p: cache.load(p) for p in done}


def mask_sheet(paths: Sequence[str], masks: Sequence[np.ndarray], columns: int = 8,
               cell: tuple[int, int] = (64, 128), pad: int = 2) -> Image.Image:
    """A contact sheet to check masks by eye: each image (resized to ``cell`` = W×H) with the
    person tinted red at 50% and the background dimmed, so red clothes stay visible.

    Size: ``cols·(W+pad)+pad`` × ``rows·(H+pad)+pad`` with ``cols = min(columns, n)``.
    """
    if len(paths) != len(masks) or not paths:
        raise ValueError(f"mask_sheet needs as many masks as images (got {len(paths)} and {len(masks)})")
    cols = min(columns, len(paths))
    rows = math.ceil(len(paths) / cols)
    w, h = cell
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    red = np.array([255.0, 0.0, 0.0], dtype=np.float32)
    for i, (p, m) in enumerate(zip(paths, masks)):
        img = np.asarray(decode_image(p).resize(cell, Image.BILINEAR), dtype=np.float32)
        a = _resize_mask(np.asarray(m, dtype=np.float32), cell)[..., None]
        tile = a * (0.5 * img + 0.5 * red) + (1 - a) * 0.6 * img
        sheet.paste(Image.fromarray(tile.round().astype(np.uint8)),
                    (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return sheet
