"""No file reidgen reads can run code: checkpoints, teachers and pretrained weights are loaded
with ``torch.load(weights_only=True)``.

Each crafted file below would write a marker file the moment it is unpickled. Through every
path that reads a model file (evaluate, train-dgnet --teacher/--resume, train-reid
--init/--resume, --pretrained, the service's model loading, a batch job's checkpoint or
teacher) the marker must stay absent and one clear refusal must come out. Real checkpoints
(the session's tiny DG-Net run and its teacher, a two-iteration CR-GAN run) still load and
resume; an old-style checkpoint is converted only by ``reidgen convert-checkpoint --trust``.
"""
from __future__ import annotations

import pathlib
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from api_schemas.jobs import JobSpec
from generator_service.http.serve import build_app
from generator_service.models.backbones import build_backbone
from generator_service.models.crgan_nets import CRGAN_PRESETS
from reidgen.cli import main
from reidgen.core.checkpoint import convert_checkpoint, load_checkpoint, save_checkpoint
from reidgen.core.errors import ReidgenError
from reidgen.core.market import link_subset
from reidgen.core.rng import set_rng_state
from trainer.tasks.crgan import crgan_preset_config, train_crgan
from trainer.tasks.dgnet import train_dgnet
from trainer.tasks.reid import train_reid
from worker.run import run_job

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFUSAL = "holds objects other than tensors and plain data"


class Payload:
    """Unpickling this calls ``Path(marker).write_text("pwned")``: proof that code ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path(self.marker).write_text, ("pwned",)


def craft(path: pathlib.Path, kind: str = "reid", with_pickle: bool = False) -> pathlib.Path:
    """A file that looks like a reidgen checkpoint of ``kind`` and carries the payload; returns the marker."""
    marker = path.with_name(path.stem + ".marker")
    evil = {"format": "reidgen", "version": 1, "kind": kind, "model": Payload(marker), "label_map": [1, 2]}
    if with_pickle:
        path.write_bytes(pickle.dumps(evil, protocol=pickle.HIGHEST_PROTOCOL))
    else:
        torch.save(evil, path)
    return marker


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def assert_refused_by_cli(argv: list[str], crafted: pathlib.Path, marker: pathlib.Path, capsys) -> None:
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"reidgen: error: checkpoint {crafted} {REFUSAL}"), err
    assert "will not unpickle it" in err and "convert-checkpoint" not in err  # a hostile file: no hint to run it
    assert not marker.exists()


@pytest.fixture
def crafted(tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    path = tmp_path / "crafted.pt"
    return path, craft(path)


def test_the_crafted_file_really_runs_code_when_unpickled(tmp_path):
    """The marker checks below mean something: a full unpickle does write it."""
    path = tmp_path / "live.pt"
    marker = craft(path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("with_pickle", [False, True], ids=["torch.save", "pickle.dumps"])
def test_load_checkpoint_refuses_without_running_it(tmp_path, with_pickle):
    path = tmp_path / "crafted.pt"
    marker = craft(path, with_pickle=with_pickle)
    with pytest.raises(ReidgenError) as info:
        load_checkpoint(path, "reid")
    message = str(info.value)
    assert REFUSAL in message and "pathlib" in message and "\n" not in message
    # It has reidgen's header, but its globals are no older reidgen's: no advice to unpickle it.
    assert "convert-checkpoint" not in message
    assert not marker.exists()


def test_a_foreign_pickle_is_refused_without_the_conversion_hint(tmp_path):
    path = tmp_path / "foreign.pt"
    marker = path.with_name("foreign.marker")
    torch.save({"weights": Payload(marker)}, path)
    with pytest.raises(ReidgenError, match=REFUSAL) as info:
        load_checkpoint(path, "reid")
    assert "convert-checkpoint" not in str(info.value) and not marker.exists()


def test_evaluate_refuses(crafted, tiny_dgnet, capsys):
    path, marker = crafted
    assert_refused_by_cli(["evaluate", "--checkpoint", str(path), "--data", str(tiny_dgnet["data"]),
                           "--workers", "0", "--device", "cpu"], path, marker, capsys)


def test_train_dgnet_refuses_a_crafted_teacher_and_resume(crafted, tiny_dgnet, tmp_path, capsys):
    path, marker = crafted
    assert_refused_by_cli(["train-dgnet", "--data", str(tiny_dgnet["data"]), "--teacher", str(path),
                           "--out", str(tmp_path / "run"), "--backbone", "small_cnn", "--pretrained", "none",
                           "--workers", "0", "--device", "cpu"], path, marker, capsys)
    dgnet = tmp_path / "dgnet.pt"
    marker = craft(dgnet, "dgnet")
    assert_refused_by_cli(["train-dgnet", "--resume", str(dgnet), "--out", str(tmp_path / "resumed")],
                          dgnet, marker, capsys)


def test_train_reid_refuses_a_crafted_init_and_resume(crafted, tiny_dgnet, tmp_path, capsys):
    path, marker = crafted
    assert_refused_by_cli(["train-reid", "--data", str(tiny_dgnet["data"]), "--out", str(tmp_path / "run"),
                           "--preset", "tiny", "--init", str(path), "--workers", "0", "--device", "cpu",
                           "--no-eval"], path, marker, capsys)
    assert_refused_by_cli(["train-reid", "--resume", str(path), "--out", str(tmp_path / "resumed")],
                          path, marker, capsys)


def test_the_service_refuses_a_crafted_model(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    marker = craft(models / "evil.pt", "dgnet")
    with pytest.raises(ReidgenError, match=REFUSAL):
        build_app(models, device="cpu")  # what `reidgen serve --models` builds before opening its port
    assert not marker.exists()


def test_pretrained_weights_files_are_read_as_plain_data(tmp_path, monkeypatch):
    """--pretrained PATH, and torchvision's cached ResNet-50 file (its hash is checked only on download)."""
    marker = craft(tmp_path / "weights.pth")
    with pytest.raises(ReidgenError, match=f"pretrained weights file {tmp_path / 'weights.pth'} {REFUSAL}"):
        build_backbone("small_cnn", pretrained=str(tmp_path / "weights.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from torchvision.models import ResNet50_Weights

    cached = tmp_path / "torch" / "hub" / "checkpoints" / pathlib.Path(ResNet50_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save({"conv1.weight": Payload(marker)}, cached)
    with pytest.raises(ReidgenError, match=f"ResNet-50 ImageNet weights file {cached} {REFUSAL}"):
        build_backbone("resnet50", pretrained="imagenet")
    assert not marker.exists()


def test_a_batch_job_refuses_a_crafted_checkpoint_or_teacher(tiny_dgnet, tmp_path):
    for field, kind in (("checkpoint", "dgnet"), ("teacher", "reid")):
        path = tmp_path / f"crafted_{field}.pt"
        marker = craft(path, kind)
        spec = {"kind": "dgnet_random_structures", "checkpoint": str(tiny_dgnet["dgnet"]),
                "data": str(tiny_dgnet["data"]), "subset": 2, "structures_per_image": 1, field: str(path)}
        with pytest.raises(ReidgenError, match=REFUSAL):
            run_job(JobSpec(**spec), tmp_path / f"job_{field}", device="cpu", progress=False)
        assert not marker.exists()


def _with_more_training(ckpt: dict, out: pathlib.Path, **train_config) -> pathlib.Path:
    """A copy of a real checkpoint whose run goes one step further (its configuration wins on resume)."""
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "version", "kind")}
    payload["train_config"] = {**ckpt["train_config"], **train_config}
    return save_checkpoint(out, ckpt["kind"], payload)


def test_real_checkpoints_load_and_resume_with_weights_only(tiny_dgnet, tmp_path):
    teacher = load_checkpoint(tiny_dgnet["teacher"], "reid")
    dgnet = load_checkpoint(tiny_dgnet["dgnet"], "dgnet")
    assert all(s["torch"].dtype == torch.uint8 for s in teacher["rng"] + dgnet["rng"])

    step = dgnet["step"]
    last = train_dgnet(None, tmp_path / "dgnet", resume=_with_more_training(dgnet, tmp_path / "d.pt",
                                                                              iterations=step + 1), progress=False)
    assert load_checkpoint(last, "dgnet")["step"] == step + 1
    step = teacher["step"]
    more = _with_more_training(teacher, tmp_path / "t.pt", epochs=2, max_steps=step + 1)
    assert load_checkpoint(train_reid(None, tmp_path / "reid", resume=more, progress=False), "reid")["step"] == step + 1


def test_a_crgan_run_saves_and_resumes_with_weights_only(tiny_dgnet, cuhk_mini, tmp_path):
    """Two iterations on 4 + 4 identities with geometric masks (no segmenter): seconds."""
    target = link_subset(cuhk_mini, tmp_path / "target", ids=4)
    model = replace(CRGAN_PRESETS["small"], base_channels=12, dis_channels=16, cam_channels=(8, 16, 32, 32))
    cfg = crgan_preset_config("small", source=str(tiny_dgnet["data"]), target=str(target),
                              id_model=str(tiny_dgnet["teacher"]), model=model, masks="geometric", batch_size=4,
                              cam_epochs=1, workers=0, grid_every=0, amp=False, iterations=2)
    ckpt = load_checkpoint(train_crgan(cfg, tmp_path / "run", progress=False), "crgan")
    more = _with_more_training(ckpt, tmp_path / "more.pt", iterations=3)
    assert load_checkpoint(train_crgan(None, tmp_path / "resumed", resume=more, progress=False), "crgan")["step"] == 3


def test_saving_anything_but_plain_data_is_a_bug(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['step'\] is a numpy.float64"):
        save_checkpoint(tmp_path / "bad.pt", "reid", {"step": np.float64(3)})
    assert not (tmp_path / "bad.pt").exists()


def _legacy_checkpoint(tiny_dgnet, path: pathlib.Path) -> pathlib.Path:
    """What an older reidgen might have written: RNG states as numpy, numpy numbers (torch.save directly,
    past `save_checkpoint`'s check)."""
    ckpt = load_checkpoint(tiny_dgnet["teacher"], "reid")
    ckpt["rng"] = {"torch": ckpt["rng"][0]["torch"].numpy(), "numpy": np.random.RandomState(0).get_state()}
    ckpt["step"] = np.int64(ckpt["step"])
    torch.save(ckpt, path)
    return path


def test_convert_checkpoint_needs_trust_then_converts(tiny_dgnet, tmp_path, capsys):
    old, new = _legacy_checkpoint(tiny_dgnet, tmp_path / "old.pt"), tmp_path / "new.pt"
    with pytest.raises(ReidgenError, match=f"{REFUSAL}.*reidgen convert-checkpoint {old} NEW.pt --trust"):
        load_checkpoint(old, "reid")

    assert main(["convert-checkpoint", str(old), str(new)]) == 2
    err = one_error_line(capsys)
    assert "runs whatever code the file contains" in err and "--trust" in err and not new.exists()
    with pytest.raises(ReidgenError, match="to a new file"):
        convert_checkpoint(old, old, trust=True)

    assert main(["convert-checkpoint", str(old), str(new), "--trust"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint['rng']['torch']: numpy array → tensor" in out and "converted 3 value(s)" in out
    converted, original = load_checkpoint(new, "reid"), load_checkpoint(tiny_dgnet["teacher"], "reid")
    assert isinstance(converted["step"], int) and converted["step"] == original["step"]
    assert torch.equal(converted["rng"]["torch"], original["rng"][0]["torch"])
    set_rng_state(converted["rng"])  # the torch state is a ByteTensor again
    assert all(torch.equal(converted["models"]["model"][k], v) for k, v in original["models"]["model"].items())
