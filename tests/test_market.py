"""The Market-1501 layout reader on the real mini data sets, and its errors."""
from __future__ import annotations

import pytest

from reidgen.core.errors import ReidgenError
from reidgen.core.market import LabelMap, parse_name, scan_split
from reidgen.core.paths import resolve_data


@pytest.mark.parametrize("name, split, images, ids", [
    ("market1501_mini", "train", 1747, 100),
    ("market1501_mini", "query", 449, 100),
    ("market1501_mini", "gallery", 2426, None),
    ("cuhk03_mini", "train", 1935, 200),
    ("cuhk03_mini", "query", 200, 100),
    ("cuhk03_mini", "gallery", 737, 100),
])
def test_counts_on_mini_sets(request, name, split, images, ids):
    root = request.getfixturevalue("market_mini" if name.startswith("market") else "cuhk_mini")
    items = scan_split(root, split)
    assert len(items) == images
    if ids is not None:
        assert len({it.pid for it in items}) == ids
    assert items == sorted(items, key=lambda it: it.path)


def test_gallery_keeps_junk_and_distractors(market_mini):
    pids = {it.pid for it in scan_split(market_mini, "gallery")}
    assert -1 in pids and 0 in pids


def test_file_names():
    assert parse_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_name("-1_c3s2_000123_00.jpg") == (-1, 3)
    assert parse_name("0042_c12s3_000123_01.jpg") == (42, 12)  # several-digit cameras
    assert parse_name("Thumbs.db") is None


def test_label_map_is_sorted_and_checks_class_order(market_mini):
    items = scan_split(market_mini, "train")
    lm = LabelMap.from_items(items)
    assert list(lm.pids) == sorted(lm.pids) and len(lm) == 100
    assert lm.index(lm.pids[0]) == 0 and lm.index(lm.pids[-1]) == 99
    lm.require_same(LabelMap(tuple(lm.pids)), "same")
    with pytest.raises(ReidgenError, match="class lists differ.*100 vs 99"):
        lm.require_same(LabelMap(lm.pids[:-1]), "teacher")


def test_missing_folder_names_path_and_layout(tmp_path):
    with pytest.raises(ReidgenError, match=f"{tmp_path / 'nope'}.*bounding_box_train/, query/"):
        scan_split(tmp_path / "nope", "train")
    (tmp_path / "x").mkdir()
    with pytest.raises(ReidgenError, match="has no bounding_box_train/"):
        scan_split(tmp_path / "x", "train")


def test_malformed_folder(tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    with pytest.raises(ReidgenError, match="holds no images"):
        scan_split(tmp_path, "train")
    (tmp_path / "bounding_box_train" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ReidgenError, match="not named PPPP_cC.*holiday.jpg"):
        scan_split(tmp_path, "train")


def test_resolve_data_by_name(market_mini):
    assert resolve_data("market1501_mini") == market_mini
    with pytest.raises(ReidgenError, match="not found"):
        resolve_data("no_such_set")
