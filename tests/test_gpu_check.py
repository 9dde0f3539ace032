"""bench/gpu_check.py --dry-run: every path of the device check once on the CPU (tiny presets,
2 iterations), so that the script cannot rot before a GPU comes; and its one line without CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)


@pytest.mark.skip(reason="the CPU dry run does not pass yet (issue 24 is open): a failing path in bench/gpu_check.py "
                         "--dry-run must be fixed before this test is enabled")
def test_dry_run_exercises_every_check(market_mini, tmp_path):
    out = tmp_path / "dry.json"
    proc = _run(["--dry-run", "--out", str(out), "--data", str(market_mini)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["failed"] == []
    assert set(report["checks"]) == {"pytest_cuda", "dgnet_precisions", "crgan_precisions", "resume_across_devices",
                                     "engine", "serve", "generate"}
    for kind in ("dgnet", "crgan"):
        runs = report["checks"][f"{kind}_precisions"]["runs"]
        assert set(runs) == {"fp32", "bf16", "fp16"} and all(r["iterations"] == 2 for r in runs.values())
    assert report["checks"]["engine"]["oom_split"]["halvings_logged"] > 0
    assert "ratios_by_clients" in report["checks"]["serve"]["results"]
    assert "results" in report["checks"]["generate"]["results"]


def test_without_cuda_one_line_and_success(tmp_path):
    if torch.cuda.is_available():
        return  # the real check would run
    proc = _run([], tmp_path)
    assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1 and "no CUDA" in proc.stdout
