"""The ``cuda`` marker (registered in pyproject.toml) with its skip: ``@needs_cuda`` marks a test
``cuda`` and skips it where CUDA is not available. `bench/gpu_check.py` runs ``pytest -m cuda``."""
from __future__ import annotations

import pytest
import torch


def needs_cuda(fn):
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.cuda(skip(fn))
