"""CR-GAN on real images (source market1501_mini, target cuhk03_mini): composition, shapes, a
short training run, exact resume, refusals, and the on-the-fly rendering feed for re-id."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from generator_service.models.crgan import ContextRenderer
from generator_service.models.crgan_nets import (
    CRGAN_PRESETS,
    CameraClassifier,
    ContextGenerator,
    DomainDiscriminator,
    compose,
    mask_person,
)
from reidgen.cli import main
from reidgen.core.errors import ReidgenError
from reidgen.core.market import link_subset
from tests.torchrun import check_two_rank_run, run_two_ranks
from trainer.runlog import read_jsonl
from trainer.tasks.crgan import CRGANTrainer, context_loss, crgan_preset_config, train_crgan
from trainer.tasks.reid import preset_config, train_reid


def test_composition_formula_is_exact():
    source, residual = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    assert torch.equal(compose(residual, torch.zeros(2, 1, 16, 8), source), source)
    assert torch.equal(compose(residual, torch.ones(2, 1, 16, 8), source), residual)
    half = compose(residual, torch.full((2, 1, 16, 8), 0.5), source)
    assert torch.allclose(half, (residual + source) / 2)
    target, mask = torch.randn(1, 3, 4, 2), torch.tensor([[[[1.0, 0], [0, 0], [0, 1], [0, 0]]]])
    masked = mask_person(target, mask)
    assert masked[0, :, 0, 0].abs().sum() == 0 and torch.equal(masked[0, :, 1, 0], target[0, :, 1, 0])


@pytest.mark.parametrize("preset", ["paper", "small"])
@torch.no_grad()
def test_shape_contracts(preset):
    cfg = CRGAN_PRESETS[preset]
    x = torch.randn(2, 3, *cfg.image_size)
    gen = ContextGenerator(cfg).eval()
    rendered, residual, context_mask = gen(x, x)
    assert rendered.shape == residual.shape == x.shape and context_mask.shape == (2, 1, *cfg.image_size)
    assert 0 <= context_mask.min() and context_mask.max() <= 1
    # The generator's output is the composition of its two heads with the source.
    assert torch.allclose(rendered, compose(residual, context_mask, x))
    assert DomainDiscriminator(cfg)(x).shape[:2] == (2, 1)
    assert CameraClassifier(6, cfg)(x).shape == (2, 6)
    single = ContextGenerator(replace(cfg, dual_condition=False)).eval()
    assert single(x, None)[0].shape == x.shape and single.context_path is None
    with pytest.raises(ValueError, match="needs the masked target"):
        gen(x, None)


@pytest.fixture(scope="module")
def domains(market_mini, cuhk_mini, tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    source = link_subset(market_mini, root / "source", ids=15)
    return source, link_subset(cuhk_mini, root / "target", ids=30)


@pytest.fixture(scope="module")
def id_model(domains, tmp_path_factory):
    cfg = preset_config("tiny", data=str(domains[0]), epochs=1, workers=0, evaluate=False)
    return train_reid(cfg, tmp_path_factory.mktemp("d_id"), progress=False)


def small_cfg(domains, id_model, **kw):
    model = replace(CRGAN_PRESETS["small"], base_channels=12, dis_channels=16, cam_channels=(8, 16, 32, 32))
    base = dict(source=str(domains[0]), target=str(domains[1]), id_model=str(id_model), model=model, masks="pose",
                batch_size=4, cam_epochs=1, workers=0, grid_every=0, amp=False)
    base.update(kw)
    return crgan_preset_config("small", **base)


@pytest.fixture(scope="module")
def crgan_run(domains, id_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("crgan")
    cfg = small_cfg(domains, id_model, iterations=80, checkpoint_every=40, keep_checkpoints=True, grid_every=40)
    train_crgan(cfg, out, progress=False)
    return out


def test_short_training_lowers_context_loss(crgan_run):
    records = read_jsonl(crgan_run / "metrics.jsonl")
    steps = [r for r in records if "l_con" in r]
    assert len(steps) == 80
    first = sum(r["l_con"] for r in steps[:10]) / 10
    last = sum(r["l_con"] for r in steps[-10:]) / 10
    # the default L_con is the paper's norm, which falls as the square root of the squared error.
    # Measured: last/first 0.701 at 1 and at 2 threads (no learning would be 1.0); the bound 0.8 leaves
    # 0.1 to rounding. Means of 10 steps each, so no single step decides.
    assert last < 0.8 * first, (first, last)
    assert [r["g_updates"] for r in steps[:40]] == [1] * 40 and steps[-1]["g_updates"] == 2
    assert any(r.get("event") == "d_cam" for r in records)
    assert sorted(p.name for p in (crgan_run / "grids").iterdir()) == ["step_0000040.png", "step_0000080.png"]
    assert any((crgan_run / "masks" / "source").iterdir())


def test_resume_equals_uninterrupted(crgan_run, tmp_path):
    full = {r["step"]: r for r in read_jsonl(crgan_run / "metrics.jsonl") if "l_con" in r}
    trainer = CRGANTrainer(None, tmp_path, resume=crgan_run / "checkpoints" / "step_0000040.pt", progress=False)
    trainer.cfg.max_steps = 44
    trainer.run()
    resumed = {r["step"]: r for r in read_jsonl(tmp_path / "metrics.jsonl") if "l_con" in r}
    assert sorted(resumed) == [41, 42, 43, 44]
    for step, rec in resumed.items():
        for key in ("total", "l_con", "d_loss"):
            assert rec[key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_identity_model_of_other_identities_is_refused(domains, market_mini, tmp_path):
    cfg = preset_config("tiny", data=str(market_mini), max_steps=1, workers=0, evaluate=False)
    other = train_reid(cfg, tmp_path / "other", progress=False)
    with pytest.raises(ReidgenError, match="identity model .* class lists differ"):
        train_crgan(small_cfg(domains, other, iterations=1), tmp_path / "run", progress=False)


def test_online_render_fine_tuning(crgan_run, domains, id_model, tmp_path):
    renderer, _ = ContextRenderer.from_checkpoint(crgan_run / "checkpoints" / "last.pt")
    assert renderer.image_size == (128, 64)
    cfg = preset_config("tiny", data=str(domains[0]), init=str(id_model), target=str(domains[1]),
                        online_render=str(crgan_run), max_steps=4, workers=0,  # a run folder works too
                        evaluate=False)
    train_reid(cfg, tmp_path, progress=False)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 4 and all(r["loss"] > 0 for r in steps)
    # Same target as the CR-GAN run: its cached person masks are reused, not computed again.
    assert not (tmp_path / "masks").exists() and any((crgan_run / "masks" / "target").iterdir())


def test_render_grid_command(crgan_run, domains, id_model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["render-grid", "--checkpoint", str(crgan_run), "--source", str(domains[0]), "--source-split", "train",
            "--target", str(domains[1]), "--sources", "2", "--targets", "3", "--device", "cpu", "--out", str(out)]
    assert main(args + ["--context-masks"]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    # a header row of targets, then per source a row of renderings and a row of context masks
    assert grid.shape == (5 * (128 + 2) + 2, 4 * (64 + 2) + 2, 3)
    mask_cell = grid[2 + 2 * 130:2 + 2 * 130 + 128, 2 + 66:2 + 66 + 64]
    assert np.ptp(mask_cell, axis=2).max() <= 2  # the context mask is drawn in grey
    assert main(args[:2] + [str(id_model)] + args[3:]) == 2
    assert "is not a CR-GAN checkpoint" in capsys.readouterr().err


def test_context_loss_forms():
    torch.manual_seed(0)
    source, target = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 16, 8)
    mask = (torch.rand(2, 1, 16, 8) > 0.5).float()
    perfect = source * mask + target * (1 - mask)  # the source on its person, the target elsewhere
    for form in ("mean_square", "l2", "rms"):
        assert context_loss(perfect, source, target, mask, form).item() == pytest.approx(0, abs=1e-3)
    rendered = torch.randn(2, 3, 16, 8)
    fg, bg = (rendered - source) * mask, (rendered - target) * (1 - mask)
    assert context_loss(rendered, source, target, mask).item() == pytest.approx(
        (fg.square().mean() + bg.square().mean()).item(), rel=1e-5)
    paper = (fg.flatten(1).norm(dim=1) + bg.flatten(1).norm(dim=1)).mean()  # Eq. 6 per image
    assert context_loss(rendered, source, target, mask, "l2").item() == pytest.approx(paper.item(), rel=1e-5)
    assert context_loss(rendered, source, target, mask, "rms").item() == pytest.approx(
        paper.item() / (3 * 16 * 8) ** 0.5, rel=1e-5)
    # the paper's norm keeps its gradient's size as the error shrinks; the mean of squares does not
    near = (perfect + 1e-2 * torch.randn_like(perfect)).requires_grad_(True)
    context_loss(near, source, target, mask, "rms").backward()
    rms_grad = near.grad.norm().item()
    near.grad = None
    context_loss(near, source, target, mask, "mean_square").backward()
    assert rms_grad > 10 * near.grad.norm().item()
    with pytest.raises(ReidgenError, match="choose one of"):
        context_loss(rendered, source, target, mask, "l1")


def test_binary_masks_and_paper_context_loss_train_and_render(crgan_run, domains, id_model, tmp_path):
    cfg = small_cfg(domains, id_model, iterations=3, con_loss="l2", binary_masks=True,
                    mask_cache=str(crgan_run / "masks"))  # the masks of the first run, not computed again
    train_crgan(cfg, tmp_path, progress=False)
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "l_con" in r]
    assert len(steps) == 3 and steps[0]["l_con"] > 10  # a norm over 3·128·64 values, not a mean
    renderer, _ = ContextRenderer.from_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert renderer.binary_masks and not ContextRenderer.from_checkpoint(crgan_run)[0].binary_masks
    x = torch.randn(2, 3, 128, 64)
    soft, hard = torch.full((2, 1, 128, 64), 0.6), torch.ones(2, 1, 128, 64)
    assert torch.equal(renderer.render(x, x.flip(0), soft)[0], renderer.render(x, x.flip(0), hard)[0])
    with pytest.raises(ReidgenError, match="--con-loss"):
        CRGANTrainer(small_cfg(domains, id_model, con_loss="l1"), tmp_path / "bad", progress=False)


def test_two_processes_stay_in_sync(domains, id_model, tmp_path):
    """torchrun with 2 CPU processes (gloo): D_cam pre-trained alike, each rank its own batches,
    gradients averaged, weights identical at the end, rank 0 alone writes (the mask caches too)."""
    out = tmp_path / "ddp"
    run_two_ranks(["train-crgan", "--source", str(domains[0]), "--target", str(domains[1]), "--id-model",
                   str(id_model), "--out", str(out), "--masks", "geometric", "--iterations", "4", "--batch-size", "4",
                   "--cam-epochs", "1", "--workers", "0", "--grid-every", "0", "--no-amp", "--set", "base_channels=12",
                   "--set", "dis_channels=16", "--set", "cam_channels=[8,16,32,32]"], port=29519)
    check_two_rank_run(out, "crgan", "l_con", steps=4)
