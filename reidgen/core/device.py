"""Device and mixed-precision choices: one home for the engine, the trainers and the evaluator."""
from __future__ import annotations

import contextlib

import torch

from reidgen.core.errors import ReidgenError


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReidgenError(f"device {name} requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool, cpu: bool = False):
    """bf16 autocast on CUDA (no loss scaling needed); on the CPU only when ``cpu`` is asked for
    too (it pays only on CPUs with native bf16, e.g. AVX512-BF16 or AMX, and only for some models)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if enabled and cpu and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
