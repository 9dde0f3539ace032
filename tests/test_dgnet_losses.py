"""DG-Net's losses as the reference code trains them: which network learns from which term
(checked with autograd), the loss sums at initialisation, the initial weights, and E_a started from
the teacher. Networks are small (small_cnn backbone) except where the paper preset is the point."""
from __future__ import annotations

import math

import pytest
import torch

from generator_service.models.dgnet_nets import LayerNorm2d
from reidgen.core.paths import data_root
from trainer.tasks.dgnet import DGNetTrainer, dgnet_preset_config, frozen_copy
from trainer.tasks.reid import preset_config, train_reid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_trainer(data, teacher, out, preset="small", **kw) -> DGNetTrainer:
    base = dict(data=str(data), teacher=str(teacher), backbone="small_cnn", pretrained="none", workers=0,
                batch_size=4, grid_every=0, quality_every=0, amp=False, iterations=100, feed_start=0.1, ramp=0.01)
    base.update(kw)
    return DGNetTrainer(dgnet_preset_config(preset, **base), out, progress=False)


def first_batches(trainer: DGNetTrainer):
    a, b = next(trainer._batches())
    return trainer._prepare(a, b)


def losses_after_warmup(trainer: DGNetTrainer):
    """The E/G step's loss terms at an iteration where feeding is fully on."""
    trainer.step = trainer.cfg.iterations // 2
    (xa, ya, pa), (xb, yb, pb) = first_batches(trainer)
    gen = trainer.generate(xa, xb, pa, pb)
    return trainer.g_losses(gen, pa, pb, ya, yb)


def touched(loss: torch.Tensor, modules) -> bool:
    """Does ``loss`` have a non-zero gradient for any parameter of ``modules``?"""
    params = [p for m in modules for p in m.parameters()]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_reference_routing(data6, teacher6, tmp_path):
    trainer = make_trainer(data6, teacher6, tmp_path)
    net = trainer.net
    losses = losses_after_warmup(trainer)
    assert {"l_prim", "l_fine", "l_fine_real", "l_id_pos"} <= set(losses)
    # L_id^c: a frozen copy of E_a judges the image; only G and E_s learn from it.
    assert not touched(losses["l_id_cross"], [net.ea])
    assert touched(losses["l_id_cross"], [net.dec]) and touched(losses["l_id_cross"], [net.es])
    # L_prim and L_fine: the generated image is detached; only E_a learns from them.
    for name in ("l_prim", "l_fine"):
        assert not touched(losses[name], [net.dec, net.es]), name
        assert touched(losses[name], [net.ea]), name
    # G's adversarial loss never updates D.
    assert not touched(losses["l_adv"], [net.dis]) and touched(losses["l_adv"], [net.dec])


def test_paper_literal_routing_is_an_option(data6, teacher6, tmp_path):
    trainer = make_trainer(data6, teacher6, tmp_path, id_cross_trains_ea=True, feed_trains_generator=True)
    net = trainer.net
    losses = losses_after_warmup(trainer)
    assert touched(losses["l_id_cross"], [net.ea])
    assert touched(losses["l_prim"], [net.dec]) and touched(losses["l_fine"], [net.es])


def test_frozen_copy_leaves_the_live_network_alone(data6, teacher6, tmp_path):
    trainer = make_trainer(data6, teacher6, tmp_path)
    ea = trainer.net.ea.train()
    (xa, _, _), _ = first_batches(trainer)
    x = xa.clone().requires_grad_(True)
    before = {k: v.clone() for k, v in ea.named_buffers()}
    _, (logits, _), _ = frozen_copy(ea, x)
    assert all(torch.equal(v, before[k]) for k, v in ea.named_buffers())  # statistics discarded
    grads = torch.autograd.grad(logits.sum(), [x, *ea.parameters()], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0  # reaches the image...
    assert all(g is None for g in grads[1:])  # ...not E_a's parameters
    ea(xa)
    assert any(not torch.equal(v, before[k]) for k, v in ea.named_buffers() if "running_mean" in k)


def test_reference_initialisation(data6, teacher6, tmp_path):
    net = make_trainer(data6, teacher6, tmp_path, init="reference").net
    d_weights = torch.cat([m.weight.flatten() for m in net.dis.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(d_weights.std().item() - 0.02) < 0.002
    assert all(m.bias.abs().sum() == 0 for m in net.dec.modules() if isinstance(m, torch.nn.Linear))
    first = net.dec.mlps[0][0]
    assert abs(first.weight.std().item() - math.sqrt(2 / first.in_features)) < 0.1 * math.sqrt(2 / first.in_features)
    gains = torch.cat([m.weight for m in net.dec.modules() if isinstance(m, LayerNorm2d)])
    assert 0 <= gains.min() and gains.max() <= 1 and gains.std() > 0.1
    default = make_trainer(data6, teacher6, tmp_path / "p", init="pytorch").net
    assert default.dec.mlps[0][0].weight.std() < 0.5 * first.weight.std()


def test_ea_starts_from_the_teacher(data6, teacher6, tmp_path):
    ea = make_trainer(data6, teacher6, tmp_path, ea_from_teacher=True).net.ea
    teacher = make_trainer(data6, teacher6, tmp_path / "t", ea_from_teacher=False).teacher
    for (name, p), (_, q) in zip(ea.backbone.state_dict().items(), teacher.net.backbone.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.fixture(scope="module")
def market751_teacher(tmp_path_factory):
    """A 751-class teacher on the full Market-1501 train set (one step: only its class list matters)."""
    data = data_root() / "market1501"
    if not (data / "bounding_box_train").is_dir():
        pytest.skip(f"{data} not found")
    cfg = preset_config("tiny", data=str(data), epochs=1, max_steps=1, workers=0, evaluate=False)
    return data, train_reid(cfg, tmp_path_factory.mktemp("teacher751"), progress=False)


@torch.no_grad()
def test_paper_preset_sums_at_initialisation_match_the_reference(market751_teacher, tmp_path):
    """REFERENCE.md: D ≈ 6.0 (2 loaders × 3 scales), G adversarial ≈ 12.0 (× 2 per scale) and
    id ≈ 13.2 (2 × ln 751) at initialisation, 751 classes, real Market images, fp32."""
    data, teacher = market751_teacher
    trainer = make_trainer(data, teacher, tmp_path, preset="paper", batch_size=8, iterations=100_000)
    (xa, ya, pa), (xb, yb, pb) = first_batches(trainer)
    gen = trainer.generate(xa, xb, pa, pb)
    with torch.enable_grad():
        d = trainer.d_losses(gen["real"], gen["x_cross"])
        g = trainer.g_losses(gen, pa, pb, ya, yb)
    assert d["d_adv"].item() == pytest.approx(6.0, abs=0.3)
    assert g["l_adv"].item() == pytest.approx(12.0, abs=0.6)
    assert g["l_id_self"].item() == pytest.approx(2 * math.log(751), abs=0.3)
    assert g["l_id_pos"].item() == pytest.approx(2 * math.log(751), abs=0.3)
    assert "l_prim" not in g and "l_fine_real" not in g  # feeding starts at 30 % of the run
