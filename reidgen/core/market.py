"""The Market-1501 folder layout: file names, splits and the identity label map.

Torch-free on purpose: the trainer, the batch workers and the service all read source data,
and none of them should need a data loader to list a folder.

Layout::

    DIR/bounding_box_train/  training images
    DIR/query/               query images
    DIR/bounding_box_test/   gallery images

File names are ``PPPP_cCsS_FFFFFF_NN.jpg``: PPPP the person id (``-1`` junk, ``0000``
distractor), C the camera (one or more digits), S the sequence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from reidgen.core.errors import ReidgenError

SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NAME = re.compile(r"^(-?\d+)_c(\d+)")

LAYOUT_HELP = (
    "expected a Market-1501 style folder with bounding_box_train/, query/ and "
    "bounding_box_test/ holding images named like 0002_c1s1_000451_03.jpg"
)


@dataclass(frozen=True)
class Item:
    """One image: where it is, whose it is, which camera saw it."""

    path: str
    pid: int
    camid: int


def parse_name(name: str) -> tuple[int, int] | None:
    """(person id, camera id) from a Market-style file name, or None if it is not one."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def scan_split(root: str | Path, split: str, *, keep_junk: bool | None = None) -> list[Item]:
    """List the images of one split, sorted by file name.

    Junk images (id -1) carry no identity: they are dropped from ``train`` and kept in
    ``query``/``gallery`` where the evaluation protocol ignores them explicitly.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    root = Path(root)
    folder = root / SPLITS[split]
    if not root.is_dir():
        raise ReidgenError(f"data folder {root} does not exist; {LAYOUT_HELP}")
    if not folder.is_dir():
        raise ReidgenError(f"data folder {root} has no {SPLITS[split]}/; {LAYOUT_HELP}")
    if keep_junk is None:
        keep_junk = split != "train"
    items, bad_names = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parsed = parse_name(path.name)
        if parsed is None:
            bad_names.append(path.name)
            continue
        pid, camid = parsed
        if pid == -1 and not keep_junk:
            continue
        items.append(Item(str(path), pid, camid))
    if bad_names:
        raise ReidgenError(
            f"{len(bad_names)} file(s) in {folder} are not named PPPP_cC..., e.g. "
            f"{bad_names[0]!r}; {LAYOUT_HELP}"
        )
    if not items:
        raise ReidgenError(f"{folder} holds no images; {LAYOUT_HELP}")
    return items


def link_subset(src: str | Path, dst: str | Path, ids: int, splits: tuple[str, ...] = tuple(SPLITS)) -> Path:
    """A Market-style folder of symlinks to the images of the first ``ids`` identities (by id,
    junk excluded) of each of ``splits`` of ``src``: small data sets for tests and benchmarks,
    with no image copied."""
    src, dst = Path(src), Path(dst)
    for split in splits:
        folder = SPLITS[split]
        (dst / folder).mkdir(parents=True, exist_ok=True)
        files = sorted((src / folder).iterdir())
        keep = sorted({f.name.split("_")[0] for f in files if not f.name.startswith("-1")})[:ids]
        for f in files:
            if f.name.split("_")[0] in keep:
                (dst / folder / f.name).symlink_to(f.resolve())
    return dst


@dataclass(frozen=True)
class LabelMap:
    """Sorted person ids → class indices 0..K-1.

    Saved with every checkpoint, so that a teacher and a student (or a resumed run) agree on
    which output unit is which person.
    """

    pids: tuple[int, ...]

    @classmethod
    def from_items(cls, items: list[Item]) -> "LabelMap":
        return cls(tuple(sorted({it.pid for it in items})))

    def __len__(self) -> int:
        return len(self.pids)

    def index(self, pid: int) -> int:
        return self._lookup[pid]

    @cached_property
    def _lookup(self) -> dict[int, int]:
        return {pid: i for i, pid in enumerate(self.pids)}

    def to_list(self) -> list[int]:
        return list(self.pids)

    def require_same(self, other: "LabelMap", what: str) -> None:
        """Refuse to pair models whose class orders differ (teacher/student, resume)."""
        if self.pids == other.pids:
            return
        only_self = sorted(set(self.pids) - set(other.pids))
        only_other = sorted(set(other.pids) - set(self.pids))
        detail = (
            f"{len(self.pids)} vs {len(other.pids)} identities"
            if only_self or only_other
            else "the same identities in another order"
        )
        hint = f"; e.g. id {(only_self or only_other)[0]} is in one only" if only_self or only_other else ""
        raise ReidgenError(
            f"{what}: class lists differ ({detail}{hint}); a model must be trained on the same "
            "training identities to be used here"
        )
