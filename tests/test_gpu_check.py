"""bench/gpu_check.py --dry-run: every path of the device check once on the CPU (tiny presets,
2 iterations), so that the script cannot rot before a GPU comes; and its one line without CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)


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


def test_the_bundle_reaches_children_through_their_env_only(tmp_path, monkeypatch):
    """`use_bundle` unpacks the wheels onto this process's path and returns the children's
    variables (PYTHONPATH, and REIDGEN_DATA unless it is set); os.environ is left as it was."""
    import zipfile

    from bench import gpu_check

    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(bundle / "wheels" / "tinypkg-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("tinypkg/__init__.py", "VALUE = 7\n")
    (bundle / "data" / "market1501_mini").mkdir(parents=True)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delenv("REIDGEN_DATA", raising=False)
    before = dict(os.environ)
    wheels, child = gpu_check.use_bundle(bundle)
    assert wheels == ["tinypkg-1.0-py3-none-any.whl"] and (bundle / "site" / "tinypkg" / "__init__.py").is_file()
    assert sys.path[0] == str(bundle / "site")
    assert child == {"PYTHONPATH": os.pathsep.join((str(bundle / "site"), str(REPO))),
                     "REIDGEN_DATA": str(bundle / "data")}
    assert dict(os.environ) == before
    assert gpu_check.find_data("market1501_mini", child["REIDGEN_DATA"]) == bundle / "data" / "market1501_mini"
    monkeypatch.setenv("REIDGEN_DATA", str(tmp_path))  # the caller's data root wins over the bundle's
    assert "REIDGEN_DATA" not in gpu_check.use_bundle(bundle)[1]
