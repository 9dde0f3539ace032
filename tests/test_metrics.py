"""Tests of trainer.evaluation.metrics: the fast ranking path against the per-query reference.

Real-data features are raw 16×8 pixels (no network): weak, but they give a realistic mix
of hits, misses, junk and distractors from the real Market-1501 file names.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reidgen.core.market import parse_name
from reidgen.core.paths import data_root
from trainer.evaluation import metrics
from trainer.evaluation.metrics import (
    RankingResult,
    combine_parts,
    evaluate_ranking,
    evaluate_ranking_reference,
)

MINI = data_root() / "market1501_mini"


def _id_cam(name: str) -> tuple[int, int]:
    parsed = parse_name(name)
    assert parsed is not None, f"unexpected file name {name!r}"
    return parsed


def _pixel_features(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattened 16×8 RGB pixels minus the image's mean, L2-normalised (float64, N×384)."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".jpg")
    feats = np.empty((len(names), 16 * 8 * 3))
    for k, name in enumerate(names):
        with Image.open(folder / name) as im:
            im.draft("RGB", (8, 16))  # let the JPEG decoder downscale: much faster
            pix = np.asarray(im.convert("RGB").resize((8, 16), Image.BILINEAR), dtype=np.float64)
        v = pix.ravel() - pix.mean()
        feats[k] = v / max(np.linalg.norm(v), 1e-12)
    ids, cams = zip(*(_id_cam(n) for n in names))
    return feats, np.array(ids, dtype=np.int64), np.array(cams, dtype=np.int64)


@pytest.fixture(scope="module")
def mini_features() -> dict[str, np.ndarray]:
    if not (MINI / "query").is_dir() or not (MINI / "bounding_box_test").is_dir():
        pytest.skip(f"Market-1501 mini not found at {MINI} (set REIDGEN_DATA to the data folder)")
    qf, ql, qc = _pixel_features(MINI / "query")
    gf, gl, gc = _pixel_features(MINI / "bounding_box_test")
    return {"qf": qf, "gf": gf, "ql": ql, "gl": gl, "qc": qc, "gc": gc}


@pytest.fixture(scope="module")
def mini_reference(mini_features: dict[str, np.ndarray]) -> RankingResult:
    return evaluate_ranking_reference(*_args(mini_features))


def _assert_same(fast: RankingResult, ref: RankingResult) -> None:
    np.testing.assert_allclose(fast.cmc, ref.cmc, rtol=0, atol=1e-6)
    for key in ("mAP", "mINP", "rank1", "rank5", "rank10"):
        assert getattr(fast, key) == pytest.approx(getattr(ref, key), abs=1e-6), key
    assert fast.num_queries == ref.num_queries
    assert fast.num_valid_queries == ref.num_valid_queries


def _args(d: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    return d["qf"], d["gf"], d["ql"], d["gl"], d["qc"], d["gc"]


@pytest.fixture(params=[0.0, 1.0], ids=["full-sort", "top-k"])
def ranking_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Force each of the fast path's two ways of ranking a chunk."""
    monkeypatch.setattr(metrics, "_TOPK_MAX_FRACTION", request.param)
    return request.node.callspec.id


# --- real data -------------------------------------------------------------------------


def test_real_data_has_all_kinds_of_gallery_items(mini_features: dict[str, np.ndarray]) -> None:
    gl = mini_features["gl"]
    assert len(mini_features["ql"]) == 449 and len(gl) == 2426
    assert (gl == -1).any() and (gl == 0).any()


@pytest.mark.parametrize("chunk_size", [256, 7])
def test_fast_matches_reference_on_real_pixels(
    mini_features: dict[str, np.ndarray],
    mini_reference: RankingResult,
    chunk_size: int,
    ranking_path: str,
) -> None:
    ref = mini_reference
    fast = evaluate_ranking(*_args(mini_features), chunk_size=chunk_size)
    _assert_same(fast, ref)
    # Raw pixels are a weak but real signal: far above chance, far below perfect.
    assert 0.05 < fast.rank1 < 0.9
    assert fast.num_valid_queries == fast.num_queries == 449


def test_fast_accepts_torch_float32(
    mini_features: dict[str, np.ndarray], mini_reference: RankingResult
) -> None:
    d, ref = mini_features, mini_reference
    fast = evaluate_ranking(
        torch.from_numpy(d["qf"]).float(),
        torch.from_numpy(d["gf"]).float(),
        torch.from_numpy(d["ql"]),
        torch.from_numpy(d["gl"]),
        torch.from_numpy(d["qc"]),
        torch.from_numpy(d["gc"]),
    )
    # float32 scores may reorder a near-tie, so compare loosely here.
    assert fast.mAP == pytest.approx(ref.mAP, abs=1e-3)
    assert fast.rank1 == pytest.approx(ref.rank1, abs=1e-2)


# --- hand-made case --------------------------------------------------------------------

# Gallery: 0 = id 1 cam 1, 1 = id 1 cam 2, 2 = junk id -1, 3 = distractor id 0, 4 = id 2 cam 1.
GALLERY_IDS = np.array([1, 1, -1, 0, 2])
GALLERY_CAMS = np.array([1, 2, 2, 3, 1])
# One-hot gallery features make query features equal to their score rows.
GALLERY_FEAT = np.eye(5)
QUERY_IDS = np.array([1, 1, 3])
QUERY_CAMS = np.array([1, 3, 1])
QUERY_SCORES = np.array(
    [
        # q0 (id 1, cam 1): g0 is junk (same cam), g2 junk (-1). Ranked g0 g2 g3 g1 g4,
        # after junk removal g3 g1 g4: the only good match (g1) at rank 1.
        [0.9, 0.5, 0.8, 0.7, 0.1],
        # q1 (id 1, cam 3): g0 and g1 both good. Ranked g1 g3 g2 g4 g0, after junk removal
        # g1 g3 g4 g0: good matches at ranks 0 and 3.
        [0.2, 0.9, 0.5, 0.6, 0.3],
        # q2 (id 3): no good match at all.
        [0.5, 0.4, 0.3, 0.2, 0.1],
    ]
)


def test_hand_made_case(ranking_path: str) -> None:
    args = (QUERY_SCORES, GALLERY_FEAT, QUERY_IDS, GALLERY_IDS, QUERY_CAMS, GALLERY_CAMS)
    ap_q0 = (1 / 2 + 0 / 1) / 2
    ap_q1 = 0.5 * (1 / 1 + 1.0) / 2 + 0.5 * (2 / 4 + 1 / 3) / 2
    for res in (
        evaluate_ranking(*args, max_rank=4),
        evaluate_ranking(*args, max_rank=4, chunk_size=1),
        evaluate_ranking_reference(*args, max_rank=4),
    ):
        np.testing.assert_allclose(res.cmc, [1 / 3, 2 / 3, 2 / 3, 2 / 3], atol=1e-12)
        assert res.rank1 == pytest.approx(1 / 3)
        assert res.rank5 == res.rank10 == pytest.approx(2 / 3)
        assert res.num_queries == 3 and res.num_valid_queries == 2
        assert res.mAP == pytest.approx((ap_q0 + ap_q1) / 2)
        assert res.mINP == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_ties_follow_gallery_order(ranking_path: str) -> None:
    # All scores equal: q0's ranking is the gallery order g0(junk) g1 g2(junk) g3 g4, so its
    # good match g1 is first. Reverse tie-breaking would put it behind g4 and g3.
    args = (np.ones((1, 5)), GALLERY_FEAT, QUERY_IDS[:1], GALLERY_IDS, QUERY_CAMS[:1], GALLERY_CAMS)
    for res in (evaluate_ranking(*args), evaluate_ranking_reference(*args)):
        assert res.rank1 == 1.0 and res.mAP == 1.0 and res.mINP == 1.0


@pytest.mark.parametrize("chunk_size", [64, 3])
def test_fast_matches_reference_with_many_ties(ranking_path: str, chunk_size: int) -> None:
    # Scores in {0, 1, 2, 3}: ties everywhere, including around every good match.
    rng = np.random.default_rng(1)
    num_q, num_g = 40, 60
    query_scores = rng.integers(0, 4, size=(num_q, num_g)).astype(np.float64)
    args = (
        query_scores,
        np.eye(num_g),
        rng.integers(1, 6, size=num_q),
        rng.integers(-1, 6, size=num_g),
        rng.integers(1, 4, size=num_q),
        rng.integers(1, 4, size=num_g),
    )
    ref = evaluate_ranking_reference(*args, max_rank=20)
    assert 0 < ref.num_valid_queries
    _assert_same(evaluate_ranking(*args, max_rank=20, chunk_size=chunk_size), ref)


def test_result_to_dict_is_plain_python() -> None:
    res = evaluate_ranking(QUERY_SCORES, GALLERY_FEAT, QUERY_IDS, GALLERY_IDS, QUERY_CAMS, GALLERY_CAMS)
    d = res.to_dict()
    assert isinstance(d["cmc"], list) and len(d["cmc"]) == 50
    assert all(type(x) is float for x in d["cmc"])
    assert type(d["mAP"]) is float and type(d["num_valid_queries"]) is int


def test_evaluate_rejects_bad_inputs() -> None:
    good = (QUERY_SCORES, GALLERY_FEAT, QUERY_IDS, GALLERY_IDS, QUERY_CAMS, GALLERY_CAMS)
    with pytest.raises(ValueError, match="feature sizes"):
        evaluate_ranking(QUERY_SCORES[:, :4], *good[1:])
    with pytest.raises(ValueError, match="query sizes"):
        evaluate_ranking(good[0], good[1], QUERY_IDS[:2], *good[3:])
    with pytest.raises(ValueError, match="integers"):
        evaluate_ranking(*good[:2], QUERY_IDS.astype(float), *good[3:])
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_ranking(*good, chunk_size=0)


# --- combine_parts ---------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T


def test_combine_parts_gives_weighted_cosine_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    qa, qb = torch.randn(6, 8, generator=gen), torch.randn(6, 16, generator=gen)
    ga, gb = torch.randn(9, 8, generator=gen), torch.randn(9, 16, generator=gen)
    w1, w2 = 1.0, 0.3
    q = combine_parts([qa, qb], [w1, w2])
    g = combine_parts([ga, gb], [w1, w2])
    assert q.shape == (6, 24)
    torch.testing.assert_close(q @ g.T, w1 * _cos(qa, ga) + w2 * _cos(qb, gb))
    # Default weights are all 1: plain sum of cosines.
    torch.testing.assert_close(
        combine_parts([qa, qb]) @ combine_parts([ga, gb]).T, _cos(qa, ga) + _cos(qb, gb)
    )


def test_combine_parts_rejects_bad_arguments() -> None:
    a, b = torch.randn(4, 3), torch.randn(4, 5)
    with pytest.raises(ValueError, match="non-negative"):
        combine_parts([a, b], [1.0, -0.5])
    with pytest.raises(ValueError, match="non-negative"):
        combine_parts([a, b], [1.0, math.nan])
    with pytest.raises(ValueError, match="2 parts but 1 weights"):
        combine_parts([a, b], [1.0])
    with pytest.raises(ValueError, match="rows"):
        combine_parts([a, torch.randn(3, 5)])
    with pytest.raises(ValueError, match="at least one"):
        combine_parts([])
