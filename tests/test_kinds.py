"""Model kinds and the one synthesis path: every kind a `ModelKind` (re-id embeds, DG-Net swaps,
CR-GAN renders), the online-render feed through the engine, and generated images that go straight
into a backward pass."""
from __future__ import annotations

import inspect
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import generator_service.inference.synthesis as synthesis_module
from generator_service.inference.engine import Engine
from generator_service.inference.kinds import KINDS, PRESETS
from generator_service.inference.synthesis import Synthesizer
from generator_service.models.crgan_nets import CRGAN_PRESETS, ContextGenerator
from generator_service.models.masks import GeometricMasks, ensure_masks
from reidgen.core.checkpoint import save_checkpoint
from reidgen.core.errors import ReidgenError
from reidgen.core.market import LabelMap, link_subset, scan_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CRGAN = replace(CRGAN_PRESETS["small"], base_channels=12, dis_channels=16, cam_channels=(8, 16, 32, 32))


def write_tiny_crgan(path: Path, **train_config) -> Path:
    """A CR-GAN checkpoint with an untrained generator (the serving side needs a real file, not a
    good one), in the layout train-crgan writes; geometric masks unless told otherwise."""
    torch.manual_seed(0)
    config = {"masks": "geometric", "mask_model": "", "mask_cache": "", "target": "", "binary_masks": False,
              **train_config}
    return save_checkpoint(path, "crgan", {"model_config": asdict(TINY_CRGAN), "label_map": [1, 2, 3],
                                           "train_config": config, "step": 0,
                                           "models": {"gen": ContextGenerator(TINY_CRGAN).state_dict()}})


# -- the registry ------------------------------------------------------------------------------
def test_each_kind_names_its_synthesis_and_the_synthesizer_has_no_kind_branch():
    assert {name: kind.synthesis_op for name, kind in KINDS.items()} == {"dgnet": "swap", "crgan": "render",
                                                                         "reid": None}
    for kind in KINDS.values():
        assert kind.synthesis_op is None or kind.synthesis_op in kind.ops
    source = inspect.getsource(synthesis_module)
    assert "crgan" not in source and "dgnet" not in source
    # GET /v1/models lists the presets of the kinds served over HTTP only
    assert set(PRESETS) == {"dgnet", "crgan"} and KINDS["reid"].endpoints == ()


# -- CR-GAN through the engine --------------------------------------------------------------------
def test_crgan_synthesis_goes_through_the_engine(tmp_path):
    engine = Engine.from_checkpoint(write_tiny_crgan(tmp_path / "crgan.pt"), "cpu")
    synthesizer = Synthesizer(engine, teacher=None)
    assert synthesizer.model.kind == "crgan" and synthesizer.kind.synthesis_op == "render"
    torch.manual_seed(1)
    source, target = torch.randn(2, 3, 128, 64), torch.randn(2, 3, 128, 64)
    masks = torch.rand(2, 1, 128, 64)
    made = synthesizer(source, target, masks)
    assert made.soft is None and made.images.shape == (2, 3, 128, 64)
    assert torch.allclose(made.images, engine.render_batch(source, target, masks)[0], atol=1e-6)
    with pytest.raises(ReidgenError, match="needs the targets' person masks"):
        synthesizer(source, target)
    (served,) = engine.models.values()
    assert served.masks_name == "geometric" and served.preset == "custom"


# -- re-id: embed ---------------------------------------------------------------------------------
def test_reid_kind_embeds_and_is_not_served_over_http(tiny_dgnet, tmp_path):
    teacher = tiny_dgnet["teacher"]
    engine = Engine.from_checkpoint(teacher, "cpu")
    (served,) = engine.models.values()
    assert served.kind == "reid" and served.info(True)["endpoints"] == []
    engine.warm_up()  # runs the kind's warm-up item
    assert engine.warmed
    torch.manual_seed(2)
    images = torch.randn(3, 3, 128, 64)
    features = engine.embed_batch(images)
    assert features.shape == (3, served.net.config.bottleneck)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    net = served.net
    with torch.no_grad():  # flip-averaged as evaluation ranks
        views = [F.normalize(net(x)[1], dim=1) for x in (images, images.flip(3))]
    assert torch.allclose(features, F.normalize(views[0] + views[1], dim=1), atol=1e-5)
    assert torch.allclose(engine.embed_batch(images[:1]), features[:1], atol=1e-5)  # per image, not per batch
    with pytest.raises(ReidgenError, match="generates no images"):
        Synthesizer(engine, teacher=None)

    models = tmp_path / "models"
    models.mkdir()
    (models / "teacher.pt").symlink_to(teacher)
    write_tiny_crgan(models / "crgan.pt")
    assert list(Engine.from_models_dir(models, "cpu").models) == ["crgan"]  # the teacher is skipped


# -- generated images train -----------------------------------------------------------------------
def test_online_feed_output_goes_through_a_backward_pass(tiny_dgnet):
    from trainer.feeds.synthetic import OnlineFeed

    label_map = LabelMap.from_items(scan_split(tiny_dgnet["data"], "train"))
    feed = OnlineFeed(str(tiny_dgnet["dgnet"]), str(tiny_dgnet["data"]), label_map, torch.device("cpu"), 4)
    torch.manual_seed(3)
    images, soft, fine = feed(torch.randn(4, 3, 128, 64), torch.tensor([0, 0, 1, 2]))
    assert not images.is_inference() and not soft.is_inference()  # no clone needed
    assert images.shape == (4, 3, 128, 64) and soft.shape == (4, len(label_map)) and fine.tolist() == [1, 1, 2, 0]
    head = torch.nn.Conv2d(3, len(label_map), 3)
    logits = head(images).mean((2, 3))
    loss = F.kl_div(F.log_softmax(logits, 1), soft, reduction="batchmean") + F.cross_entropy(logits, fine)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


# -- the online-render feed -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def render_setup(cuhk_mini, tmp_path_factory):
    root = tmp_path_factory.mktemp("render_feed")
    target = link_subset(cuhk_mini, root / "target", ids=4)
    crgan_masks = root / "run" / "masks"
    ensure_masks(GeometricMasks(), scan_split(target, "train"), crgan_masks / "target", progress=False)
    ckpt = write_tiny_crgan(root / "run" / "checkpoints" / "last.pt", target=str(target))
    return {"root": root, "target": target, "run": root / "run", "checkpoint": ckpt}


def _feed(setup, start_step: int, mask_cache: Path):
    from trainer.feeds.online_render import RenderFeed

    return RenderFeed(str(setup["run"]), str(setup["target"]), torch.device("cpu"), 3, 5, 0, start_step,
                      mask_cache, progress=False)


def test_render_feed_resumes_exactly_and_reuses_the_runs_masks(render_setup, tmp_path):
    own_cache = tmp_path / "masks" / "target"
    feed = _feed(render_setup, 0, own_cache)
    torch.manual_seed(4)
    sources = [torch.randn(3, 3, 96, 48) for _ in range(3)]  # the re-id model's size, not the generator's
    rendered = [feed(s) for s in sources]
    assert all(r.shape == (3, 3, 96, 48) and not r.is_inference() for r in rendered)
    assert not torch.allclose(rendered[1], sources[1], atol=1e-3)
    resumed = _feed(render_setup, 2, own_cache)  # a run resumed at step 2 renders step 2's targets
    assert torch.equal(resumed(sources[2]), rendered[2])
    # The CR-GAN run cached the target's masks with the same provider: nothing is computed again.
    assert not own_cache.exists()
    assert feed.synthesizer.engine.device == torch.device("cpu")
