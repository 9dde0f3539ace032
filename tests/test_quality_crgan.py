"""Tests of trainer.evaluation.quality_crgan (CR-GAN instance guidance) and `reidgen quality` on a CR-GAN
checkpoint, on real images: Market-1501 persons (sources) and CUHK03 held-out images (targets).

The measures are checked on renderings whose answer is known: one that pastes the source person
on its own target's background (own-target match 1), one that puts the same texture behind the
person whatever the target (exactly 1/k), one that uses a wrong target (0). The end-to-end run
uses a real checkpoint file whose generator keeps the source (X_C ≈ 0), so its figures are known too.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from generator_service.models.crgan_nets import CRGAN_PRESETS, ContextGenerator
from generator_service.models.masks import GeometricMasks, binarize, build_mask_provider, compute_masks
from reidgen.cli import main
from reidgen.core.checkpoint import save_checkpoint
from reidgen.core.config import config_to_dict
from reidgen.core.errors import ReidgenError
from reidgen.core.images import denormalize, load_batch
from reidgen.core.market import LabelMap, link_subset, scan_split
from trainer.evaluation.quality_crgan import (
    LPIPS,
    alexnet_features,
    checkpoint_kind,
    cross_source_pairs,
    measure_groups,
    pairwise_feature_distance,
    pairwise_lpips,
    set_feature_distance,
    spread_identities,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = 6
SIZE = (128, 64)


@pytest.fixture(scope="module")
def pairs(market_mini, cuhk_mini, tmp_path_factory):
    """4 Market-1501 persons (distinct identities), each with 6 CUHK03 gallery images of distinct
    persons, and the sources' person masks (MediaPipe pose model; the geometric prior without it)."""
    sources = spread_identities(scan_split(market_mini, "train"), seed=0)[:4]
    targets = spread_identities(scan_split(cuhk_mini, "gallery"), seed=1)[:4 * K + 1]
    try:
        provider = build_mask_provider("pose")
    except ReidgenError:
        provider = GeometricMasks()
    masks = compute_masks(provider, sources, tmp_path_factory.mktemp("masks"), progress=False)
    soft = torch.stack([torch.from_numpy(masks[it.path]) for it in sources])[:, None]
    soft = nn.functional.interpolate(soft, size=SIZE, mode="bilinear", align_corners=False)
    xs = load_batch([it.path for it in sources], SIZE)
    xt = load_batch([it.path for it in targets[:4 * K]], SIZE).view(4, K, 3, *SIZE)
    texture = load_batch([targets[-1].path], SIZE)[0]  # a CUHK03 image outside every group
    return xs, soft, xt, texture


def _paste(person: torch.Tensor, mask: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """S×3×H×W persons over S×k×3×H×W backgrounds (hard masks: exact pixels either side)."""
    return person[:, None] * mask[:, None] + background * (1 - mask[:, None])


def test_a_rendering_of_its_own_targets_background_always_matches(pairs):
    xs, soft, xt, _ = pairs
    mask = torch.from_numpy(binarize(soft.numpy())).float()
    measured = measure_groups(_paste(xs, mask, xt), xs, mask, xt)
    summary = measured.summary()
    assert summary["own_target_match"] == 1.0
    assert summary["foreground_l1"] == pytest.approx(0, abs=1e-6)
    assert summary["background_l1_own"] == pytest.approx(0, abs=1e-6) and summary["background_l1_other"] > 0.3
    assert summary["background_l1_source"] > 0.3
    # off the person the renderings differ exactly as much as their targets do
    assert summary["spread_l1"] == pytest.approx(summary["spread_l1_targets"], rel=1e-5) and summary["spread_l1"] > 0.3
    # the soft mask (weights off the person < 1 on its edge) picks the same targets
    assert measure_groups(_paste(xs, mask, xt), xs, soft, xt).summary()["own_target_match"] == 1.0
    # a wrong target for every rendering (the next one of the group) never matches
    wrong = _paste(xs, mask, xt.roll(1, dims=1))
    assert measure_groups(wrong, xs, mask, xt).summary()["own_target_match"] == 0.0


def test_one_texture_for_all_targets_scores_chance(pairs):
    xs, soft, xt, texture = pairs
    mask = torch.from_numpy(binarize(soft.numpy())).float()
    same = _paste(xs, mask, texture.expand_as(xt))
    summary = measure_groups(same, xs, soft, xt).summary()
    assert summary["own_target_match"] == pytest.approx(1 / K)  # k equal renderings pick one candidate
    assert summary["spread_l1"] == 0 and summary["spread_l1_targets"] > 0.3
    assert summary["background_l1_own"] > 0.3
    # halfway between the texture and each target: the nearest background is the own one again
    half = _paste(xs, mask, (texture + xt) / 2)
    assert measure_groups(half, xs, soft, xt).summary()["own_target_match"] == 1.0


def test_foreground_fidelity_sees_another_person(pairs):
    xs, soft, xt, _ = pairs
    mask = torch.from_numpy(binarize(soft.numpy())).float()
    kept = measure_groups(_paste(xs, mask, xt), xs, mask, xt).summary()["foreground_l1"]
    swapped = measure_groups(_paste(xs.roll(1, dims=0), mask, xt), xs, mask, xt).summary()
    assert kept == 0 and swapped["foreground_l1"] > 0.5
    assert swapped["own_target_match"] == 1.0  # the background is still each target's own


def test_pairwise_feature_distance_is_the_mean_over_pairs():
    features = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [0.0, 8.0]]])  # distances 5, 8, 5
    assert pairwise_feature_distance(features).tolist() == pytest.approx([6.0])
    assert pairwise_feature_distance(features.expand(1, 3, 2)[:, :1].expand(1, 3, 2)).tolist() == [0.0]


def test_spread_identities_puts_distinct_persons_side_by_side(cuhk_mini):
    items = scan_split(cuhk_mini, "gallery")
    order = spread_identities(items, seed=3)
    assert sorted(it.path for it in order) == sorted(it.path for it in items)
    windows = [order[i:i + K] for i in range(0, 60, K)]
    assert all(len({it.pid for it in w}) == K for w in windows)
    assert order != spread_identities(items, seed=4)


# -- LPIPS from local files -------------------------------------------------------------------------


def test_lpips_from_a_local_alexnet_file_agrees_with_torchmetrics(pairs, tmp_path):
    xs, _, xt, _ = pairs
    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"  # random weights under torchvision's names (its classifier left out)
    torch.save({f"features.{k}": v for k, v in alexnet_features().state_dict().items()}, weights)
    lpips = LPIPS(weights)
    a, b = denormalize(xs), denormalize(xt[:, 0])
    ours = lpips(a, b)
    assert torch.allclose(lpips(a, a), torch.zeros(len(a)), atol=1e-6) and (ours > 0).all()
    try:  # the same backbone inside torchmetrics' LPIPS (its backbone random: nothing downloads)
        from torchmetrics.functional.image.lpips import _LPIPS
    except ImportError:
        pytest.skip("torchmetrics' LPIPS internals moved")
    reference = _LPIPS(net="alex", pnet_rand=True).eval()
    state = torch.load(weights, weights_only=True)
    reference.net.load_state_dict({name: state[f"features.{name.split('.', 1)[1]}"]
                                   for name in reference.net.state_dict()})
    assert torch.allclose(ours, reference(a, b, normalize=True).flatten(), rtol=1e-4, atol=1e-6)
    assert pairwise_lpips(lpips, xt).shape == (len(xt),)


def test_lpips_refuses_a_file_that_is_not_alexnet(tmp_path):
    with pytest.raises(ReidgenError, match="not found"):
        LPIPS(tmp_path / "missing.pth")
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, other)
    with pytest.raises(ReidgenError, match="not an AlexNet state dict"):
        LPIPS(other)


# -- the command, on a real checkpoint file ----------------------------------------------------------


def test_cross_source_pairs_pair_each_rendering_with_another_source():
    first, second = cross_source_pairs(5, 3, seed=0)
    assert first.tolist() == list(range(15)) and len(second) == 15
    assert all(a // 3 != b // 3 for a, b in zip(first.tolist(), second.tolist()))
    assert torch.equal(second, cross_source_pairs(5, 3, seed=0)[1])  # seeded
    assert not torch.equal(second, cross_source_pairs(5, 3, seed=1)[1])
    with pytest.raises(ReidgenError, match="at least 2 sources"):
        cross_source_pairs(1, 3)


def test_set_diversity_tells_one_texture_from_following_the_targets(pairs):
    """Across the targets of a source, one texture for all scores 0 by construction; over random
    pairs of different sources it does not, and following each target scores higher still."""
    xs, soft, xt, texture = pairs
    mask = torch.from_numpy(binarize(soft.numpy())).float()
    follow, same = _paste(xs, mask, xt), _paste(xs, mask, texture.expand_as(xt))

    def as_features(images):  # pixels as the features: S×k×d
        return images.flatten(2)

    set_pairs = cross_source_pairs(len(xs), K, seed=0)
    assert pairwise_feature_distance(as_features(same)).abs().max() == 0
    same_set = set_feature_distance(as_features(same), set_pairs)
    follow_set = set_feature_distance(as_features(follow), set_pairs)
    assert same_set > 10 and follow_set > 1.2 * same_set
    # the same pairs of the real targets: what renderings that copy them would score
    assert set_feature_distance(as_features(xt), set_pairs) > 1.2 * same_set


@pytest.fixture(scope="module")
def keep_source_run(market_mini, tmp_path_factory):
    """A CR-GAN checkpoint whose generator keeps the source (context mask ≈ 0 everywhere), and a
    D_id trained briefly on the 4 source identities."""
    from trainer.tasks.crgan import crgan_preset_config
    from trainer.tasks.reid import preset_config, train_reid

    root = tmp_path_factory.mktemp("keep_source")
    source = link_subset(market_mini, root / "source", ids=4, splits=("train",))
    d_id = train_reid(preset_config("tiny", data=str(source), epochs=2, workers=0, evaluate=False, erasing_p=0.0,
                                    warmup_epochs=0.5), root / "d_id", progress=False)
    model = replace(CRGAN_PRESETS["small"], base_channels=8)
    gen = ContextGenerator(model)
    with torch.no_grad():
        gen.to_mask.weight.zero_()
        gen.to_mask.bias.fill_(-40.0)  # X_C = sigmoid(−40): X_G = X_S
    train = crgan_preset_config("small", source=str(source), target="cuhk03_mini", id_model=str(d_id), model=model,
                                masks="geometric", mask_cache=str(root / "masks"))
    save_checkpoint(root / "run" / "checkpoints" / "last.pt", "crgan", {
        "model_config": config_to_dict(model), "train_config": config_to_dict(train),
        "label_map": LabelMap.from_items(scan_split(source, "train")).to_list(), "cameras": [1, 2],
        "models": {"gen": gen.state_dict()}, "step": 0})
    return root / "run", d_id


def test_quality_command_on_a_crgan_checkpoint(keep_source_run, cuhk_mini, capsys):
    run, _ = keep_source_run
    assert checkpoint_kind(run) == "crgan"
    assert main(["quality", "--checkpoint", str(run), "--targets", str(cuhk_mini), "--n", "6", "--k", "3",
                 "--device", "cpu", "--batch-size", "6"]) == 0
    table = capsys.readouterr().out
    report = json.loads((run / "quality.json").read_text())
    assert report["kind"] == "crgan" and report["n"] == 6 and report["sources"] == 2 and report["k"] == 3
    assert "own_target_match" in table and "chance 0.333" in table and "needs --lpips-weights" in table
    # The generator keeps its source: every target gives the same picture.
    assert report["own_target_match"] == pytest.approx(1 / 3)
    assert report["spread_l1"] == pytest.approx(0, abs=1e-5) and report["spread_l1_targets"] > 0.2
    assert report["diversity_inception"] == pytest.approx(0, abs=1e-3) and report["diversity_inception_real"] > 1
    # over pairs of different sources the renderings still differ: the sources do
    assert report["diversity_inception_set"] > 1 and report["diversity_inception_set_real"] > 1
    assert report["diversity_lpips_set"] is None
    assert report["foreground_l1"] == pytest.approx(0, abs=1e-5) and report["context_mask_background"] < 1e-6
    assert report["background_l1_source"] == pytest.approx(0, abs=1e-5) and report["background_l1_own"] > 0.2
    # D_id sees the sources themselves: identity preserved exactly as often as on the real images
    assert report["identity_preservation"] == report["identity_real"]
    assert report["fid"] > 0 and report["fid_real"] > 0 and report["diversity_lpips"] is None
    assert report["target_split"] == "gallery" and report["source_split"] == "train"
    # held-out sources: D_id does not know them, so identity is left out, not guessed
    assert main(["quality", "--checkpoint", str(run), "--targets", str(cuhk_mini), "--n", "4", "--k", "2",
                 "--source-split", "query", "--data", "market1501_mini", "--device", "cpu",
                 "--out", str(run / "q2.json")]) == 0
    assert json.loads((run / "q2.json").read_text())["identity_preservation"] is None


def test_quality_command_refusals(keep_source_run, capsys):
    run, d_id = keep_source_run
    assert main(["quality", "--checkpoint", str(d_id), "--k", "3"]) != 0
    assert "holds a 'reid' model; expected 'dgnet' or 'crgan'" in capsys.readouterr().err
    assert main(["quality", "--checkpoint", str(run), "--k", "1", "--device", "cpu"]) != 0
    assert "at least 2 targets per source" in capsys.readouterr().err
