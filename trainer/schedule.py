"""Learning-rate schedules as pure functions of training progress.

Being functions of (progress) rather than stateful objects, they resume exactly from a step
count alone. ``progress`` is in whatever unit the milestones use (epochs or iterations).
"""
from __future__ import annotations

import bisect


def warmup_step_factor(progress: float, *, warmup: float = 0.0, warmup_factor: float = 0.1,
                       milestones: tuple[float, ...] = (), gamma: float = 0.1) -> float:
    """Linear warm-up from ``warmup_factor`` to 1 over ``warmup``, then ×gamma at each milestone."""
    factor = gamma ** bisect.bisect_right(sorted(milestones), progress)
    if warmup > 0 and progress < warmup:
        factor *= warmup_factor + (1.0 - warmup_factor) * progress / warmup
    return factor


def constant_then_linear_factor(progress: float, total: float) -> float:
    """Constant for the first half, then linear decay to 0 at ``total`` (CR-GAN)."""
    half = total / 2
    return 1.0 if progress < half else max(0.0, (total - progress) / (total - half))


def set_lr(optimizer, factor: float) -> None:
    """Scale every parameter group's ``initial_lr`` by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
