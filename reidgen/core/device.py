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


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def amp_dtype(device: torch.device, enabled: bool, cpu: bool = False, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype, or None for fp32. On CUDA: bf16 where the GPU has it (no loss scaling
    needed), else fp16 (which needs a `GradScaler` in training); ``precision`` forces one ("fp32",
    "bf16", "fp16"; "auto": the rule above). On the CPU only bf16: forced, or with "auto" when
    ``cpu`` is asked for too and the CPU has native bf16 (AVX512-BF16 or AMX; it pays only there,
    and only for some models)."""
    if precision not in PRECISIONS:
        raise ReidgenError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if not enabled or precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cpu" and (precision == "bf16" or (precision == "auto" and cpu and cpu_has_native_bf16())):
        return torch.bfloat16  # fp16 autocast is a CUDA mode: the CPU stays in fp32
    return None


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX)? Elsewhere bf16 is emulated and
    slower than fp32, so a preset's bf16 default (``cpu_bf16``) stays fp32 there."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(device: torch.device, enabled: bool, cpu: bool = False, precision: str = "auto"):
    """Autocast in `amp_dtype`'s dtype; a null context for fp32."""
    dtype = amp_dtype(device, enabled, cpu, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
