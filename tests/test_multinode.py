"""Training on two machines (issue 26, item 3), simulated on one: two ``torchrun`` launches, each a
"node" of one CPU process, meet through the c10d rendezvous on 127.0.0.1 and train with gloo, as
``torchrun --nnodes 2 --node-rank {0,1} --rdzv-backend c10d --rdzv-endpoint HOST:PORT
--nproc-per-node 1`` does on two machines.

- ``train-reid`` on real images plus shards, both nodes writing to the same ``--out`` (storage
  both machines share): one writer, one log, and the nodes' parameter checksums agree;
- ``train-dgnet`` with an ``--out`` of each node's own (a local disk): the node of rank 0 writes
  the run, the other keeps its own copy of the checkpoint, and the two copies hold the same weights.

Which launch gets rank 0 is the rendezvous's choice (torchrun ignores ``--node-rank`` with c10d),
so the tests find it instead of assuming it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from reidgen.core.checkpoint import Checkpoint
from trainer.runlog import read_jsonl

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(args: list[str], outs: tuple[Path, Path], timeout: int = 600) -> list[str]:
    """``reidgen ARGS --out OUT_i`` as node i of two, each one process with one torch thread; the
    two launches' outputs."""
    endpoint, rdzv_id = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:12]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for node, out in enumerate(outs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
               "--rdzv-id", rdzv_id, "-m", "reidgen", *args, "--out", str(out)]
        # Each launch in a session of its own: a launch that hangs is killed with the workers it started.
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    return outputs


def end_record(out: Path) -> dict:
    (end,) = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "end"]
    return end


@pytest.fixture(scope="module")
def shards(make_shards, tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("multinode-shards"), subset=8, shard_size=8, seed=2)


def test_train_reid_on_shards_across_two_nodes_sharing_the_run_folder(tiny_dgnet, shards, tmp_path):
    out = tmp_path / "shared-run"
    outputs = run_two_nodes(["train-reid", "--real", str(tiny_dgnet["data"]), "--shards", str(shards),
                             "--preset", "tiny", "--batch-size", "8", "--synthetic-ratio", "0.5", "--max-steps", "3",
                             "--workers", "0", "--no-eval", "--device", "cpu"], (out, out))
    assert sum(text.count("checkpoint: ") for text in outputs) == 1  # rank 0 alone reports (and wrote)
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["synthetic"] == 4 for r in steps)
    end = end_record(out)
    assert end["ranks"] == 2 and end["ranks_in_sync"] is True and len(set(end["parameter_checksums"])) == 1, end
    assert end["checkpoint_copies"] == [] and len(end["hosts"]) == 2  # one folder: no node kept a copy
    ckpt = Checkpoint.read(out, "reid")
    assert ckpt["step"] == 3 and len(ckpt.rng_states) == 2 and "fine_head" in ckpt.models
    assert not [p for p in out.iterdir() if p.name.startswith(".rank0-")]  # the shared-folder marker is gone


def test_train_dgnet_across_two_nodes_each_with_its_own_folder(tiny_dgnet, tmp_path):
    outs = (tmp_path / "node0", tmp_path / "node1")
    run_two_nodes(["train-dgnet", "--data", str(tiny_dgnet["data"]), "--teacher", str(tiny_dgnet["teacher"]),
                   "--backbone", "small_cnn", "--pretrained", "none", "--iterations", "3", "--batch-size", "4",
                   "--workers", "0", "--grid-every", "0", "--quality-every", "0", "--device", "cpu"], outs)
    main = [o for o in outs if (o / "metrics.jsonl").is_file()]
    assert len(main) == 1, "one node (rank 0's) writes the run log"
    (main,) = main
    (other,) = [o for o in outs if o != main]
    end = end_record(main)
    assert end["ranks"] == 2 and end["ranks_in_sync"] is True and end["checkpoint_copies"] == [1], end
    # The other node kept its own copy of the checkpoint (and the config), without a log of its own.
    assert sorted(p.name for p in other.iterdir()) == ["checkpoints", "config.json"]
    a, b = Checkpoint.read(main, "dgnet"), Checkpoint.read(other, "dgnet")
    assert a["step"] == b["step"] == 3 and len(a.rng_states) == len(b.rng_states) == 2
    assert a.models.keys() == b.models.keys()
    for name in a.models:
        sa, sb = a.models[name], b.models[name]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}.{key} differs between the nodes"
