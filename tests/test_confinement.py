"""Issue 23, item 1: a worker's writes stay in its shards root while the folder is swapped under it.

A job is checked once (`worker.plans.locate`); the shards are then written through descriptors
opened below the shards root without following a symlink (`reidgen.core.confined.Folder`). Here a
thread swaps the job's folder for a symlink to a folder outside the root and back, as fast as it
can, while the worker's code makes ten shards of a real tiny DG-Net: nothing may land outside.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from pathlib import Path

import pytest

from api_schemas.jobs import JobSpec
from generator_service.http import Settings
from reidgen.core.errors import ReidgenError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


class Swapper(threading.Thread):
    """Swap ``folder`` for a symlink to ``outside`` and back, over and over, until stopped."""

    def __init__(self, folder: Path, outside: Path):
        super().__init__(daemon=True)
        self.folder, self.outside = folder, outside
        self.aside = folder.with_name(folder.name + "-aside")
        self.stopped = threading.Event()
        self.swaps = 0

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                os.rename(self.folder, self.aside)
            except FileNotFoundError:  # the name is empty for a moment: try again
                continue
            try:
                os.symlink(self.outside, self.folder)
            except FileExistsError:  # the worker made the folder anew in the gap: put things back, again
                self._put_back()
                continue
            time.sleep(0.002)
            os.unlink(self.folder)
            self.swaps += 1
            self._put_back()
            time.sleep(0.002)

    def _put_back(self) -> None:
        """The real folder back at its name; one the worker made anew in the gap is moved aside."""
        while True:
            try:
                os.rename(self.aside, self.folder)
                return
            except OSError:
                os.rename(self.folder, self.folder.with_name(f"stray-{self.swaps}-{time.monotonic_ns()}"))

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)
        if self.folder.is_symlink():
            self.folder.unlink()
        if self.aside.exists():
            self._put_back()


def test_a_folder_swapped_for_a_symlink_while_a_job_runs_gets_nothing_outside(tiny_dgnet, tmp_path):
    from worker.plans import locate, make_plan
    from worker.run import generate_shard, load_runtime

    shards, outside = tmp_path / "shards", tmp_path / "outside"
    shards.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("the outside folder's own file")
    settings = Settings(models_root=tiny_dgnet["root"], data_root=tiny_dgnet["root"], shards_root=shards)
    spec = JobSpec(kind="dgnet_random_structures", checkpoint="dgnet", data="data", subset=10,
                   structures_per_image=1, shard_size=1, batch_size=1, seed=3, soft_labels=False)
    located = locate(spec, "race1", settings)
    assert make_plan(spec, located.data).shards == 10
    runtime = load_runtime(spec, "cpu", located)
    (shards / "race1").mkdir()
    swapper = Swapper(shards / "race1", outside)
    outcomes: list[str] = []
    internal: list[str] = []  # the tracebacks of internal errors, for the failure's message
    swapper.start()
    try:
        # The same ten shards again and again (skipped when done, made when refused before), three
        # rounds at least and until the swapper has had its turns: a loaded machine starves its thread.
        rounds = 0
        while rounds < 3 or (swapper.swaps <= 10 and rounds < 40):
            rounds += 1
            for index in range(10):
                try:
                    # A task checks its names first (`locate`), then writes: the race is between the two.
                    job = locate(spec, "race1", settings)
                    outcomes.append(generate_shard(spec, index, "race1", runtime, located=job, device="cpu").status)
                except ReidgenError as exc:
                    assert str(settings.shards_root) not in str(getattr(exc, "public", "") or "")
                    outcomes.append(exc.code)
                except Exception as exc:  # noqa: BLE001 - counted: an internal error fails the test below
                    outcomes.append(type(exc).__name__)
                    internal.append(traceback.format_exc())
    finally:
        swapper.stop()
    assert files_under(outside) == ["keep.txt"], (files_under(outside), outcomes)
    assert swapper.swaps > 10, swapper.swaps
    # Every refusal is the client's error about its folder, and shards that were made are whole.
    assert set(outcomes) <= {"done", "skipped", "lost-race", "bad_request", "path_not_allowed"}, (outcomes,
                                                                                                  internal[:1])
    # Shards were made (in the real folder, or in one the worker made anew in a gap of the swap),
    # and no temporary folder is left behind anywhere.
    assert "done" in outcomes and list(shards.glob("*/shard-*/manifest.json")), (outcomes, files_under(shards))
    assert not list(shards.glob("*/.shard-*")), files_under(shards)
    print(f"{swapper.swaps} swaps; outcomes {sorted(outcomes)}")


def test_a_folder_walk_refuses_symlinks_at_every_component(tmp_path):
    from reidgen.core.confined import Folder, NotConfined

    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a" / "b").mkdir(parents=True)
    outside.mkdir()
    (root / "a" / "link").symlink_to(outside)
    (root / "a" / "file").write_text("x")
    (root / "a" / "b" / "to-file").symlink_to(root / "a" / "file")
    with Folder.below(root, ("a", "b")) as b:
        assert b.kind("to-file") == "link"
        with pytest.raises(NotConfined):
            b.read_bytes("to-file")
        with pytest.raises(FileExistsError):
            b.write_new("to-file", b"no")
        b.write_atomic("ok.json", b"{}")
    for parts in (("a", "link"), ("a", "link", "deeper"), ("a", "file")):
        with pytest.raises(NotConfined):
            Folder.below(root, parts, create=True)
    assert list(outside.iterdir()) == [] and (root / "a" / "b" / "ok.json").read_text() == "{}"
    # The descriptor's path is the folder itself, wherever its name leads afterwards.
    with Folder.below(root, ("a", "b")) as b:
        os.rename(root / "a" / "b", root / "a" / "moved")
        (root / "a" / "b").symlink_to(outside)
        Path(b.path, "through-fd").write_text("here")
    assert (root / "a" / "moved" / "through-fd").is_file() and list(outside.iterdir()) == []


def test_a_folder_renamed_away_between_make_and_open_is_made_again(tmp_path, monkeypatch):
    """The gap the swap test hit as a crash: ``mkdir`` finds the name taken, and before the open the
    name is renamed away. The folder is made again; renamed away every time, it is refused."""
    from reidgen.core import confined
    from reidgen.core.confined import Folder, NotConfined

    real_mkdir, taken = os.mkdir, {"times": 1}

    def mkdir_of_a_name_taken_then_gone(name, mode=0o777, *, dir_fd=None):
        if taken["times"] > 0:  # someone else's folder stood there, then was renamed away
            taken["times"] -= 1
            raise FileExistsError(name)
        return real_mkdir(name, mode, dir_fd=dir_fd)

    monkeypatch.setattr(confined.os, "mkdir", mkdir_of_a_name_taken_then_gone)
    with Folder.below(tmp_path, ("job",), create=True) as job:
        job.write_new("x", b"1")
    assert (tmp_path / "job" / "x").read_bytes() == b"1"
    taken["times"] = 10**6
    with pytest.raises(NotConfined, match="renamed away"):
        Folder.below(tmp_path, ("other",), create=True)


def test_serve_refuses_a_model_whose_symlink_leads_out_of_the_models_folder(tiny_dgnet, tmp_path):
    """Item 1, the models root: a job naming such a model is refused, so `serve` refuses it too."""
    import shutil

    from generator_service.inference.engine import Engine

    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    shutil.copyfile(tiny_dgnet["dgnet"], models / "inside.pt")
    shutil.copyfile(tiny_dgnet["dgnet"], outside / "elsewhere.pt")
    (models / "escape.pt").symlink_to(outside / "elsewhere.pt")
    (models / "alias.pt").symlink_to(models / "inside.pt")  # a link that stays inside is the operator's choice
    engine = Engine.from_models_dir(models, "cpu")
    assert sorted(m.name for m in engine.models.values()) == ["alias", "inside"]
    assert "leads outside the models folder" in engine.refused["escape"].reason
    assert str(outside) not in engine.refused["escape"].reason and str(models) not in engine.refused["escape"].reason
