"""A train command under torchrun with two CPU processes (gloo), and what every such run must show:
the ranks end with the same weights, and rank 0 alone wrote the run folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reidgen.core.checkpoint import Checkpoint
from trainer.runlog import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def run_two_ranks(args: list[str], port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    """``reidgen ARGS`` on two ranks; each rank runs one torch thread (the machine is small)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "reidgen", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def check_two_rank_run(out: Path, kind: str, loss_key: str, steps: int) -> None:
    """One log line per step and one end record (two writers would append two), the end record
    saying the ranks' weights agree, and a checkpoint holding both ranks' RNG states."""
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if loss_key in r] == list(range(1, steps + 1))
    (end,) = [r for r in records if r.get("event") == "end"]
    assert end["ranks"] == 2 and end["ranks_in_sync"] is True, end
    ckpt = Checkpoint.read(out, kind)
    assert ckpt["step"] == steps and len(ckpt.rng_states) == 2
    assert set(ckpt["models"]) and set(ckpt["optimizers"])
    assert not list(out.rglob("*.tmp")), "a half-written checkpoint was left behind"
