"""Image tensors ↔ pictures: the normalisation every network here uses, and grids for people."""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision import transforms as T

from reidgen.core.errors import ReidgenError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnreadableImage(ReidgenError):
    """An image file that cannot be decoded."""


def decode_image(path: str) -> Image.Image:
    """Decode an image file fully as RGB (so truncated files fail here, not later)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot read image {path} ({exc})") from None


@dataclass
class UnreadableImages:
    """Counts the images that failed to decode; fatal on the first one when ``strict``.

    A bad image fails its own record, never the batch: consumers skip it and report the
    count with the first paths at the end.
    """

    strict: bool = False
    paths: list[str] = field(default_factory=list)

    def record(self, path: str) -> None:
        if self.strict:
            raise UnreadableImage(f"cannot read image {path} (run without --strict-images to skip such files)")
        if path not in self.paths:
            self.paths.append(path)

    def check(self, ok: torch.Tensor, indices: torch.Tensor, items) -> torch.Tensor:
        """Record the failures of a loader batch; return the mask of the good samples."""
        ok = ok.bool()
        for i in indices[~ok].tolist():
            self.record(items[i].path)
        return ok

    def summary(self) -> str | None:
        if not self.paths:
            return None
        return f"skipped {len(self.paths)} unreadable image(s), first: {', '.join(self.paths[:3])}"


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Normalised B×3×H×W (or 3×H×W) → [0, 1], clamped (generators have no output tanh)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B×C×H×W, C = 3, or 1 shown as grey) → the normalised space."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    return (x.expand(*x.shape[:-3], 3, *x.shape[-2:]) - mean) / std


def to_pil(x: torch.Tensor) -> Image.Image:
    """A normalised 3×H×W tensor as an RGB picture."""
    array = (denormalize(x.detach().float().cpu()) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


def image_grid(rows: list[list[torch.Tensor | None]], pad: int = 2, background=(255, 255, 255)) -> Image.Image:
    """Paste normalised 3×H×W tensors in a grid; ``None`` leaves a cell empty."""
    cells = [c for row in rows for c in row if c is not None]
    h, w = cells[0].shape[-2:]
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncols * (w + pad) + pad, len(rows) * (h + pad) + pad), background)
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            if cell is not None:
                canvas.paste(to_pil(cell), (pad + j * (w + pad), pad + i * (h + pad)))
    return canvas


def eval_transform(size: tuple[int, int]) -> T.Compose:
    """Resize (bicubic) and normalise: what every network here sees at inference."""
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_batch(paths: list[str], size: tuple[int, int]) -> torch.Tensor:
    """Image files → a normalised B×3×H×W tensor."""
    transform = eval_transform(size)
    return torch.stack([transform(decode_image(p)) for p in paths])


# -- in-memory images (the service and the batch workers) ---------------------------------------
# Formats accepted from clients: the common photo formats only, so an upload never reaches the
# rarer (and less hardened) decoders PIL also ships.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


class ImageTooLarge(ReidgenError):
    """An image with more pixels than allowed (checked from its header, before decoding)."""


def decode_image_bytes(data: bytes, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Decode an encoded image (PNG, JPEG, WebP, BMP) fully as RGB.

    The pixel count is checked from the header before any pixel is decoded, so an oversized
    or decompression-bomb upload costs nothing. Any decoder failure on these bytes is the
    sender's bad input (`UnreadableImage`), whatever PIL raised internally.
    """
    try:
        im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        w, h = im.size
    except Image.DecompressionBombError:
        raise ImageTooLarge(f"{what}: far more pixels than this server takes ({max_pixels} per image)") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, struct.error... on garbage
        raise UnreadableImage(f"{what}: not an image the server can read (PNG, JPEG, WebP or BMP expected; "
                              f"{type(exc).__name__})") from None
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(f"{what}: {w}×{h} = {w * h} pixels; this server takes at most {max_pixels} per image")
    try:
        with im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise UnreadableImage(f"{what}: the image data is corrupt or truncated ({type(exc).__name__})") from None


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 92) -> bytes:
    """A picture as PNG (lossless, the default) or JPEG bytes."""
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # fast: these are small, short-lived images
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image format {fmt!r}; expected png or jpeg")
    return buf.getvalue()


def mask_to_pil(mask: torch.Tensor) -> Image.Image:
    """A [0, 1] 1×H×W (or H×W) mask as a greyscale picture (white = 1)."""
    array = (mask.detach().float().cpu().clamp(0, 1).reshape(mask.shape[-2:]) * 255).round().byte().numpy()
    return Image.fromarray(array)  # 2-D uint8: mode L
