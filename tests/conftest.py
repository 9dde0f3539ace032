"""Shared fixtures: the real data sets (read in place, never copied) and small run helpers."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import torch

from reidgen.core.market import link_subset
from reidgen.core.paths import data_root
from tests import error_bodies

# `make test` runs two pytest-xdist workers on the 2 CI cores: each takes one intra-op thread, so
# that the two never oversubscribe the cores (alone, a run keeps two).
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
os.environ.setdefault("OMP_NUM_THREADS", "1" if _XDIST_WORKER else "2")
if _XDIST_WORKER:
    torch.set_num_threads(1)
# Every app a test makes records its 4xx answers: tests/test_error_bodies.py, run last in its
# process, checks that none holds a server root's path (issue 23, item 2); with several workers the
# controller checks the leaks every worker logged once all have finished (`pytest_sessionfinish`).
error_bodies.install()


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers)
        config.leak_log = Path(tempfile.mkdtemp(prefix="reidgen-4xx-")) / "leaks.txt"
        config.leak_log.touch()
    error_bodies.LEAK_LOG = Path(config.workerinput["leak_log"]) if hasattr(config, "workerinput") else config.leak_log


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: each worker logs its leaks where the controller reads them."""
    node.workerinput["leak_log"] = str(node.config.leak_log)


def pytest_sessionfinish(session, exitstatus):
    log = getattr(session.config, "leak_log", None)
    if log is None or not log.is_file():
        return
    found = log.read_text().splitlines()
    shutil.rmtree(log.parent, ignore_errors=True)
    if found:
        print(f"\n{len(found)} 4xx bodies of this run hold a server root's path:\n" + "\n".join(found[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items):
    """The check over every 4xx body of the run goes last, after every test that made one."""
    last = [item for item in items if item.nodeid.startswith("tests/test_error_bodies.py")]
    items[:] = [item for item in items if item not in last] + last


def _dataset(name: str) -> Path:
    path = data_root() / name
    if not path.is_dir():
        pytest.skip(f"real data {path} not found (set REIDGEN_DATA)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than
    two competing with other work (a server's threads, worker processes). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def market_mini() -> Path:
    return _dataset("market1501_mini")


@pytest.fixture(scope="session")
def cuhk_mini() -> Path:
    return _dataset("cuhk03_mini")


@pytest.fixture(scope="module")
def data6(market_mini, tmp_path_factory):
    """Six identities of market1501_mini, linked in place: DG-Net trainer tests."""
    return link_subset(market_mini, tmp_path_factory.mktemp("m6"), ids=6)


@pytest.fixture(scope="module")
def teacher6(data6, tmp_path_factory):
    """A one-epoch tiny re-id model on ``data6``: the DG-Net teacher of those tests."""
    from trainer.tasks.reid import preset_config, train_reid

    cfg = preset_config("tiny", data=str(data6), epochs=1, workers=0, evaluate=False)
    return train_reid(cfg, tmp_path_factory.mktemp("teacher6"), progress=False)


@pytest.fixture(scope="session")
def tiny_dgnet(market_mini, tmp_path_factory) -> dict:
    """A real DG-Net checkpoint and its teacher from a few iterations on 4 identities of
    market1501_mini (the batch-generation tests need real checkpoints, not good ones)."""
    import torch

    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet
    from trainer.tasks.reid import preset_config, train_reid

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny_dgnet")
    data = link_subset(market_mini, root / "data", ids=4)
    teacher = train_reid(preset_config("tiny", data=str(data), epochs=1, workers=0, evaluate=False),
                         root / "teacher", progress=False)
    dgnet = train_dgnet(dgnet_preset_config("small", data=str(data), teacher=str(teacher), backbone="small_cnn",
                                            pretrained="none", workers=0, batch_size=4, grid_every=0, amp=False,
                                            iterations=2, checkpoint_every=10_000, quality_every=0), root / "dgnet",
                        progress=False)
    torch.set_num_threads(threads)
    return {"root": root, "data": data, "teacher": teacher, "dgnet": dgnet}


@pytest.fixture(scope="session")
def make_shards(tiny_dgnet):
    """``make_shards(out, **spec)``: a shard job of the tiny DG-Net run in-process into ``out``."""
    from api_schemas.jobs import JobSpec
    from worker.run import run_job

    def make(out: Path, **spec) -> Path:
        job = JobSpec(kind="dgnet_random_structures", checkpoint=str(tiny_dgnet["dgnet"]),
                      data=str(tiny_dgnet["data"]), structures_per_image=2, batch_size=4, top_k=3, **spec)
        run_job(job, out, device="cpu", progress=False)
        return out
    return make


# The jobs tests' Redis database: apart from the default one a developer's own jobs may use.
TEST_DB = 13


@pytest.fixture(scope="module")
def broker():
    """An isolated broker (a Redis database, a key prefix and a queue of this run), removed after."""
    import redis

    base = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    url = urlunsplit(base._replace(path=f"/{TEST_DB}"))
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {url} ({exc})")
    tag = uuid.uuid4().hex[:8]
    env = {"REDIS_URL": url, "REIDGEN_REDIS_PREFIX": f"reidgen-test-{tag}:", "REIDGEN_QUEUE": f"shards-{tag}"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield {"client": client, "prefix": env["REIDGEN_REDIS_PREFIX"]}
    for key in client.scan_iter(f"{env['REIDGEN_REDIS_PREFIX']}*"):
        client.delete(key)
