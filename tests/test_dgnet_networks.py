"""Shape contract and parameter counts of DG-Net's E_s, G and D (generator_service.models.dgnet_nets).

Counts come from shared/REFERENCE.md (derived from the paper's tables 6-8). Everything runs on
CPU with batch size 1-2 in a few seconds; no training.
"""

from __future__ import annotations

import json

import pytest
import torch

from generator_service.models.dgnet_nets import (
    FAST,
    PAPER,
    PRESETS,
    SMALL,
    Decoder,
    GeneratorConfig,
    MultiScaleDiscriminator,
    StructureEncoder,
    count_parameters,
    lsgan_d_loss,
    lsgan_g_loss,
    r1_penalty,
    to_grey,
)
from reidgen.core.config import config_from_dict, config_to_dict

# A tiny D for the double-backward tests (R1): same code paths, a fraction of the cost.
TINY = GeneratorConfig(image_size=(32, 16), aspp_dilations=(1, 2, 3), dis_channels=(8, 16),
                       dis_res_blocks=2, dis_scales=2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def paper_nets() -> tuple[StructureEncoder, Decoder, MultiScaleDiscriminator]:
    torch.manual_seed(0)
    return StructureEncoder(PAPER).eval(), Decoder(PAPER).eval(), MultiScaleDiscriminator(PAPER).eval()


# ---- parameter counts (REFERENCE.md, DG-Net -> Networks) ------------------------------------


def test_paper_parameter_counts(paper_nets) -> None:
    es, dec, dis = paper_nets
    assert count_parameters(es) == 380_544
    counts = dec.parameter_counts()
    assert counts["decoder"] == 1_455_555
    assert counts["mlps"] == 11_544_576
    assert len(dec.mlps) == 8
    # "G total 13.38M" is decoder + MLPs + E_s.
    assert round((counts["decoder"] + counts["mlps"] + count_parameters(es)) / 1e6, 2) == 13.38
    assert abs(count_parameters(dis) - 1.03e6) / 1.03e6 < 0.01


# ---- shape contract -------------------------------------------------------------------------


def test_paper_shapes(paper_nets) -> None:
    es, dec, dis = paper_nets
    with torch.no_grad():
        s = es(torch.randn(1, 1, 256, 128))
        assert s.shape == (1, 128, 64, 32)
        img = dec(torch.randn(1, 2048, 4, 1), s)
        assert img.shape == (1, 3, 256, 128)
        outs = dis(img)
    assert [tuple(o.shape) for o in outs] == [(1, 1, 64, 32), (1, 1, 32, 16), (1, 1, 16, 8)]


def test_small_shapes() -> None:
    es, dec, dis = StructureEncoder(SMALL), Decoder(SMALL), MultiScaleDiscriminator(SMALL)
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        s = es(to_grey(x))
        assert s.shape == (2, SMALL.structure_channels, 32, 16)
        img = dec(torch.randn(2, 1280, 4, 1), s)
        assert img.shape == (2, 3, 128, 64)
        outs = dis(img)
    assert [tuple(o.shape) for o in outs] == [(2, 1, 32, 16), (2, 1, 16, 8)]


def test_to_grey() -> None:
    x = torch.randn(2, 3, 8, 4)
    g = to_grey(x)
    assert g.shape == (2, 1, 8, 4)
    torch.testing.assert_close(g[:, 0], (x[:, 0] + x[:, 1] + x[:, 2]) / 3)


def test_flat_appearance_code_is_accepted_and_parts_drive_their_blocks() -> None:
    dec = Decoder(SMALL).eval()
    code = torch.randn(1, 1280, 4, 1)
    s = torch.randn(1, SMALL.structure_channels, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(dec(code, s), dec(code.flatten(1), s))
        before = dec.adain_params(code)
        changed = code.clone()
        changed[:, :, 2] += 1.0  # part 2 -> block 2 -> AdaIN layers 4 and 5 only
        after = dec.adain_params(changed)
    moved = [i for i, (b, a) in enumerate(zip(before, after)) if not torch.equal(b[0], a[0])]
    assert moved == [4, 5]
    with pytest.raises(ValueError):
        dec(torch.randn(1, 2048, 4, 1), s)


# ---- config ---------------------------------------------------------------------------------


def test_config_roundtrip_json() -> None:
    assert PRESETS == {"paper": PAPER, "small": SMALL, "fast": FAST}
    for cfg in PRESETS.values():
        assert config_from_dict(GeneratorConfig, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    with pytest.raises(ValueError):
        config_from_dict(GeneratorConfig, {"not_a_field": 1})


# ---- losses ---------------------------------------------------------------------------------


def test_lsgan_losses_hand_computed() -> None:
    real = [torch.tensor([[1.0, 0.5]]), torch.tensor([[0.0]])]
    fake = [torch.tensor([[0.0, 2.0]]), torch.tensor([[-1.0]])]
    # scale 0: mean((0)^2, (-0.5)^2) = 0.125 ; mean(0, 4) = 2     -> 2.125
    # scale 1: mean((-1)^2) = 1            ; mean(1) = 1          -> 2
    assert lsgan_d_loss(real, fake).item() == pytest.approx(4.125)
    # G: scale 0 mean((-1)^2, 1^2) = 1 ; scale 1 (-2)^2 = 4
    assert lsgan_g_loss(fake).item() == pytest.approx(5.0)
    zeros = [torch.zeros(1, 1, 4, 2)] * 3
    assert lsgan_d_loss(zeros, zeros).item() == pytest.approx(3.0)  # 1 per scale at D=0


def test_r1_penalty_positive_and_differentiable() -> None:
    dis = MultiScaleDiscriminator(TINY)
    real = torch.randn(2, 3, 32, 16, requires_grad=True)
    outs = dis(real)
    r1 = r1_penalty(outs, real, weight=0.01)
    assert r1.item() > 0
    r1.backward()
    # Conv weights receive gradients; biases need not (input-gradients of a piecewise-linear net
    # do not depend on them almost everywhere).
    grads = [p.grad for p in dis.parameters() if p.dim() > 1]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    # The weight is a plain multiplier.
    again = r1_penalty(dis(real), real, weight=1.0, create_graph=False)
    assert again.item() == pytest.approx(r1.item() * 100, rel=1e-4)
    with pytest.raises(ValueError):
        r1_penalty(outs, real.detach(), weight=0.01)


def test_d_and_g_loss_methods_route_gradients() -> None:
    dis = MultiScaleDiscriminator(TINY)
    real = torch.randn(2, 3, 32, 16)
    fake_src = torch.randn(2, 3, 32, 16, requires_grad=True)
    adv, r1 = dis.d_loss(real, fake_src * 1.0)
    (adv + r1).backward()
    assert fake_src.grad is None  # the D step does not reach the generator
    assert r1.item() > 0
    dis.g_loss(fake_src * 1.0).backward()
    assert fake_src.grad is not None and fake_src.grad.abs().sum() > 0
