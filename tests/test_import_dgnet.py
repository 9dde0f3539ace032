"""Importing the public DG-Net checkpoints (trainer/import_dgnet.py) and the reference generator
layout (generator_service/models/dgnet_nets.py).

The reference files are stood in for by state dicts with exactly the key names and shapes of
shared/reference/dgnet_reference_checkpoint_layout.json and random values; the class rows are
resized to the 4 identities of a market1501_mini subset. Each reference-computation fact of
REFERENCE.md ("Reference checkpoint layout") is checked on a small network.
"""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generator_service.models.dgnet import DGNet, DGNetConfig, export_inference
from generator_service.models.dgnet_nets import (
    ASPP,
    LAYOUTS,
    PAPER,
    SMALL,
    Decoder,
    GeneratorConfig,
    LayerNorm2d,
    with_layout,
)
from generator_service.models.teacher import Teacher
from reidgen.cli import main
from reidgen.core.checkpoint import load_checkpoint, save_checkpoint
from reidgen.core.config import config_from_dict, config_to_dict
from reidgen.core.errors import ReidgenError
from reidgen.core.market import LabelMap, link_subset, scan_split
from trainer.import_dgnet import (
    appearance_names,
    discriminator_names,
    generator_names,
    import_dgnet,
    import_reid,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYOUT_JSON = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dgnet_reference_checkpoint_layout.json"
K = 4  # identities of the data subset the stand-in files are "trained" on


def _layout() -> dict:
    if not LAYOUT_JSON.is_file():
        pytest.skip(f"{LAYOUT_JSON} not found")
    return json.loads(LAYOUT_JSON.read_text())


def _random_state(shapes: dict[str, list[int]], classes: int, seed: int) -> dict[str, torch.Tensor]:
    """Random values with the given names and shapes; class rows resized to ``classes``; scales
    that keep a random ResNet-50 finite (He-normal weights, BN statistics near 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("classifier.0.weight") or name.endswith("classifier.0.bias"):
            shape = [classes] + shape[1:]
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            out[name] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) > 1:
            fan_in = math.prod(shape[1:])
            out[name] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif name.endswith(("weight", "gamma")):
            out[name] = torch.rand(shape, generator=g) * 0.5 + 0.5
        else:
            out[name] = torch.randn(shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def data4(market_mini, tmp_path_factory) -> Path:
    return link_subset(market_mini, tmp_path_factory.mktemp("m4") / "data", ids=K)


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory) -> dict:
    """gen/id/dis/net_last files in the reference trainer's format, and their state dicts."""
    layout = _layout()
    root = tmp_path_factory.mktemp("reference")
    states = {name: _random_state(layout[name], K, seed) for seed, name in
              enumerate(("gen_a", "id_a", "dis_a", "teacher_ft_net"))}
    files = {"gen": root / "gen_00100000.pt", "id": root / "id_00100000.pt", "dis": root / "dis_00100000.pt",
             "teacher": root / "net_last.pth"}
    torch.save({"a": states["gen_a"], "b": states["gen_a"]}, files["gen"])
    torch.save({"a": states["id_a"]}, files["id"])
    torch.save({"a": states["dis_a"]}, files["dis"])
    torch.save(states["teacher_ft_net"], files["teacher"])
    return {"root": root, "files": files, "states": states}


@pytest.fixture(scope="module")
def imported(reference_files, data4) -> dict:
    f = reference_files["files"]
    out = reference_files["root"] / "imported.pt"
    assert main(["import-dgnet", "--gen", str(f["gen"]), "--id", str(f["id"]), "--dis", str(f["dis"]),
                 "--teacher", str(f["teacher"]), "--data", str(data4), "--out", str(out)]) == 0
    return {"out": out, "teacher": out.with_name("imported.teacher.pt")}


# ---- importing the reference layout ------------------------------------------------------------


def test_reference_files_import_tensor_for_tensor_and_run(reference_files, imported, data4) -> None:
    states = reference_files["states"]
    net, ckpt = DGNet.from_checkpoint(imported["out"])
    assert ckpt["kind"] == "dgnet" and net.cfg.generator.layout == "reference"
    assert ckpt["label_map"] == LabelMap.from_items(scan_split(data4, "train")).to_list()
    ours = net.state_dict()
    tables = [(generator_names(net), states["gen_a"]), (discriminator_names(net), states["dis_a"]),
              ({f"ea.{k}": v for k, v in appearance_names(net.ea).items()}, states["id_a"])]
    for names, source in tables:
        for our_key, their_key in names.items():
            assert torch.equal(ours[our_key], source[their_key].to(ours[our_key].dtype)), our_key
    # every key of the JSON is either imported or one the computation does not use
    used = {theirs for names, _ in tables for theirs in names.values()}
    unused = {k for name in ("gen_a", "id_a", "dis_a") for k in states[name] if k not in used}
    assert unused and all(k.startswith("model.fc.") or ".norm.running_" in k for k in unused)

    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        images = net.swap(x, x.flip(0))
        _, (logits_prim, logits_fine), _ = net.ea(x)
    assert images.shape == (2, 3, 256, 128) and torch.isfinite(images).all()
    assert logits_prim.shape == logits_fine.shape == (2, K) and torch.isfinite(logits_prim).all()

    teacher = Teacher(str(imported["teacher"]), LabelMap(tuple(ckpt["label_map"])), torch.device("cpu"))
    assert ckpt["train_config"]["teacher"] == str(imported["teacher"].resolve())
    for our_key, value in teacher.net.state_dict().items():
        their_key = our_key.replace("backbone.", "model.", 1).replace("head.embed.", "classifier.add_block.0.") \
            .replace("head.bn.", "classifier.add_block.1.").replace("head.classifier.", "classifier.classifier.0.")
        assert torch.equal(value, states["teacher_ft_net"][their_key].to(value.dtype)), our_key
    q = teacher.soft_labels(x)
    torch.testing.assert_close(q.sum(1), torch.ones(2))


def test_class_count_mismatch_is_refused_naming_both(reference_files, market_mini, tmp_path, capsys) -> None:
    data5 = link_subset(market_mini, tmp_path / "data5", ids=5)
    f = reference_files["files"]
    code = main(["import-dgnet", "--gen", str(f["gen"]), "--id", str(f["id"]), "--data", str(data5),
                 "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert code != 0 and "4 classes" in err and "5 identities" in err and err.count("\n") == 1
    with pytest.raises(ReidgenError, match="4 classes .* 5 identities"):
        import_reid(f["teacher"], data5, tmp_path / "t.pt")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "t.pt").exists()


def test_wrong_and_missing_keys_are_refused_naming_the_first(reference_files, data4, tmp_path) -> None:
    gen = dict(reference_files["states"]["gen_a"])
    del gen["mlp_b4.model.2.fc.bias"], gen["dec.model.8.conv.weight"]
    gen["dec.model.9.conv.weight"] = torch.zeros(3)
    bad = tmp_path / "gen_bad.pt"
    torch.save({"a": gen}, bad)
    f = reference_files["files"]
    with pytest.raises(ReidgenError) as err:
        import_dgnet(bad, f["id"], data4, tmp_path / "x.pt")
    message = str(err.value)
    assert "2 missing keys" in message and "mlp_b4.model.2.fc.bias" in message and "dec.model.8.conv.weight" in message
    assert "1 unexpected keys (dec.model.9.conv.weight)" in message

    gen = dict(reference_files["states"]["gen_a"])
    gen["enc_content.model.5.fuse.conv.bias"] = torch.zeros(64)
    torch.save({"a": gen}, bad)
    with pytest.raises(ReidgenError, match=r"enc_content.model.5.fuse.conv.bias is \[64\], expected \[128\]"):
        import_dgnet(bad, f["id"], data4, tmp_path / "x.pt")
    # a project-layout (reidgen) state dict is not the reference layout either
    torch.save({"a": {"es.stem.0.0.weight": torch.zeros(16, 1, 3, 3)}}, bad)
    with pytest.raises(ReidgenError, match="unexpected keys \\(es.stem.0.0.weight\\)"):
        import_dgnet(bad, f["id"], data4, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


class _RunsCode:
    def __reduce__(self):
        return (Path.touch, (Path(_RunsCode.marker),))


def test_files_are_read_as_tensors_only(reference_files, data4, tmp_path) -> None:
    _RunsCode.marker = str(tmp_path / "ran")
    evil = tmp_path / "gen_evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"a": {"x": _RunsCode()}}, fh)
    with pytest.raises(ReidgenError, match="will not unpickle"):
        import_dgnet(evil, reference_files["files"]["id"], data4, tmp_path / "x.pt")
    with pytest.raises(ReidgenError, match="will not unpickle"):
        import_reid(evil, data4, tmp_path / "t.pt")
    assert not (tmp_path / "ran").exists()


# ---- the reference computation, fact by fact -------------------------------------------------

# A small network in the reference layout (4 blocks, 4 chunks), cheap to run.
REF_SMALL = with_layout(SMALL, "reference")


def test_layouts_and_presets() -> None:
    assert PAPER.layout == "reference" and SMALL.layout == "project"
    assert GeneratorConfig().layout == "project"
    assert replace(PAPER, adain_scale_offset=True).layout == "mixed"
    assert set(LAYOUTS["reference"]) == set(LAYOUTS["project"])
    with pytest.raises(ValueError, match="mlp_grouping"):
        GeneratorConfig(mlp_grouping="per_channel")


def test_code_chunk_k_drives_only_block_k_in_channel_major_order() -> None:
    torch.manual_seed(0)
    dec = Decoder(REF_SMALL).eval()
    c, p = REF_SMALL.appearance_channels, REF_SMALL.appearance_parts
    code = torch.randn(2, c * p)
    with torch.no_grad():
        before = dec.adain_params(code)
        for k in range(p):
            changed = code.clone()
            changed[:, c * k:c * (k + 1)] += 1.0  # chunk k = values [C k, C k + C)
            after = dec.adain_params(changed)
            moved = [i for i, (b, a) in enumerate(zip(before, after))
                     if not (torch.equal(b[0], a[0]) and torch.equal(b[1], a[1]))]
            assert moved == [2 * k, 2 * k + 1]
            # both the scales and the biases of both layers of block k move
            assert all(not torch.equal(before[i][j], after[i][j]) for i in moved for j in (0, 1))
        # the (B, C, P, 1) code is flattened channel-major (index P * channel + stripe): one stripe
        # spreads over every chunk, so it moves every block
        code4 = code.view(2, c, p, 1)
        s = torch.randn(2, REF_SMALL.structure_channels, 32, 16)
        torch.testing.assert_close(dec(code4, s), dec(code, s))
        striped = code4.clone()
        striped[:, :, 1] += 1.0
        after = dec.adain_params(striped)
    assert all(not torch.equal(b[0], a[0]) for b, a in zip(before, after))


def test_mlp_k_gives_the_scales_of_both_layers_of_block_k() -> None:
    torch.manual_seed(0)
    dec = Decoder(REF_SMALL).eval()
    n, ch, c = REF_SMALL.dec_res_blocks, REF_SMALL.structure_channels, REF_SMALL.appearance_channels
    code = torch.randn(3, c * REF_SMALL.appearance_parts)
    with torch.no_grad():
        params = dec.adain_params(code)
        for k in range(n):
            chunk = code[:, c * k:c * (k + 1)]
            scales, biases = dec.mlps[k](chunk), dec.mlps[n + k](chunk)
            assert scales.shape == (3, 2 * ch)
            torch.testing.assert_close(torch.cat([params[2 * k][0], params[2 * k + 1][0]], 1), scales)
            torch.testing.assert_close(torch.cat([params[2 * k][1], params[2 * k + 1][1]], 1), biases)


def test_adain_uses_the_mlp_output_as_the_scale() -> None:
    """Scale MLPs giving 0 and bias MLPs giving b make block k's output x + b2 (the first AdaIN
    gives the constant b1, the second b2): no 1 + scale."""
    torch.manual_seed(0)
    dec = Decoder(REF_SMALL).eval()
    n = REF_SMALL.dec_res_blocks
    with torch.no_grad():
        for m in range(2 * n):
            last = dec.mlps[m][-1]
            last.weight.zero_()
            last.bias.copy_(torch.zeros_like(last.bias) if m < n else torch.randn_like(last.bias))
        s = torch.randn(2, REF_SMALL.structure_channels, 32, 16)
        code = torch.randn(2, REF_SMALL.appearance_channels * REF_SMALL.appearance_parts)
        x = s
        for k in range(n):
            b2 = dec.mlps[n + k][-1].bias[REF_SMALL.structure_channels:]
            x = x + b2[None, :, None, None]
        torch.testing.assert_close(dec(code, s), dec.head(dec.upsample(x)))
        offset = Decoder(replace(REF_SMALL, adain_scale_offset=True)).eval()
        offset.load_state_dict(dec.state_dict())
        assert (offset(code, s) - dec(code, s)).abs().max() > 1e-3


def test_aspp_branches_end_without_activation() -> None:
    torch.manual_seed(0)
    aspp = ASPP(8, 4, (1, 2, 3), 16, branch_activation=False).eval()
    x = torch.randn(2, 8, 12, 6)
    with torch.no_grad():
        one = aspp.branches[0](x)
        torch.testing.assert_close(one, F.instance_norm(aspp.branches[0][0](x)))  # 1x1 + IN, nothing else
        assert one.min() < -1.0  # instance-normalised: negative values pass unchanged
        for branch in aspp.branches[1:]:
            front = branch[0](x)  # the 1x1 in front of the dilated conv keeps its lrelu
            torch.testing.assert_close(front, F.leaky_relu(F.instance_norm(branch[0][0](x)), 0.2))
            out = branch(x)
            torch.testing.assert_close(out, F.instance_norm(branch[1][0](front)))
            assert out.min() < -1.0
        fused = aspp(x)
        torch.testing.assert_close(fused, F.instance_norm(aspp.fuse[0](torch.cat([b(x) for b in aspp.branches], 1))))
        project = ASPP(8, 4, (1, 2, 3), 16, branch_activation=True).eval()
        project.load_state_dict(aspp.state_dict())
        assert project.branches[0](x).min() > -0.2 * 5  # lrelu shrinks the negatives
        assert (project(x) - fused).abs().max() > 1e-2


def test_layer_norm_is_unbiased_std_with_eps_outside() -> None:
    torch.manual_seed(0)
    ln = LayerNorm2d(3, unbiased_std=True)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(2, 3, 2, 2) * 3 + 1  # n = 12: the unbiased factor sqrt(12/11) is visible
    flat = x.flatten(1)
    mu = flat.mean(1).view(-1, 1, 1, 1)
    sigma = torch.sqrt(((flat - flat.mean(1, keepdim=True)) ** 2).sum(1) / (flat.shape[1] - 1)).view(-1, 1, 1, 1)
    want = (x - mu) / (sigma + 1e-5) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), want)
    biased = LayerNorm2d(3, unbiased_std=False)
    biased.load_state_dict(ln.state_dict())
    assert (biased(x) - want).abs().max() > 1e-2
    # the hand-written backward is the formula's gradient (w.r.t. x, gain and bias), a constant
    # input gives 0 and finite gradients, and a second derivative is refused rather than wrong
    ln64 = LayerNorm2d(3, unbiased_std=True).double()
    ln64.load_state_dict(ln.state_dict())
    xd = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w, b: F.leaky_relu(ln64(a), 0.2) * w.sum() + b.sum(),
                                    (xd, ln64.weight, ln64.bias))
    flat = torch.zeros(1, 3, 2, 2, requires_grad=True)
    out = ln(flat)
    out.sum().backward()
    torch.testing.assert_close(out, ln.bias.detach().view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert torch.isfinite(flat.grad).all()
    (g,) = torch.autograd.grad(ln(xd.float()).square().sum(), xd, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


# ---- checkpoints of the project layout keep loading ------------------------------------------------


def test_old_layout_checkpoint_still_loads_and_computes_the_same(tmp_path) -> None:
    """A checkpoint whose generator config predates the layout fields reads as the project layout."""
    gen = replace(SMALL, appearance_channels=256)
    cfg = DGNetConfig(preset="small", backbone="small_cnn", generator=gen)
    torch.manual_seed(0)
    net = DGNet(cfg, num_classes=3).eval()
    model_config = config_to_dict(cfg)
    for field in ("aspp_branch_activation", "mlp_grouping", "appearance_chunks", "layer_norm"):
        del model_config["generator"][field]  # as written before these fields existed
    path = save_checkpoint(tmp_path / "old.pt", "dgnet", {"model_config": model_config, "label_map": [1, 2, 3],
                                                          "model": net.state_dict()})
    loaded, _ = DGNet.from_checkpoint(path)
    assert loaded.cfg.generator == gen and loaded.cfg.generator.layout == "project"
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.swap(x, x.flip(0)), net.swap(x, x.flip(0)))
    # an old paper-preset configuration, too, reads as the project layout, not the new default
    old_paper = config_to_dict(PAPER)
    for field in ("aspp_branch_activation", "mlp_grouping", "appearance_chunks", "layer_norm"):
        del old_paper[field]
    old_paper["adain_scale_offset"] = True
    assert config_from_dict(GeneratorConfig, old_paper).layout == "project"
    assert load_checkpoint(path, "dgnet")["model_config"]["generator"].get("mlp_grouping") is None


def test_without_dis_d_starts_from_the_reference_init(reference_files, data4, tmp_path) -> None:
    f = reference_files["files"]
    out = import_dgnet(f["gen"], f["id"], data4, tmp_path / "no_dis.pt")
    ckpt = load_checkpoint(out, "dgnet")
    assert ckpt["imported_from"]["dis"] is None and ckpt["train_config"]["teacher"] == ""
    weights = [v for k, v in ckpt["model"].items() if k.startswith("dis.") and k.endswith("weight")]
    biases = [v for k, v in ckpt["model"].items() if k.startswith("dis.") and k.endswith("bias")]
    assert all(torch.isfinite(w).all() for w in weights) and all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    assert abs(torch.cat([w.flatten() for w in weights]).std().item() - 0.02) < 0.002


# ---- inference export ---------------------------------------------------------------------------


def test_export_serves_the_same_images_without_d_or_optimiser_state(tmp_path, capsys) -> None:
    from generator_service.inference.engine import Engine

    cfg = DGNetConfig(preset="small", backbone="small_cnn", generator=replace(SMALL, appearance_channels=256))
    torch.manual_seed(0)
    net = DGNet(cfg, num_classes=3)
    run = tmp_path / "run"
    opt = torch.optim.Adam(net.parameters())
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    save_checkpoint(run / "checkpoints" / "last.pt", "dgnet", {
        "model_config": config_to_dict(cfg), "train_config": {"teacher": "/somewhere/teacher.pt"},
        "label_map": [3, 5, 8], "model": net.state_dict(), "optimizers": [opt.state_dict()], "step": 7, "rng": []})
    out = tmp_path / "models" / "exported.pt"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "MiB" in capsys.readouterr().out

    ckpt = load_checkpoint(out, "dgnet")
    assert ckpt["inference_only"] is True and ckpt["exported_from"]["step"] == 7
    assert not any(k.startswith("dis.") for k in ckpt["model"]) and "optimizers" not in ckpt and "rng" not in ckpt
    assert ckpt["label_map"] == [3, 5, 8] and ckpt["train_config"]["teacher"] == "/somewhere/teacher.pt"
    assert out.stat().st_size < 0.5 * (run / "checkpoints" / "last.pt").stat().st_size

    exported, _ = DGNet.from_checkpoint(out)
    assert exported.dis is None
    a, s = torch.randn(2, 3, 128, 64), torch.randn(3, 3, 128, 64)
    engines = [Engine.from_checkpoint(p, "cpu") for p in (run, out)]
    images = [e.swap_batch(a, s, grid=True) for e in engines]
    assert images[0].shape == (2, 3, 3, 128, 64)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    with pytest.raises(ReidgenError, match="new file"):
        export_inference(out, out)
