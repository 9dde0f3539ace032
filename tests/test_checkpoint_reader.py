"""The one checkpoint reader: a file is parsed once, run folders resolve in one place, and a model
records the teacher it was trained with by content, so a changed teacher file is noticed."""
from __future__ import annotations

import shutil

import pytest
import torch

import reidgen.core.checkpoint as checkpoint_module
from api_schemas.jobs import JobSpec
from generator_service.models.dgnet import DGNet
from generator_service.models.reid import ReidNet
from reidgen.core.checkpoint import (
    Checkpoint,
    file_identity,
    read_plain,
    resolve_checkpoint,
    run_checkpoint,
    run_folder,
    save_checkpoint,
)
from reidgen.core.errors import ReidgenError


def test_run_folders_resolve_in_one_place(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert run_checkpoint(run) == run / "checkpoints" / "last.pt"
    assert resolve_checkpoint(run) == run_checkpoint(run)
    assert resolve_checkpoint(tmp_path / "model.pt") == tmp_path / "model.pt"
    assert run_folder(run_checkpoint(run, "step_0000010.pt")) == run
    assert run_folder(run) == run
    assert run_folder(tmp_path / "models" / "market.pt") == tmp_path / "models"


def test_older_payload_layouts_are_still_read(tmp_path):
    """Before the one loop: re-id wrote model/optimizer (+ fine_head) and one RNG state, DG-Net a
    list of optimisers; the reader names them as the new models{}/optimizers{}/rng[] layout does."""
    weights, head = {"w": torch.ones(2)}, {"h": torch.zeros(1)}
    sgd = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
    rng = {"torch": torch.get_rng_state()}
    save_checkpoint(tmp_path / "reid.pt", "reid", {"model": weights, "fine_head": head, "optimizer": sgd,
                                                   "rng": rng, "step": 3, "label_map": [1]})
    old = Checkpoint.read(tmp_path / "reid.pt", "reid")
    assert set(old.models) == {"model", "fine_head"} and torch.equal(old.state["w"], weights["w"])
    assert old.optimizer_states(("model",)) == {"model": sgd} and len(old.rng_states) == 1
    save_checkpoint(tmp_path / "dgnet.pt", "dgnet", {"model": weights, "optimizers": [sgd, sgd, sgd],
                                                     "rng": [rng, rng], "step": 3, "label_map": [1]})
    old = Checkpoint.read(tmp_path / "dgnet.pt", "dgnet")
    assert set(old.optimizer_states(("ea", "gen", "dis"))) == {"ea", "gen", "dis"} and len(old.rng_states) == 2
    save_checkpoint(tmp_path / "new.pt", "crgan", {"models": {"gen": weights}, "optimizers": {"g": sgd},
                                                   "rng": [rng], "step": 3, "label_map": [1]})
    new = Checkpoint.read(tmp_path / "new.pt", "crgan")
    assert set(new.models) == {"gen"} and new.optimizer_states(("g", "d")) == {"g": sgd}
    with pytest.raises(ReidgenError, match="holds no single model"):
        new.state


def test_a_checkpoint_is_read_once_and_names_its_parts(tiny_dgnet, monkeypatch):
    reads = []
    monkeypatch.setattr(checkpoint_module, "read_plain", lambda path, *a: reads.append(path) or read_plain(path, *a))
    ckpt = Checkpoint.read(tiny_dgnet["dgnet"].parent.parent, "dgnet")  # the run folder
    net, same = DGNet.from_checkpoint(ckpt)
    assert same is ckpt and reads == [tiny_dgnet["dgnet"]]
    assert ckpt.kind == "dgnet" and ckpt.step == 2 and len(ckpt.label_map) == 4
    assert ckpt.train_config["teacher"] == str(tiny_dgnet["teacher"])
    assert ckpt.lineage["teacher"] == {"path": str(tiny_dgnet["teacher"]),
                                       "sha256_16": file_identity(tiny_dgnet["teacher"])}
    assert not net.training
    with pytest.raises(ReidgenError, match="holds a 'dgnet' model; expected 'reid'"):
        ReidNet.from_checkpoint(tiny_dgnet["dgnet"])


def test_the_engine_reads_a_checkpoint_it_is_given_no_second_time(tiny_dgnet, monkeypatch):
    from generator_service.inference.engine import Engine

    ckpt = Checkpoint.read(tiny_dgnet["dgnet"], "dgnet")
    monkeypatch.setattr(checkpoint_module, "read_plain", lambda *a: pytest.fail("read again"))
    engine = Engine.from_checkpoint(ckpt, "cpu")
    (model,) = engine.models.values()
    assert model.name == "dgnet" and model.identity == file_identity(tiny_dgnet["dgnet"])



def test_a_crgan_checkpoint_is_read_once(tmp_path, monkeypatch):
    from generator_service.inference.engine import Engine
    from generator_service.models.crgan import ContextRenderer
    from tests.test_kinds import write_tiny_crgan

    path = write_tiny_crgan(tmp_path / "run" / "checkpoints" / "last.pt", binary_masks=True)
    reads = []
    monkeypatch.setattr(checkpoint_module, "read_plain", lambda p, *a: reads.append(p) or read_plain(p, *a))
    ckpt = Checkpoint.read(tmp_path / "run", "crgan")
    renderer, same = ContextRenderer.from_checkpoint(ckpt)
    assert same is ckpt and renderer.binary_masks and renderer.image_size == (128, 64)
    engine = Engine.from_checkpoint(ckpt, "cpu")
    assert reads == [path]  # the engine took the file already read
    (model,) = engine.models.values()
    assert model.name == "run" and model.kind == "crgan" and model.identity == file_identity(path)
    with pytest.raises(ReidgenError, match="holds a 'crgan' model; expected 'dgnet'"):
        DGNet.from_checkpoint(path)

def _changed_copy(teacher, out):
    """The teacher's file with one weight nudged: same shapes and classes, other content."""
    ckpt = read_plain(teacher)
    weights = ckpt["models"]["model"]
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 0.01
    save_checkpoint(out, ckpt.pop("kind"), {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return out


def test_a_batch_job_refuses_soft_labels_from_a_changed_teacher(tiny_dgnet, tmp_path):
    from worker import run as worker_run

    teacher = shutil.copy(tiny_dgnet["teacher"], tmp_path / "teacher.pt")
    ckpt = read_plain(tiny_dgnet["dgnet"])
    ckpt["train_config"]["teacher"] = str(teacher)
    ckpt["lineage"] = {"teacher": {"path": str(teacher), "sha256_16": file_identity(teacher)}}
    dgnet = save_checkpoint(tmp_path / "dgnet.pt", "dgnet",
                            {k: v for k, v in ckpt.items() if k not in ("format", "version", "kind")})
    spec = JobSpec(kind="dgnet_random_structures", checkpoint=str(dgnet), data=str(tiny_dgnet["data"]))
    worker_run._RUNTIMES.clear()
    assert worker_run.load_runtime(spec, "cpu").teacher is not None  # the recorded file: accepted

    _changed_copy(teacher, teacher)
    worker_run._RUNTIMES.clear()
    with pytest.raises(ReidgenError, match="has changed since training") as caught:
        worker_run.load_runtime(spec, "cpu")
    assert caught.value.code == "bad_teacher"
    # Without soft labels the teacher does not matter; a teacher named by the spec is the client's choice.
    worker_run._RUNTIMES.clear()
    assert worker_run.load_runtime(spec.model_copy(update={"soft_labels": False}), "cpu").teacher is None
    worker_run._RUNTIMES.clear()
    assert worker_run.load_runtime(spec.model_copy(update={"teacher": str(teacher)}), "cpu").teacher is not None
    worker_run._RUNTIMES.clear()


def test_resuming_with_a_changed_teacher_is_refused(tiny_dgnet, tmp_path):
    from trainer.tasks.dgnet import dgnet_preset_config, train_dgnet

    teacher = shutil.copy(tiny_dgnet["teacher"], tmp_path / "teacher.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = dgnet_preset_config("small", data=str(tiny_dgnet["data"]), teacher=str(teacher), backbone="small_cnn",
                                  pretrained="none", workers=0, batch_size=4, grid_every=0, amp=False, iterations=2,
                                  max_steps=1, checkpoint_every=1, quality_every=0)
        last = train_dgnet(cfg, tmp_path / "run", progress=False)
        _changed_copy(teacher, teacher)
        with pytest.raises(ReidgenError, match="not the file .* was trained with"):
            train_dgnet(None, tmp_path / "run", resume=last, progress=False)
    finally:
        torch.set_num_threads(threads)


def test_cross_identity_partners_are_the_next_image_of_another_person():
    from trainer.feeds.synthetic import cross_identity_partners

    labels = torch.tensor([3, 3, 5, 5, 3, 7])
    expected = []
    for i in range(len(labels)):  # the definition, one image at a time
        others = [j for j in list(range(i + 1, len(labels))) + list(range(i)) if labels[j] != labels[i]]
        expected.append(others[0])
    assert cross_identity_partners(labels).tolist() == expected == [2, 2, 4, 4, 5, 0]
    assert cross_identity_partners(torch.tensor([4, 4, 4])).tolist() == [1, 2, 0]  # one person: the next image


def test_the_synthesizer_keeps_dense_soft_labels_and_shards_keep_their_top_k(tiny_dgnet):
    from generator_service.inference.engine import Engine
    from generator_service.inference.synthesis import Synthesizer, top_k
    from generator_service.models.teacher import Teacher

    ckpt = Checkpoint.read(tiny_dgnet["dgnet"], "dgnet")
    engine = Engine.from_checkpoint(ckpt, "cpu")
    synthesizer = Synthesizer(engine, Teacher.recorded_in(ckpt, engine.device))
    torch.manual_seed(0)
    a, s = torch.randn(3, 3, 128, 64), torch.randn(3, 3, 128, 64)
    made = synthesizer(a, s)
    assert made.images.shape == (3, 3, 128, 64) and made.soft.shape == (3, 4)
    assert torch.allclose(made.soft.sum(1), torch.ones(3), atol=1e-5)
    assert torch.allclose(made.images, engine.swap_batch(a, s), atol=1e-6)
    classes, probs = top_k(made.soft, 2)
    assert torch.equal(classes, made.soft.topk(2, dim=1).indices)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-6)
