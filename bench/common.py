"""What every benchmark script records besides its own figures: the machine it ran on and a
timestamp, written as ``bench/results/<name>.json``.

    from bench.common import machine_info, write_results

    write_results("generate", {"device": "cuda:0", "results": {...}})   # → bench/results/generate.json

The scripts are run as ``python bench/<name>.py``; they put the repository root on ``sys.path``
before importing this module, and ``bench`` imports as a namespace package (no ``__init__.py``).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info(device: str | None = None) -> dict:
    """CPU count, torch threads, load average, platform, Python and torch versions, the device the
    benchmark ran on (as the script names it, e.g. ``"cpu"`` or ``"cuda:0"``; None if it does not
    say) and the GPU's name (None without CUDA)."""
    # Imported here so that merely importing this module stays cheap (torch takes seconds).
    import torch

    gpu = None
    if torch.cuda.is_available():
        # The GPU the benchmark used when it ran on one, else the default one: a present GPU is
        # part of the machine even when a benchmark runs on the CPU.
        gpu = torch.cuda.get_device_name(torch.device(device) if device and device.startswith("cuda") else None)
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # The machines are shared: other processes compete for the CPU, so the load is part of
        # what a figure means.
        "load_average_1_5_15min": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "device": device,
        "gpu": gpu,
    }


def write_results(name: str, payload: dict, *, path: Path | None = None) -> Path:
    """Write ``payload`` as the JSON record of benchmark ``name`` and return where it went.

    The record is ``benchmark`` (= name), ``timestamp`` (UTC, ISO 8601, seconds), then the
    payload's own keys, then ``machine`` = `machine_info` of the payload's ``device`` key (if any),
    unless the payload brings its own ``machine`` (a script adding versions of its own, say).
    It goes to ``bench/results/<name>.json`` unless ``path`` says otherwise (a script's --out).
    """
    record = {"benchmark": name, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
    if "machine" not in record:
        # Taken now, at the end of the run, so the load average covers the measurement.
        record["machine"] = machine_info(payload.get("device"))
    out = Path(path) if path is not None else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def run_child(script: str, *args: str) -> dict:
    """Run ``python script args...`` (a benchmark measuring in a process of its own, so that
    its peak memory is its own) and return the JSON object on its last line of output."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{Path(script).name} {' '.join(args[:2])} failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])
