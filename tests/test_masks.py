"""Person masks for CR-GAN on real Market-1501 / CUHK03 crops: the three providers, the cache,
the check sheet and the errors a user can meet."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from generator_service.models.masks import (
    MODEL_HELP,
    FolderMasks,
    GeometricMasks,
    MaskCache,
    MaskProvider,
    TFLiteSegmenter,
    binarize,
    build_mask_provider,
    compute_masks,
    default_model_path,
    mask_provider_for,
    mask_sheet,
)
from reidgen.core.errors import ReidgenError
from reidgen.core.images import UnreadableImage, UnreadableImages
from reidgen.core.market import scan_split


@pytest.fixture(scope="module")
def crops(request) -> list[str]:
    """8 Market and 3 CUHK03 training crops, spread over identities."""
    market = scan_split(request.getfixturevalue("market_mini"), "train")
    cuhk = scan_split(request.getfixturevalue("cuhk_mini"), "train")
    return [it.path for it in market[::220][:8]] + [it.path for it in cuhk[::650][:3]]


def _segmenter(kind: str) -> TFLiteSegmenter:
    path = default_model_path(kind)
    if not path.is_file():
        pytest.skip(f"MediaPipe model {path} not found (set REIDGEN_MASK_MODEL); {MODEL_HELP}")
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    return TFLiteSegmenter(kind=kind, num_threads=2)


@pytest.fixture(scope="module")
def pose() -> TFLiteSegmenter:
    return _segmenter("pose")


@pytest.fixture(scope="module")
def selfie() -> TFLiteSegmenter:
    return _segmenter("selfie")


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _check_shapes(paths: list[str], masks: list[np.ndarray]) -> None:
    assert len(masks) == len(paths)
    for p, m in zip(paths, masks):
        w, h = _image_size(p)
        assert m.shape == (h, w) and m.dtype == np.float32
        assert 0.0 <= m.min() and m.max() <= 1.0


def test_pose_mask_covers_the_person_not_the_crop(pose, crops):
    masks = pose.masks(crops)
    _check_shapes(crops, masks)
    centres, borders = [], []
    for p, m in zip(crops, masks):
        b = binarize(m)
        w = b.shape[1]
        assert 0.15 <= b.mean() <= 0.85, f"{p}: person covers {b.mean():.2f} of the crop"
        centres.append(b[:, w // 4: 3 * w // 4].mean())
        borders.append(np.concatenate([b[:, : w // 8], b[:, -(w // 8):]], axis=1).mean())
        assert centres[-1] > borders[-1], p
    assert np.mean(centres) > np.mean(borders) + 0.3


def test_selfie_model_runs(selfie, crops):
    masks = selfie.masks(crops[:3])
    _check_shapes(crops[:3], masks)
    assert any(binarize(m).mean() > 0.1 for m in masks)


def test_segmenter_identity_names_model_and_hash(pose, selfie):
    assert "pose_landmark_full.tflite" in pose.identity() and "sha256=" in pose.identity()
    assert pose.identity() != selfie.identity()
    assert MaskCache("x", pose).folder != MaskCache("x", selfie).folder


def test_model_errors_say_where_models_come_from(tmp_path, monkeypatch):
    with pytest.raises(ReidgenError, match="pip download --no-deps mediapipe==0.10.21"):
        TFLiteSegmenter(tmp_path / "nope.tflite")
    monkeypatch.setenv("REIDGEN_MASK_MODEL", str(tmp_path))
    assert default_model_path("selfie") == tmp_path / "selfie_segmentation.tflite"
    with pytest.raises(ReidgenError, match="REIDGEN_MASK_MODEL"):
        build_mask_provider("pose")


def test_wrong_kind_for_model_file(selfie):
    with pytest.raises(ReidgenError, match="does not look like"):
        TFLiteSegmenter(selfie.model_path, kind="pose")


def test_geometric_prior(crops):
    masks = GeometricMasks().masks(crops[:2])
    _check_shapes(crops[:2], masks)
    m = masks[0]
    h, w = m.shape
    assert m[int(0.52 * h), w // 2] == 1.0
    assert m[0, 0] == 0.0 and m[-1, -1] == 0.0
    assert 0.3 < binarize(m).mean() < 0.6
    assert ((m > 0) & (m < 1)).any()  # soft edge


class Counting(MaskProvider):
    """Wraps a provider and counts the images it is asked for."""

    def __init__(self, inner: MaskProvider):
        self.inner, self.calls = inner, 0

    @property
    def name(self) -> str:
        return self.inner.name

    def identity(self) -> str:
        return self.inner.identity()

    def mask_file(self, path: str) -> np.ndarray:
        self.calls += 1
        return self.inner.mask_file(path)


def test_cache_skips_computed_masks(tmp_path, crops):
    provider = Counting(GeometricMasks())
    first = compute_masks(provider, crops[:4], tmp_path, progress=False)
    assert provider.calls == 4 and set(first) == set(crops[:4])
    again = compute_masks(provider, crops[:5], tmp_path, progress=False)
    assert provider.calls == 5  # only the new image
    for p in crops[:4]:
        np.testing.assert_array_equal(first[p], again[p])
    other = compute_masks(Counting(GeometricMasks(softness=0.05)), crops[:1], tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2 and other  # another identity, another folder


def test_folder_round_trip_and_missing_mask(tmp_path, crops):
    provider = GeometricMasks()
    stored = compute_masks(provider, crops[:3], tmp_path, progress=False)
    folder = MaskCache(tmp_path, provider).folder
    assert (folder / (crops[0].rsplit("/", 1)[1].rsplit(".", 1)[0] + ".png")).is_file()
    loaded = build_mask_provider("folder", folder=folder).masks(crops[:3])
    for p, m in zip(crops[:3], loaded):
        np.testing.assert_array_equal(m, stored[p])
    with pytest.raises(ReidgenError, match=r"expected .*0\w*\.png") as err:
        FolderMasks(folder).masks([crops[5]])
    assert "file stem" in str(err.value)


def test_folder_label_maps_and_resizing(tmp_path, crops):
    w, h = _image_size(crops[0])
    labels = np.zeros((h // 2, w // 2), np.uint8)
    labels[10:40, 8:24] = 5  # a parser's class id, not a grey level
    Image.fromarray(labels).save(tmp_path / (crops[0].rsplit("/", 1)[1][:-4] + ".png"))
    (m,) = FolderMasks(tmp_path).masks(crops[:1])
    assert m.shape == (h, w) and m.max() == 1.0 and 0.05 < binarize(m).mean() < 0.5


def test_mask_sheet_size(crops):
    masks = GeometricMasks().masks(crops[:10])
    sheet = mask_sheet(crops[:10], masks, columns=4)
    assert sheet.size == (4 * 66 + 2, 3 * 130 + 2) and sheet.mode == "RGB"
    assert mask_sheet(crops[:3], masks[:3]).size == (3 * 66 + 2, 130 + 2)


@pytest.mark.parametrize("kind", ["geometric", "pose"])
def test_corrupt_image_is_reported_not_fatal(tmp_path, crops, capsys, kind):
    provider = GeometricMasks() if kind == "geometric" else _segmenter("pose")
    bad = tmp_path / "0002_c1s1_000451_99.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg" * 10)
    skipped = UnreadableImages()
    out = compute_masks(provider, [crops[0], str(bad), crops[1]], tmp_path / "masks",
                        progress=False, skipped=skipped)
    assert set(out) == {crops[0], crops[1]} and skipped.paths == [str(bad)]
    assert f"skipped 1 unreadable image(s), first: {bad}" in capsys.readouterr().out
    with pytest.raises(UnreadableImage, match="cannot read image"):
        compute_masks(provider, [str(bad)], tmp_path / "masks", progress=False, strict=True)


def test_provider_factory_errors():
    with pytest.raises(ReidgenError, match="expected one of"):
        build_mask_provider("lip")
    with pytest.raises(ReidgenError, match="needs folder="):
        build_mask_provider("folder")
    with pytest.raises(ReidgenError, match="no option"):
        build_mask_provider("geometric", model_path="x")
    assert build_mask_provider("geometric").name == "geometric"


@dataclass
class _CRGANSettings:  # what train-crgan's configuration holds about masks
    masks: str = "geometric"
    mask_model: str = ""


def test_mask_provider_for_a_crgan_train_config(tmp_path, pose, selfie):  # (skips without the models)
    provider, name = mask_provider_for({"masks": "geometric"})
    assert isinstance(provider, GeometricMasks) and name == "geometric"
    assert mask_provider_for(_CRGANSettings())[1] == "geometric"  # the trainer's dataclass works too
    pose, name = mask_provider_for({})  # nothing recorded: the pose segmenter, train-crgan's default
    assert isinstance(pose, TFLiteSegmenter) and pose.kind == "pose" and name == "pose"
    assert mask_provider_for({"masks": "folder"})[1] == "pose"  # the folder is not recorded
    assert mask_provider_for({"masks": "pose"}, override="geometric")[1] == "geometric"

    missing = {"masks": "pose", "mask_model": str(tmp_path / "gone.tflite")}
    with pytest.raises(ReidgenError, match="gone.tflite not found"):
        mask_provider_for(missing)  # trainers and measurements: the trained-with masks or an error
    provider, name = mask_provider_for(missing, fallback=True)  # the service: a stand-in, named as such
    assert isinstance(provider, GeometricMasks) and name == "geometric (fallback: pose unavailable)"
    # an override to another provider does not take the recorded model file of the trained one
    assert mask_provider_for(missing, override="selfie")[0].kind == "selfie"
