"""Checkpoint files: one format for every model kind, written atomically, refused clearly.

A checkpoint is a dict::

    {"format": "reidgen", "version": 1, "kind": "reid" | "dgnet" | "crgan" | ...,
     "model_config": {...}, "label_map": [pid, ...], "model": state_dict, ...extra}

Training checkpoints add optimiser state, step/epoch and RNG states (see the trainers).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from reidgen.errors import ReidgenError

FORMAT, VERSION = "reidgen", 1


def save_checkpoint(path: str | Path, kind: str, payload: dict) -> Path:
    """Write to a temporary name and rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, "kind": kind, **payload}, tmp)
    os.replace(tmp, path)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file or a run folder (its checkpoints/last.pt)."""
    p = Path(path)
    return p / "checkpoints" / "last.pt" if p.is_dir() else p


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...]) -> dict:
    """Load a checkpoint (file or run folder) and check it is ours and of the expected kind(s)."""
    path = resolve_checkpoint(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if not path.is_file():
        raise ReidgenError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any unpickling failure means "not a checkpoint we can read"
        raise ReidgenError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ReidgenError(f"{path} is not a reidgen checkpoint (expected one written by reidgen train-*)")
    if ckpt.get("version") != VERSION:
        raise ReidgenError(f"checkpoint {path} has format version {ckpt.get('version')}, this reidgen reads {VERSION}")
    if ckpt["kind"] not in kinds:
        expected = " or ".join(map(repr, kinds))
        raise ReidgenError(f"checkpoint {path} holds a {ckpt['kind']!r} model; expected {expected}")
    return ckpt


def load_state(module: torch.nn.Module, state: dict, what: str) -> None:
    """Load a state dict strictly, turning a mismatch into a clear refusal."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: another class count or architecture
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise ReidgenError(f"{what} does not match this model: {first.strip()}") from None
    if missing or unexpected:
        raise ReidgenError(
            f"{what} does not match this model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


def file_identity(path: str | Path) -> str:
    """Short content hash, to name which checkpoint produced something."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
