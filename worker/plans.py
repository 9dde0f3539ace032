"""Pair plans: the records a job spec asks for, as a pure function of the spec and the data.

Every process that touches a job (the submitter, each worker, `reidgen generate`) computes the
plan itself from the spec; the plan's hash goes into every shard manifest, so shards made from
different data (a folder changed between two workers) are refused instead of mixed.

Random choices are seeded from the spec's seed and the position they concern (a subset draw,
one appearance image's structures), never from process state.

A split's listing is remembered per version of its folder (`list_split`: the folder's resolved
path and `worker.stamps.Stamp`, which changes when an image is added, removed or renamed): jobs
on one data set that differ in their seed or counts list it once. (`make_plan` keeps whole
plans too, by spec alone: every shard of a job needs its plan.)
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from api_schemas.jobs import JobSpec
from reidgen.core.errors import about
from reidgen.core.market import SPLITS, Item, scan_split
from reidgen.core.paths import confine, confine_model, resolve_data
from worker.shards import OutPlace
from worker.stamps import Stamp, settled, stamp

PLAN_VERSION = b"reidgen-plan-2"  # in the hash: records computed per row, not listed


@dataclass(frozen=True)
class Plan:
    """The records of a job, computed from the spec and the image listings on demand: a shard's
    records come from its index (`pairs_of`), so no process holds a whole plan (all pairs of
    full Market-1501 would be 167M records, 2.7 GB as a list)."""

    spec: JobSpec
    sources: tuple[Item, ...]       # appearance providers (CR-GAN: the people rendered)
    structures: tuple[Item, ...]    # structure providers (DG-Net: the same list; CR-GAN: target contexts)
    source_root: Path
    structure_root: Path
    starts: np.ndarray              # N+1 int64: the first record of each source's row, then the total
    hash: str

    @property
    def records(self) -> int:
        return int(self.starts[-1])

    @property
    def shards(self) -> int:
        return max(1, math.ceil(self.records / self.spec.shard_size))

    def shard_range(self, shard: int) -> range:
        size = self.spec.shard_size
        return range(shard * size, min(self.records, (shard + 1) * size))

    def domain(self, root: Path) -> str:
        return root.name

    def _row(self, i: int) -> np.ndarray:
        """The structure indices of source ``i``'s records, in plan order."""
        spec = self.spec
        if spec.kind == "crgan_render":
            n = len(self.structures)
            if spec.targets_per_source is None:
                return np.arange(n)
            k = min(spec.targets_per_source, n)
            return np.random.default_rng([spec.seed, 2, i]).choice(n, size=k, replace=False)
        pids = self._pids
        if spec.kind == "dgnet_all_pairs":
            return np.flatnonzero(pids != pids[i]) if spec.cross_identity else np.arange(len(pids))
        candidates = np.flatnonzero(pids != pids[i]) if spec.cross_identity else \
            np.delete(np.arange(len(pids)), i)
        k = min(spec.structures_per_image, len(candidates))
        return np.random.default_rng([spec.seed, 1, i]).choice(candidates, size=k, replace=False)

    @cached_property
    def _pids(self) -> np.ndarray:
        return np.asarray([it.pid for it in self.sources])

    def pairs_of(self, records: range) -> np.ndarray:
        """(source, structure) index pairs of the records ``records`` (a contiguous range): R×2 int64."""
        if not records:
            return np.empty((0, 2), dtype=np.int64)
        first = int(np.searchsorted(self.starts, records.start, side="right")) - 1
        last = int(np.searchsorted(self.starts, records.stop - 1, side="right")) - 1
        parts = []
        for i in range(first, last + 1):
            row = self._row(i)
            lo, hi = max(records.start, self.starts[i]) - self.starts[i], min(records.stop, self.starts[i + 1]) - \
                self.starts[i]
            parts.append(np.stack([np.full(hi - lo, i, dtype=np.int64), row[lo:hi].astype(np.int64)], 1))
        return np.concatenate(parts)

    @property
    def pairs(self) -> np.ndarray:
        """Every pair of the plan (for small plans and tests; workers use `pairs_of` a shard)."""
        return self.pairs_of(range(self.records))


def _subset(items: list[Item], n: int | None, seed: int, stream: int) -> list[Item]:
    if n is None or n >= len(items):
        return items
    pick = np.random.default_rng([seed, stream]).choice(len(items), size=n, replace=False)
    return [items[i] for i in sorted(pick.tolist())]


def _row_counts(spec: JobSpec, pids: np.ndarray, n_targets: int) -> np.ndarray:
    """Records per source image, from the spec and the identities alone (no pairs drawn)."""
    n = len(pids)
    if spec.kind == "crgan_render":
        k = n_targets if spec.targets_per_source is None else min(spec.targets_per_source, n_targets)
        return np.full(n, k, dtype=np.int64)
    if spec.cross_identity:
        _, inverse, same = np.unique(pids, return_inverse=True, return_counts=True)
        others = n - same[inverse].astype(np.int64)
    else:
        others = np.full(n, n if spec.kind == "dgnet_all_pairs" else n - 1, dtype=np.int64)
    if spec.kind == "dgnet_all_pairs":
        return others
    return np.minimum(others, spec.structures_per_image)


def _hash(spec: JobSpec, sources, structures, source_root: Path, structure_root: Path) -> str:
    h = hashlib.sha256(PLAN_VERSION)
    h.update(spec.model_dump_json().encode())
    for root, items in ((source_root, sources), (structure_root, structures)):
        listing = [[str(Path(it.path).relative_to(root)), it.pid, it.camid] for it in items]
        h.update(json.dumps(listing).encode())
    return h.hexdigest()[:16]


def _data_set(field: str, name: str, split: str, root: Path | None) -> tuple[Path, list[Item]]:
    """The root and images of one split of a data set (``root``: already located under the
    server's data root; None: ``name`` is a path or a name under REIDGEN_DATA). A remote client
    learns only that its name was not found: neither the data root it was looked up in nor what
    was wrong with the folder."""
    with about(field, "unknown_data", f"data set {name!r} not found (give the name of a Market-1501 style "
                                      f"data set on this server, with its {split} split)"):
        root = root if root is not None else resolve_data(name)
        return root, list_split(root, split)


def list_split(root: Path, split: str) -> list[Item]:
    """`scan_split` of ``root``, listed once per version of the split's folder. A folder that
    changed just now, or is not there (`scan_split` says what is wrong), is listed each time."""
    folder = (root / SPLITS[split]).resolve() if split in SPLITS else None
    found = stamp(folder) if folder is not None else None
    if found is None or not settled(found):
        return scan_split(root, split)
    listing = _listing_of_stamped(str(root), split, str(folder), found)
    if stamp(folder) != found:  # changed while it was listed: the listing may be of either state,
        _listing_of_stamped.cache_clear()  # so none stays remembered under the older stamp
    return list(listing)


@lru_cache(maxsize=16)
def _listing_of_stamped(root: str, split: str, folder: str, found: Stamp) -> tuple[Item, ...]:
    """``folder`` (the split's, resolved) and ``found`` only key the cache: the items keep the
    paths under ``root`` as given, as `scan_split` names them."""
    return tuple(scan_split(root, split))


def make_plan(spec: JobSpec, data: Path | None = None, target: Path | None = None) -> Plan:
    """The plan of ``spec`` (cached per process: every shard of a job needs it). ``data`` and
    ``target``: the data sets' folders when the caller located them (a server's roots)."""
    return _cached_plan(spec.model_dump_json(), None if data is None else str(data),
                        None if target is None else str(target))


@lru_cache(maxsize=8)
def _cached_plan(spec_json: str, data: str | None, target: str | None) -> Plan:
    spec = JobSpec.model_validate_json(spec_json)
    source_root, sources = _data_set("data", spec.data, spec.split, None if data is None else Path(data))
    sources = _subset(sources, spec.subset, spec.seed, 0)
    if spec.kind == "crgan_render":
        structure_root, structures = _data_set("target", spec.target, spec.target_split,
                                               None if target is None else Path(target))
    else:
        structure_root, structures = source_root, sources
    counts = _row_counts(spec, np.asarray([it.pid for it in sources], dtype=np.int64), len(structures))
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    digest = _hash(spec, sources, structures, source_root, structure_root)
    return Plan(spec, tuple(sources), tuple(structures), source_root, structure_root, starts, digest)


@dataclass(frozen=True)
class Located:
    """Where a job's inputs and output are, in this process's view."""

    checkpoint: Path
    teacher: Path | None
    data: Path | None      # None: the spec's own path or name under REIDGEN_DATA (in-process)
    target: Path | None
    out: OutPlace          # opened through descriptors below the shards root (`worker.shards.OutPlace`)


def locate(spec: JobSpec, out: str | Path, settings=None) -> Located:
    """The job's files: with a server's ``settings`` (`generator_service.http.Settings` with its
    roots) each name is confined to its root (`PathNotAllowed`, naming the field, otherwise);
    without, the paths are taken as given (`reidgen generate` runs in the user's own shell)."""
    if settings is None or not settings.confined:
        teacher = Path(spec.teacher) if spec.teacher else None
        return Located(Path(spec.checkpoint), teacher, None, None, OutPlace.of(out))
    models, data = settings.models_root, settings.data_root
    return Located(
        checkpoint=confine_model(models, spec.checkpoint, "spec.checkpoint"),
        teacher=confine_model(models, spec.teacher, "spec.teacher") if spec.teacher is not None else None,
        data=confine(data, spec.data, "spec.data", "data set"),
        target=confine(data, spec.target, "spec.target", "data set") if spec.target is not None else None,
        out=OutPlace.of(confine(settings.shards_root, str(out), "out", "shards folder"), settings.shards_root,
                        shown=str(out)))
